"""Backend choice: each backend says why it refuses a problem; `auto` takes the first that accepts.

The environment variable ACL_KERNELS_IMPL (reference | torch | native | triton) forces a backend for calls
made with impl="auto"; an explicit impl= always wins.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .ops.contrastive.chunked import anchor_statistics, chunked_loss, grad_rows
from .ops.contrastive.naive import reference_loss
from .ops.contrastive.problem import LossProblem

ENV_VAR = "ACL_KERNELS_IMPL"


class RowStats(NamedTuple):
    """The per-row-statistics interface with which a backend serves a process group in O(N d) traffic.

    forward(p) -> (losses [a] times loss_scale, stats [a, S]) of the anchors p.anchors;
    backward(p, stats [n_anchor, S], grad [n_anchor], need_z, need_u) -> (dL/dz of p.own_rows,
    dL/du of p.anchors), from the statistics and upstream gradients of every rank's anchors.
    """

    forward: Callable[[LossProblem], tuple[Tensor, Tensor]]
    backward: Callable[[LossProblem, Tensor, Tensor, bool, bool], tuple[Tensor | None, Tensor | None]]


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[LossProblem], Tensor]  # -> per-anchor losses of p.anchors
    refuse: Callable[[LossProblem], list[str]]  # reasons it cannot serve the problem; [] = accepts
    # How it serves a process group: through `row_stats`, or (`autograd_exact`: run() differentiates
    # through p.z for any p.anchors) through a differentiable all-gather of the rows, whose backward
    # all-reduces an N x d gradient: fine for the oracle, not for training.
    row_stats: RowStats | None = None
    autograd_exact: bool = False
    missing: str | None = None  # why the backend is absent from this install (None: present)


def _refusals(backend: Backend, p: LossProblem) -> list[str]:
    reasons = list(backend.refuse(p))
    if p.distributed and backend.row_stats is None and not backend.autograd_exact:
        reasons.append(
            f"impl={backend.name!r} does not support process_group yet (it needs the RowStats interface "
            "of acl_kernels.dispatch); use impl='torch'"
        )
    return reasons


def _triton_backend() -> Backend:
    try:
        from .ops.contrastive import triton_backend
    except ImportError as err:  # triton missing, or a platform without it
        reason = f"Triton is unavailable ({err})"
        return Backend("triton", _unavailable(reason), lambda p: [reason], missing=reason)
    return Backend(
        "triton",
        triton_backend.triton_loss,
        triton_backend.refuses,
        RowStats(triton_backend.row_statistics, triton_backend.row_gradients),
    )


def _native_backend() -> Backend:
    from .ops.contrastive import native

    row_stats = RowStats(native.row_statistics, native.row_gradients)
    return Backend("native", native.native_loss, native.refuses, row_stats, missing=native.MISSING)


def _unavailable(reason: str) -> Callable[[LossProblem], Tensor]:
    def run(p: LossProblem) -> Tensor:
        raise RuntimeError(reason)

    return run


_BACKENDS: dict[str, Backend] | None = None


def backends() -> dict[str, Backend]:
    """All backends, in the order `auto` tries them."""
    global _BACKENDS
    if _BACKENDS is None:
        _BACKENDS = {
            "triton": _triton_backend(),
            "native": _native_backend(),
            "torch": Backend("torch", chunked_loss, lambda p: [], RowStats(anchor_statistics, grad_rows)),
            "reference": Backend("reference", reference_loss, lambda p: [], autograd_exact=True),
        }
    return _BACKENDS


# Backends that can run on CPU tensors (the Triton interpreter) but that auto keeps for GPUs.
GPU_ONLY_FOR_AUTO = ("triton",)
IMPLS = ("auto", "triton", "native", "torch", "reference")


def select(impl: str, p: LossProblem) -> Backend:
    """The backend that serves `p` for the request `impl` (auto | triton | native | torch | reference)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and os.environ.get(ENV_VAR):
        impl = os.environ[ENV_VAR]
        if impl not in IMPLS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {IMPLS}, got {impl!r}")
    table = backends()
    if impl != "auto":
        reasons = _refusals(table[impl], p)
        if reasons:
            raise ValueError(f"impl={impl!r} cannot compute this loss: " + "; ".join(reasons))
        return table[impl]
    refusals = {}
    for name, backend in table.items():
        reasons = _refusals(backend, p)
        if name in GPU_ONLY_FOR_AUTO and not p.z.is_cuda:
            reasons = reasons or [f"auto uses {name} for CUDA tensors only"]
        if not reasons:
            return backend
        refusals[name] = reasons
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in refusals.items())
    raise ValueError(f"no backend can compute this loss ({detail})")
