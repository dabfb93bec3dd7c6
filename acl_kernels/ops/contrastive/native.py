"""Native backend: the C++ CPU kernel of the loss op (csrc/contrastive_cpu.cpp, built by setup.py as
`acl_kernels._C`), which registers itself for the CPU dispatch key of the op (op.py) when loaded.

`MISSING` is None when the kernel is loaded, else why it is not (no build, or a process that runs
the Triton interpreter, whose kernels then serve the op's CPU key).
"""

from __future__ import annotations

import os

from . import op
from .problem import LossProblem


def _load() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter serves the op's CPU kernel in this process"
    try:
        import acl_kernels._C  # noqa: F401  (registers the CPU kernels)
    except ImportError as err:
        return (
            f"the C++ extension is not built ({err}); install with a C++ compiler present: "
            "`pip install --no-build-isolation -e .`"
        )
    return None


MISSING = _load()


def refuses(p: LossProblem) -> list[str]:
    reasons = []
    if MISSING is not None:
        reasons.append(MISSING)
    if p.pos_mask is not None:
        reasons.append("an explicit positive mask (SupCon `mask=`) is served by impl='torch' (and 'reference')")
    if p.z.device.type != "cpu":
        reasons.append(f"tensors on {p.z.device.type} (the native kernel is the CPU one)")
    return reasons


# the op's kernel for CPU tensors is the C++ one: the op's entry points serve this backend as they are
native_loss, row_statistics, row_gradients = op.loss, op.row_statistics, op.row_gradients


__all__ = ["MISSING", "refuses", "native_loss", "row_statistics", "row_gradients"]
