"""Native backend: the C++ CPU kernel of the loss op (csrc/contrastive_cpu.cpp, built by setup.py as
`acl_kernels._C`), which registers itself for the CPU dispatch key of the op (op.py) when loaded.

Without a prebuilt `_C` (a wheel built with build isolation), the kernel is built just in time on
the first CPU use where torch's C++ toolchain works (jit.py). `HOW` says which: "prebuilt",
"just-in-time" or "missing"; `MISSING` is None when the kernel is (or can be) loaded, else why it
is not (no build and no toolchain, or a process that runs the Triton interpreter, whose kernels
then serve the op's CPU key).
"""

from __future__ import annotations

import os
import sys

from . import jit, op
from .problem import LossProblem


def _load() -> tuple[str, str | None]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "missing", "TRITON_INTERPRET=1: the Triton interpreter serves the op's CPU kernel in this process"
    try:
        import acl_kernels._C  # noqa: F401  (registers the CPU kernels)
    except ImportError as err:
        why = jit.problem()
        if why is None:
            return "just-in-time", None
        return "missing", (
            f"the C++ extension is not built ({err}) and cannot be built just in time: {why}; install with a "
            "C++ compiler present: `pip install --no-build-isolation .`"
        )
    return "prebuilt", None


HOW, MISSING = _load()
_BUILD_ERROR: str | None = None


def ensure_built() -> str | None:
    """Build the kernel just in time if this install needs it (once); None, or why it failed."""
    global _BUILD_ERROR
    if HOW == "just-in-time" and "acl_kernels._C" not in sys.modules and _BUILD_ERROR is None:
        try:
            jit.build()
        except Exception as err:  # compiler errors: the backend is then refused with the reason
            _BUILD_ERROR = f"the just-in-time build of the native kernel failed: {type(err).__name__}: {err}"[:2000]
    return _BUILD_ERROR


def refuses(p: LossProblem) -> list[str]:
    reasons = []
    if MISSING is not None:
        reasons.append(MISSING)
    if p.pos_mask is not None:
        reasons.append("an explicit positive mask (SupCon `mask=`) is served by impl='torch' (and 'reference')")
    if p.z.device.type != "cpu":
        reasons.append(f"tensors on {p.z.device.type} (the native kernel is the CPU one)")
    if not reasons and (failed := ensure_built()):
        reasons.append(failed)
    return reasons


# the op's kernel for CPU tensors is the C++ one: the op's entry points serve this backend as they are
native_loss, row_statistics, row_gradients = op.loss, op.row_statistics, op.row_gradients


__all__ = ["HOW", "MISSING", "ensure_built", "refuses", "native_loss", "row_statistics", "row_gradients"]
