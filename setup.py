"""Pure-Python install by default. The optional CUDA C++ backend in csrc/ is built only when
ACL_KERNELS_BUILD_CUDA=1 is set (needs nvcc and a CUDA build of torch)."""

import os

from setuptools import find_packages, setup

# train/ installs as the package acl_train (never as a top-level `train`, which would shadow a
# user's own train.py); acl_kernels and every subpackage of either are found, not listed.
package_dir = {"acl_train": "train"}
packages = find_packages(include=["acl_kernels", "acl_kernels.*"])
packages += ["acl_train"] + [f"acl_train.{p}" for p in find_packages("train")]

ext_modules, cmdclass = [], {}
if os.environ.get("ACL_KERNELS_BUILD_CUDA") == "1" and os.path.isdir("csrc") and os.listdir("csrc"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cpp", ".cu"))]
    ext_modules = [CUDAExtension("acl_kernels._C", sources, extra_compile_args={"nvcc": ["-O3"], "cxx": ["-O3"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
