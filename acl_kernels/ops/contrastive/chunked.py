"""Torch backend: the same algorithm as the fused kernels, in row chunks of plain PyTorch.

Forward keeps only per-anchor statistics (O(N)); backward recomputes each chunk of logits and
forms dl from those statistics, so peak memory is O(chunk * M) instead of O(N * M). Runs on any
device; it is the CPU path and a second implementation the Triton kernels are compared with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .naive import masked_exp, masked_row_max
from .problem import LossProblem, centre_block, compute_dtype, tile

# Elements of one [chunk, C + M] tile; a few such tiles are alive at once.
TILE_ELEMENTS = 1 << 22


def chunk_rows(n_anchor: int, n_cols: int) -> int:
    return max(1, min(n_anchor, TILE_ELEMENTS // max(n_cols, 1)))


def row_statistics(l: Tensor, g: Tensor, t: Tensor, pos: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of a tile; stats [c, 4] = (shift m, log-mass, 1/A, R) as README.md.

    softmax: m = max over the denominator, mass = sum_k g e^(l - m) over it, R unused.
    aligned: m = max over the negatives (0 without any), mass = sum over the negatives,
    R = sum_p (t_p / A) / (e^(l_p - m) + mass) (0 without negatives). A positive far above every
    negative only makes e^(l_p - m) large, never the mass small: nothing overflows or underflows
    into a NaN at tiny temperatures or for unnormalised features.
    """
    a = t.sum(1)
    inv_a = torch.where(a > 0, 1.0 / a.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    if mode == "softmax":
        den = g > 0
        m = masked_row_max(l, den)
        mass = (g * masked_exp(l - m[:, None], den)).sum(1)
        # mass == 0 only when the row has no denominator, hence no target and a zero loss
        log_mass = torch.where(mass > 0, torch.log(mass), 0.0)
        loss = torch.where(a > 0, m + log_mass - (t * l).sum(1) * inv_a, 0.0)
        return loss, torch.stack([m, log_mass, inv_a, torch.zeros_like(a)], 1)
    neg = (g > 0) & ~pos
    m = masked_row_max(l, neg)
    x = l - m[:, None]
    mass = (g * masked_exp(x, neg)).sum(1)
    log_mass = torch.log(mass)  # -inf without negatives: every log p is then 0
    log_p = -torch.nn.functional.softplus(log_mass[:, None] - x)
    loss = -torch.where(pos, t * log_p, 0.0).sum(1) * inv_a
    # 1 / (e^x + mass) = e^-logaddexp(x, log mass): 0, not inf / inf, for a dominant positive
    r = torch.where(pos, t * torch.exp(-torch.logaddexp(x, log_mass[:, None])), 0.0).sum(1) * inv_a
    r = torch.where(mass > 0, r, 0.0)
    return loss, torch.stack([m, log_mass, inv_a, r], 1)


def dlogits(l: Tensor, g: Tensor, t: Tensor, pos: Tensor, stats: Tensor, coef: Tensor, mode: str) -> Tensor:
    """dL/dl of a tile from the row statistics; coef [c] = upstream gradient * loss scale."""
    m, log_mass, inv_a, r = stats.unbind(1)
    coef = torch.where(inv_a > 0, coef, 0.0)[:, None]
    x = l - m[:, None]
    if mode == "softmax":
        p = g * masked_exp(x - log_mass[:, None], g > 0)
        return coef * (p - t * inv_a[:, None])
    # d log p / d l_p = mass / (e^x + mass) = sigmoid(log mass - x): 0 without negatives
    attract = -(t * inv_a[:, None]) * torch.sigmoid(log_mass[:, None] - x)
    repel = g * masked_exp(x, (g > 0) & ~pos) * r[:, None]
    return coef * torch.where(pos, attract, repel)


def _chunks(rows: slice, n_cols: int):
    step = chunk_rows(rows.stop - rows.start, n_cols)
    for start in range(rows.start, rows.stop, step):
        yield slice(start, min(start + step, rows.stop))


def anchor_statistics(p: LossProblem) -> tuple[Tensor, Tensor]:
    """Losses [a] (times loss_scale) and row statistics [a, 4] of the anchors p.anchors, a = their count."""
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    yc = p.contrast_labels()
    losses, stats = [], []
    for rows in _chunks(p.anchors, p.n_contrast + p.num_classes):
        tiles = tile(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
        loss, st = row_statistics(*tiles, p.mode)
        losses.append(loss)
        stats.append(st)
    return torch.cat(losses) * p.loss_scale, torch.cat(stats)


def grad_scatter(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Single process: (dL/d[z; queue] [M, d], dL/du) from the statistics of every anchor.

    One sweep over anchor chunks: each tile adds its row gradient to the anchors and its column
    gradient to every contrast row.
    """
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    yc = p.contrast_labels()
    coef = grad.to(dtype) * p.loss_scale
    dzc = torch.zeros_like(zc) if need_z else None
    du = torch.zeros_like(p.centre_logits, dtype=dtype) if need_u else None
    n_cls = p.num_classes
    for rows in _chunks(p.anchors, p.n_contrast + n_cls):
        tiles = tile(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
        dl = dlogits(*tiles, stats[rows], coef[rows], p.mode)
        if du is not None:
            du[rows] = dl[:, :n_cls] / p.supt
        if dzc is not None:
            dl_s = dl[:, n_cls:] / p.temperature
            dzc[rows] += dl_s @ zc
            dzc += dl_s.T @ zc[rows]
    return dzc, du


def grad_rows(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Process group: (dL/dz of the rows p.own_rows [n_own, d], dL/du of the anchors p.anchors).

    stats [n_anchor, 4] and grad [n_anchor] are those of every anchor of every rank. Row j's
    gradient is (1/T)[sum_k dl_jk z_k (j an anchor) + sum_i dl_ij z_i (i over all anchors)]: a row
    sweep over this process's anchors and a column sweep of all anchors against this process's
    rows; dl_ij needs only anchor i's statistics and upstream gradient, so nothing N x N is sent.
    Queue rows get no gradient here.
    """
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    yc = p.contrast_labels()
    coef = grad.to(dtype) * p.loss_scale
    own, cols = p.anchors, p.own_rows
    n_cls = p.num_classes
    dz = zc.new_zeros(cols.shape[0], zc.shape[1]) if need_z else None
    du = torch.zeros_like(p.centre_logits, dtype=dtype) if need_u else None
    if du is not None or dz is not None:
        # this process's anchors come first among its rows
        for rows in _chunks(own, p.n_contrast + n_cls):
            here = slice(rows.start - own.start, rows.stop - own.start)
            tiles = tile(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
            dl = dlogits(*tiles, stats[rows], coef[rows], p.mode)
            if du is not None:
                du[here] = dl[:, :n_cls] / p.supt
            if dz is not None:
                dz[here] += (dl[:, n_cls:] / p.temperature) @ zc
    if dz is not None:
        z_own, y_own = zc[cols], yc[cols]
        for rows in _chunks(slice(0, p.n_anchor), cols.shape[0]):
            tiles = tile(p, rows, zc[rows], z_own, y_own, None, cols=cols)
            dl = dlogits(*tiles, stats[rows], coef[rows], p.mode)
            dz += (dl / p.temperature).T @ zc[rows]
    return dz, du


class ChunkedContrastiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, queue: Tensor | None, centre_logits: Tensor | None, p: LossProblem):
        losses, stats = anchor_statistics(p)
        ctx.problem = p
        ctx.save_for_backward(stats)
        return losses

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (stats,) = ctx.saved_tensors
        p: LossProblem = ctx.problem
        need_z = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dzc, du = grad_scatter(p, stats, grad_loss, need_z, ctx.needs_input_grad[2])
        dz = dq = None
        if dzc is not None:
            n = p.n_rows
            dz = dzc[:n].to(p.z.dtype) if ctx.needs_input_grad[0] else None
            dq = dzc[n:].to(p.queue.dtype) if ctx.needs_input_grad[1] else None
        du = du.to(p.centre_logits.dtype) if du is not None else None
        return dz, dq, du, None


def chunked_loss(p: LossProblem) -> Tensor:
    """[n_anchor] per-anchor losses (already multiplied by temperature / base_temperature)."""
    assert not p.distributed, "a process group goes through acl_kernels.distributed"
    return ChunkedContrastiveFunction.apply(p.z, p.queue, p.centre_logits, p)
