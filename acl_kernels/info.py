"""`python -m acl_kernels.info`: the loss backends this install has, and why any one is missing."""

from __future__ import annotations

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
    lines.append(native_line())
    return lines


def native_line() -> str:
    """How this install gets the native kernel: prebuilt, just in time (and whether built yet), or missing."""
    from .ops.contrastive import jit, native

    module = sys.modules.get("acl_kernels._C")
    where = f"{module.__file__}; tile loops: {module.isa()} instruction set" if module is not None else ""
    if native.HOW == "prebuilt":
        return f"native kernel: prebuilt, {where}"
    if native.HOW == "just-in-time":
        state = f"built, {where}" if module is not None else "built on the first CPU use"
        return f"native kernel: just-in-time (no prebuilt acl_kernels._C; {state}; cache {jit.cache_dir()})"
    return f"native kernel: missing ({native.MISSING})"


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
