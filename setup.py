"""Builds the native CPU kernel of the loss (csrc/; C++20, which torch's headers need; -O3; OpenMP)
as `acl_kernels._C` whenever torch is importable at build time and a C++ compiler works. Otherwise,
or if the build fails, the package installs pure Python, and `python -m acl_kernels.info` says why
the native backend is missing. Torch must be installed first and the build run without isolation:
`pip install --no-build-isolation -e .` (what `make` does) or `pip wheel --no-build-isolation .`.
"""

import os
import sys

from setuptools import find_packages, setup

# train/ installs as the package acl_train (never as a top-level `train`, which would shadow a
# user's own train.py); acl_kernels and every subpackage of either are found, not listed.
package_dir = {"acl_train": "train"}
packages = find_packages(include=["acl_kernels", "acl_kernels.*"])
packages += ["acl_train"] + [f"acl_train.{p}" for p in find_packages("train")]

CSRC = sorted(os.path.join("csrc", f) for f in os.listdir("csrc")) if os.path.isdir("csrc") else []
SOURCES = [f for f in CSRC if f.endswith(".cpp")]
HEADERS = [f for f in CSRC if f.endswith(".h")]


def native_extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        print(f"acl-kernels: torch is not importable at build time ({err}): no native CPU kernel", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A compiler error costs the native backend, never the install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # compiler missing or failing: install without the extension
                print(
                    f"acl-kernels: building the native CPU kernel failed ({err}); installing without it",
                    file=sys.stderr,
                )
                self.extensions = []

    # -fno-trapping-math (as PyTorch builds): a select between two float expressions may evaluate
    # both, so the tile loops can be vectorised; the AVX2 + FMA copy of those loops is chosen at run
    # time (csrc/contrastive_cpu.cpp), so no -march flag ties the build to this CPU
    flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    ext = CppExtension(
        "acl_kernels._C", SOURCES, depends=HEADERS, extra_compile_args=flags, extra_link_args=["-fopenmp"]
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = native_extension() if SOURCES else ([], {})
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
