"""Builds the native CPU kernel of the loss (csrc/; C++20, which torch's headers need; -O3; OpenMP)
as `acl_kernels._C` whenever torch is importable at build time and a C++ compiler works: torch
installed first and the build run without isolation, `pip install --no-build-isolation -e .` (what
`make` does) or `pip wheel --no-build-isolation .`. Otherwise (pip's default isolated build has no
torch), or if the build fails, the package installs without it; the sources ship in the package
(`acl_kernels/csrc`) and are built just in time on the first CPU use where torch's C++ toolchain
works (acl_kernels/ops/contrastive/jit.py). `python -m acl_kernels.info` says which.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# train/ installs as the package acl_train (never as a top-level `train`, which would shadow a
# user's own train.py); acl_kernels and every subpackage of either are found, not listed.
package_dir = {"acl_train": "train"}
packages = find_packages(include=["acl_kernels", "acl_kernels.*"])
packages += ["acl_train"] + [f"acl_train.{p}" for p in find_packages("train")]

CSRC = sorted(os.path.join("csrc", f) for f in os.listdir("csrc")) if os.path.isdir("csrc") else []
SOURCES = [f for f in CSRC if f.endswith(".cpp")]
HEADERS = [f for f in CSRC if f.endswith(".h")]
# the compiler flags, shared with the just-in-time build (a stdlib-only module, loaded by path)
_jit_spec = importlib.util.spec_from_file_location(
    "acl_jit", os.path.join("acl_kernels", "ops", "contrastive", "jit.py")
)
jit = importlib.util.module_from_spec(_jit_spec)
_jit_spec.loader.exec_module(jit)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (acl_kernels/csrc) for the just-in-time build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "acl_kernels", "csrc")
        self.mkpath(target)
        for f in CSRC:
            self.copy_file(f, os.path.join(target, os.path.basename(f)))


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

    ext = CppExtension(
        "acl_kernels._C", SOURCES, depends=HEADERS, extra_compile_args=jit.FLAGS, extra_link_args=jit.LDFLAGS
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = native_extension() if SOURCES else ([], {})
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules,
      cmdclass={**cmdclass, "build_py": BuildPyWithSources})  # fmt: skip
