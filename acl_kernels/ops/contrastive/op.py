"""The loss op: one schema per direction, a kernel per device.

`acl_kernels::contrastive_fwd` and `acl_kernels::contrastive_bwd` are defined here with their fake
(meta) implementations and the autograd formula; the device kernels register under them:

- CUDA: the Triton launchers (`triton_backend.py` calls `register_kernels("CUDA", fwd, bwd)`; under
  `TRITON_INTERPRET=1` it registers them for CPU instead);
- CPU: the native C++ kernel (`csrc/contrastive_cpu.cpp`, loaded by `native.py`), registered from C++
  with `TORCH_LIBRARY_IMPL(acl_kernels, CPU, m)`.

`torch.ops.acl_kernels.contrastive_fwd(...)` then runs the kernel of the tensors' device.

Contract (every kernel): the forward returns `(loss [a], stats [a, 4])` of the anchors
`[anchor_start, anchor_end)` (default all `n_anchor`; `anchor_end = -1` means `n_anchor`), losses
without the `loss_scale` factor, in fp32 (fp64 for fp64 features, where a kernel accepts them).
`stats` = `(m, log_mass, 1/A, R)` per anchor with `m` and `log_mass` in log2 units (log2 of the
row shift and of the mass; README.md gives them in natural-log units: multiply by ln 2), `1/A` and
`R` as README.md. The backward takes the upstream gradient of those losses and the stats of all
`n_anchor` anchors and returns `(dz, dqueue, dcentre_logits)`, an empty tensor for each gradient not
asked for. A process group passes `out_rows` (global rows whose gradient it wants; `dz` is then
`[len(out_rows), d]`) and its slice of anchors (the rows `centre_logits` holds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .problem import LossProblem, refuse_double_backward

_LIB = torch.library.Library("acl_kernels", "FRAGMENT")
_FWD_SCHEMA = (
    "contrastive_fwd(Tensor z, Tensor labels, Tensor? queue, Tensor? centre_logits, Tensor? log_prior, "
    "Tensor w_same, Tensor w_other, int n_anchor, bool aligned, float temperature, float alpha, float beta, "
    "float supt, float smooth, int anchor_start=0, int anchor_end=-1) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "contrastive_bwd(Tensor grad_loss, Tensor stats, Tensor z, Tensor labels, Tensor? queue, Tensor? centre_logits, "
    "Tensor? log_prior, Tensor w_same, Tensor w_other, int n_anchor, bool aligned, float temperature, float alpha, "
    "float beta, float supt, float smooth, bool need_z, bool need_queue, bool need_centres, Tensor? out_rows=None, "
    "int anchor_start=0, int anchor_end=-1) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(_FWD_SCHEMA)
_LIB.define(_BWD_SCHEMA)
contrastive_fwd = torch.ops.acl_kernels.contrastive_fwd.default
contrastive_bwd = torch.ops.acl_kernels.contrastive_bwd.default
# the problem arguments shared by both ops, after fwd's z / bwd's (grad_loss, stats, z)
_ARGS = ("labels", "queue", "centre_logits", "log_prior", "w_same", "w_other", "n_anchor", "aligned",
         "temperature", "alpha", "beta", "supt", "smooth")  # fmt: skip


def problem_args(p: LossProblem) -> tuple:
    """The op's problem arguments of `p`: (z, labels, ..., smooth), 14 values."""
    return (
        p.z, p.contrast_labels(), p.queue, p.centre_logits, p.log_prior, p.w_same, p.w_other, p.n_anchor,
        p.mode == "aligned", float(p.temperature), float(p.alpha), float(p.beta), float(p.supt), float(p.smooth),
    )  # fmt: skip


def anchor_slice(n_anchor: int, start: int, end: int) -> slice:
    return slice(start, n_anchor if end < 0 else end)


def stats_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


@torch.library.register_fake("acl_kernels::contrastive_fwd")
def _(z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor, aligned, temperature, alpha, beta,
      supt, smooth, anchor_start=0, anchor_end=-1):  # fmt: skip
    rows = anchor_slice(n_anchor, anchor_start, anchor_end)
    n = rows.stop - rows.start
    return z.new_empty((n,), dtype=stats_dtype(z)), z.new_empty((n, 4), dtype=stats_dtype(z))


@torch.library.register_fake("acl_kernels::contrastive_bwd")
def _(grad_loss, stats, z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor, aligned,
      temperature, alpha, beta, supt, smooth, need_z, need_queue, need_centres, out_rows=None, anchor_start=0,
      anchor_end=-1):  # fmt: skip
    # contiguous like the real outputs (empty_like would copy the strides of a non-contiguous input)
    rows = z.shape[0] if out_rows is None else out_rows.shape[0]
    dz = z.new_empty((rows, z.shape[1])) if need_z else z.new_empty((0,))
    dq = z.new_empty(queue.shape) if need_queue else z.new_empty((0,))
    du = centre_logits.new_empty(centre_logits.shape) if need_centres else z.new_empty((0,))
    return dz, dq, du


