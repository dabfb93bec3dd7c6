"""Just-in-time build of the native CPU kernel, for installs without a prebuilt `acl_kernels._C`.

`pip install .` or `pip install git+...` build in an isolated environment without torch, so the
wheel has no native kernel. Its sources travel in the package (`acl_kernels/csrc`, setup.py), and
on the first CPU use they are compiled with torch's own C++ extension toolchain
(torch.utils.cpp_extension.load: a C++ compiler and ninja), once per torch version and source
version, in a cache directory (`$ACL_KERNELS_CACHE`, default `~/.cache/acl_kernels`). A file lock
makes the ranks of one machine (DDP) build it once: the first builds, the others wait and load.

Only the standard library at module level: setup.py reads FLAGS from this file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys

# -fno-trapping-math (as PyTorch builds): a select between two float expressions may evaluate both,
# so the tile loops vectorise; the AVX2 + FMA copy of those loops is picked at run time
# (csrc/contrastive_cpu.cpp), so no -march flag ties the build to the build machine.
FLAGS = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]


def source_dir() -> str | None:
    """csrc/ as installed in the package (a wheel) or beside it (a checkout), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, os.pardir, os.pardir, "csrc"), os.path.join(here, *[os.pardir] * 3, "csrc")):
        if os.path.isfile(os.path.join(d, "contrastive_cpu.cpp")):
            return os.path.normpath(d)
    return None


def problem() -> str | None:
    """Why no just-in-time build is possible here (None: it is)."""
    if source_dir() is None:
        return "the C++ sources (csrc/) are not in this install"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    if shutil.which("ninja") is None:
        return "torch's extension builder needs ninja (`pip install ninja`)"
    return None


def cache_dir() -> str:
    """The build directory of these sources for this torch: a new one whenever either changes."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode() + " ".join(FLAGS).encode())
    src = source_dir()
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            digest.update(name.encode() + f.read())
    root = os.environ.get("ACL_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "acl_kernels")
    return os.path.join(root, f"native-{digest.hexdigest()[:16]}")


@contextlib.contextmanager
def _locked(path: str):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build():
    """Compile (or load the cached build of) the native kernel and register it as acl_kernels._C."""
    from torch.utils import cpp_extension

    where = cache_dir()
    os.makedirs(where, exist_ok=True)
    src = source_dir()
    sources = [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".cpp")]
    with _locked(where + ".lock"):
        if not any(f.startswith("_C") and f.endswith(".so") for f in os.listdir(where)):
            print(f"acl_kernels: building the native CPU kernel just in time (once) in {where}", file=sys.stderr)
        module = cpp_extension.load(
            name="_C", sources=sources, extra_cflags=FLAGS, extra_ldflags=LDFLAGS, build_directory=where
        )
    sys.modules["acl_kernels._C"] = module
    return module
