"""Pure-Python install by default. The optional CUDA C++ backend in csrc/ is built only when
ACL_KERNELS_BUILD_CUDA=1 is set (needs nvcc and a CUDA build of torch)."""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ACL_KERNELS_BUILD_CUDA") == "1" and os.path.isdir("csrc") and os.listdir("csrc"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cpp", ".cu"))]
    ext_modules = [CUDAExtension("acl_kernels._C", sources, extra_compile_args={"nvcc": ["-O3"], "cxx": ["-O3"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