def _setup_context(ctx, inputs, output):
    z, *rest = inputs
    args = dict(zip(_ARGS, rest))
    _, stats = output
    ctx.save_for_backward(stats, z, args["labels"], args["queue"], args["centre_logits"], args["log_prior"],
                          args["w_same"], args["w_other"])  # fmt: skip
    ctx.scalars = tuple(args[k] for k in _ARGS[6:])
    start, end = (list(rest[len(_ARGS) :]) + [0, -1])[:2]
    ctx.partial = start != 0 or end not in (-1, args["n_anchor"])


def _backward(ctx, grad_loss, grad_stats):
    if ctx.partial:
        raise RuntimeError("contrastive_fwd over an anchor range is not differentiable: a process group's "
                           "gradient goes through acl_kernels.distributed")  # fmt: skip
    refuse_double_backward("native/triton")
    stats, z, labels, queue, centre_logits, log_prior, w_same, w_other = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_z, need_q, need_u = need[0], need[2] and queue is not None, need[3] and centre_logits is not None
    n_inputs = len(need)
    if not (need_z or need_q or need_u):
        return (None,) * n_inputs
    dz, dq, du = contrastive_bwd(grad_loss, stats, z, labels, queue, centre_logits, log_prior, w_same, w_other,
                                 *ctx.scalars, need_z, need_q, need_u)  # fmt: skip
    grads = (dz if need_z else None, None, dq if need_q else None, du if need_u else None)
    return grads + (None,) * (n_inputs - len(grads))


torch.library.register_autograd("acl_kernels::contrastive_fwd", _backward, setup_context=_setup_context)


def register_kernels(dispatch_key: str, fwd: Callable, bwd: Callable) -> None:
    """Register Python launchers as the two ops' kernels for `dispatch_key` ("CUDA", "CPU").

    fwd(z, labels, ..., smooth, anchors=slice) -> (loss, stats); bwd(grad, stats, z, labels, ..., smooth,
    need_z, need_queue, need_centres, out_rows=..., anchors=slice) -> (dz | None, dq | None, du | None).
    """

    def fwd_kernel(z, *args):
        *problem, start, end = (args + (0, -1))[: len(_ARGS) + 2]
        return fwd(z, *problem, anchors=anchor_slice(problem[6], start, end))

    def bwd_kernel(grad_loss, stats, z, *args):
        problem, need = args[: len(_ARGS)], args[len(_ARGS) : len(_ARGS) + 3]
        out_rows, start, end = (args[len(_ARGS) + 3 :] + (None, 0, -1))[:3]
        dz, dq, du = bwd(grad_loss, stats, z, *problem, *need, out_rows=out_rows,
                         anchors=anchor_slice(problem[6], start, end))  # fmt: skip
        none = z.new_empty((0,))
        return tuple(none.clone() if x is None else x for x in (dz, dq, du))

    _LIB.impl("contrastive_fwd", fwd_kernel, dispatch_key)
    _LIB.impl("contrastive_bwd", bwd_kernel, dispatch_key)


# ---- what a backend built on the op computes (the Triton and native backends) -----------------


def loss(p: LossProblem) -> Tensor:
    """[n_anchor] per-anchor losses (times loss_scale) by the kernel of p's device, differentiable in
    z, queue and centre_logits through the op's autograd."""
    assert not p.distributed, "a process group goes through acl_kernels.distributed"
    losses, _ = contrastive_fwd(*problem_args(p))
    return losses * p.loss_scale


def row_statistics(p: LossProblem) -> tuple[Tensor, Tensor]:
    """RowStats.forward: (losses [a] times loss_scale, stats [a, 4]) of the anchors p.anchors against
    all M columns (p.centre_logits holds those anchors' rows)."""
    losses, stats = contrastive_fwd(*problem_args(p), p.anchors.start, p.anchors.stop)
    return losses * p.loss_scale, stats


def row_gradients(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """RowStats.backward: (dL/dz of the rows p.own_rows, dL/du of the anchors p.anchors) from every
    rank's anchors' stats and upstream gradients: the row term of the own anchors and the column term
    of all anchors against the own rows, one sweep of the kernel over the own rows."""
    need_u = need_u and p.centre_logits is not None
    coef = grad.to(stats.dtype) * p.loss_scale
    dz, _, du = contrastive_bwd(
        coef, stats, *problem_args(p), need_z, False, need_u, p.own_rows, p.anchors.start, p.anchors.stop
    )
    return (dz if need_z else None), (du if need_u else None)
