"""Native backend: the C++ CPU kernel of the loss op (csrc/contrastive_cpu.cpp, built by setup.py as
`acl_kernels._C`), which registers itself for the CPU dispatch key of the op (op.py) when loaded.

`MISSING` is None when the kernel is loaded, else why it is not (no build, or a process that runs
the Triton interpreter, whose kernels then serve the op's CPU key).
"""

from __future__ import annotations

import os

from torch import Tensor

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


def native_loss(p: LossProblem) -> Tensor:
    """[n_anchor] per-anchor losses (times loss_scale), differentiable through the op's autograd."""
    assert not p.distributed, "a process group goes through acl_kernels.distributed"
    loss, _ = op.contrastive_fwd(*op.problem_args(p))
    return loss * p.loss_scale


def row_statistics(p: LossProblem) -> tuple[Tensor, Tensor]:
    """RowStats.forward: (losses [a] times loss_scale, stats [a, 4]) of the anchors p.anchors."""
    loss, stats = op.contrastive_fwd(*op.problem_args(p), p.anchors.start, p.anchors.stop)
    return loss * p.loss_scale, stats


def row_gradients(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """RowStats.backward: (dL/dz of the rows p.own_rows, dL/du of the anchors p.anchors) from every
    rank's anchors' stats and upstream gradients; one sweep of the kernel over the own rows."""
    need_u = need_u and p.centre_logits is not None
    coef = grad.to(stats.dtype) * p.loss_scale
    dz, _, du = op.contrastive_bwd(
        coef, stats, *op.problem_args(p), need_z, False, need_u, p.own_rows, p.anchors.start, p.anchors.stop
    )
    return (dz if need_z else None), (du if need_u else None)


__all__ = ["MISSING", "refuses", "native_loss", "row_statistics", "row_gradients"]
