"""`python -m acl_kernels.info`: the loss backends this install has, and why any one is missing."""

from __future__ import annotations

import shutil
import sys
from importlib import metadata

import torch

from .dispatch import backends

WHERE = {
    "triton": "CUDA tensors (CPU under TRITON_INTERPRET=1)",
    "native": "CPU tensors (C++ kernel, OpenMP)",
    "torch": "any device (row chunks of PyTorch)",
    "reference": "any device (whole logit matrix; the test oracle)",
}


def report() -> list[str]:
    try:
        version = metadata.version("acl-kernels")
    except metadata.PackageNotFoundError:
        version = "not installed"
    lines = [
        f"acl-kernels {version}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
        f"CUDA available: {torch.cuda.is_available()}",
        "backends (impl='auto' tries them in this order):",
    ]
    for name, backend in backends().items():
        status = "present" if backend.missing is None else f"MISSING: {backend.missing}"
        lines.append(f"  {name:<10} {WHERE[name]:<48} {status}")
    native = sys.modules.get("acl_kernels._C")
    if native is not None:
        lines.append(f"native kernel: {native.__file__}; tile loops: {native.isa()} instruction set")
    elif shutil.which("c++") is None and shutil.which("g++") is None:
        lines.append("no C++ compiler on PATH: the install could not build the native kernel")
    return lines


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
