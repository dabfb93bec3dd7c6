"""Torch backend: the same algorithm as the fused kernels, in row chunks of plain PyTorch.

Forward keeps only per-anchor statistics (O(N)); backward recomputes each chunk of logits and
forms dl from those statistics, so peak memory is O(chunk * M) instead of O(N * M). Runs on any
device; it is the CPU path and a second implementation the Triton kernels are compared with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import LossProblem, centre_block, compute_dtype, refuse_double_backward, weights_into

# Elements of one [chunk, C + M] tile (8 MiB in fp32); a workspace holds about seven.
TILE_ELEMENTS = 1 << 21


def chunk_rows(n_anchor: int, n_cols: int) -> int:
    return max(1, min(n_anchor, TILE_ELEMENTS // max(n_cols, 1)))


class Workspace:
    """The [chunk, C + M] tiles of one forward or backward, allocated once and reused by every row
    chunk: out= and in-place ops only. Fresh 16 MiB tensors per chunk would make glibc's heap keep
    about 1 GiB of freed memory (process RSS) at N = 16384 even though little is live."""

    def __init__(self, rows: int, n_cls: int, n_cols: int, dtype: torch.dtype, device: torch.device):
        width = n_cls + n_cols

        def new(kind=dtype, w=width):
            return torch.empty(rows, w, dtype=kind, device=device)

        self.n_cls = n_cls
        self.l, self.g, self.t, self.x, self.y = new(), new(), new(), new(), new()
        self.pos, self.mask, self.same = new(torch.bool), new(torch.bool), new(torch.bool, n_cols)
        self.sim = new(w=n_cols) if n_cls else None  # sample-block scratch: weights, then the matmul's output
        self.neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)

    def fill(self, p: LossProblem, rows: slice, za: Tensor, zc: Tensor, yc: Tensor, centre: Tensor | None,
             cols: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Logits and weights of the anchor rows `rows` (as problem.tile) in this workspace's buffers."""
        c = rows.stop - rows.start
        l, g, t, pos = self.l[:c], self.g[:c], self.t[:c], self.pos[:c]
        weights_into(p, rows, yc, g, t, pos, self.same[:c], None if self.sim is None else self.sim[:c], cols)
        if centre is None:
            torch.mm(za, zc.T, out=l)
            l.div_(p.temperature)
        else:
            sim = self.sim[:c]
            l[:, self.n_cls :].copy_(torch.mm(za, zc.T, out=sim)).div_(p.temperature)
            l[:, : self.n_cls].copy_(centre)
        return l, g, t, pos

    def shifted_max(self, l: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """(m, x): m [c] = the row max of l over `keep` (0 for rows with nothing kept) and x = l - m
        where `keep`, -inf elsewhere (so exp(x) is masked before the exp)."""
        x = self.x[: l.shape[0]]
        torch.where(keep, l, self.neg_inf, out=x)
        m = x.amax(1)
        m = torch.where(torch.isfinite(m), m, 0.0)
        x.sub_(m[:, None])
        return m, x


def row_statistics(ws: Workspace, l: Tensor, g: Tensor, t: Tensor, pos: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of a tile; stats [c, 4] = (shift m, log-mass, 1/A, R) as README.md.

    softmax: m = max over the denominator, mass = sum_k g e^(l - m) over it, R unused.
    aligned: m = max over the negatives (0 without any), mass = sum over the negatives,
    R = sum_p (t_p / A) / (e^(l_p - m) + mass) (0 without negatives). Every excluded column is
    masked before its exp; a positive far above every negative only makes e^(l_p - m) large,
    never the mass small: nothing overflows into a NaN at tiny temperatures or for unnormalised rows.
    """
    c = l.shape[0]
    mask, y = ws.mask[:c], ws.y[:c]
    a = t.sum(1)
    inv_a = torch.where(a > 0, 1.0 / a.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    if mode == "softmax":
        m, x = ws.shifted_max(l, torch.gt(g, 0, out=mask))
        mass = x.exp_().mul_(g).sum(1)
        # mass == 0 only when the row has no denominator, hence no target and a zero loss
        log_mass = torch.where(mass == 0, 0.0, torch.log(mass))  # a NaN mass stays NaN
        t_dot_l = torch.mul(t, l, out=y).sum(1)
        loss = torch.where(a > 0, m + log_mass - t_dot_l * inv_a, 0.0)
        return loss, torch.stack([m, log_mass, inv_a, torch.zeros_like(a)], 1)
    neg = torch.gt(g, 0, out=mask).masked_fill_(pos, False)
    m, x = ws.shifted_max(l, neg)
    mass = x.exp_().mul_(g).sum(1)
    log_mass = torch.log(mass)  # -inf without negatives: every log p is then 0
    torch.sub(l, m[:, None], out=x)  # x = l - m on every column now
    sp = torch.logaddexp(torch.sub(log_mass[:, None], x, out=y), ws.zero, out=y)  # softplus = -log p
    not_pos = torch.logical_not(pos, out=mask)
    # 1 / (e^x + mass) = e^-(x + sp): 0, not inf / inf, for a dominant positive
    r = x.add_(sp).neg_().exp_().masked_fill_(not_pos, 0.0).mul_(t).sum(1) * inv_a
    r = torch.where(mass > 0, r, 0.0)
    loss = sp.masked_fill_(not_pos, 0.0).mul_(t).sum(1) * inv_a
    return loss, torch.stack([m, log_mass, inv_a, r], 1)


def dlogits(ws: Workspace, l: Tensor, g: Tensor, t: Tensor, pos: Tensor, stats: Tensor, coef: Tensor, mode: str):
    """dL/dl [c, C + M] of a tile from the row statistics (in the workspace's buffer x);
    coef [c] = upstream gradient * loss scale."""
    c = l.shape[0]
    mask, x, y = ws.mask[:c], ws.x[:c], ws.y[:c]
    m, log_mass, inv_a, r = stats.unbind(1)
    coef = torch.where(inv_a > 0, coef, 0.0)[:, None]
    if mode == "softmax":
        torch.where(torch.gt(g, 0, out=mask), l, ws.neg_inf, out=x)
        prob = x.sub_((m + log_mass)[:, None]).exp_().mul_(g)
        return prob.sub_(torch.mul(t, inv_a[:, None], out=y)).mul_(coef)
    torch.sub(l, m[:, None], out=x)
    # d log p / d l_p = mass / (e^x + mass) = sigmoid(log mass - x): 0 without negatives
    attract = torch.sub(log_mass[:, None], x, out=y).sigmoid_().mul_(t).mul_(-inv_a[:, None])
    neg = torch.gt(g, 0, out=mask).masked_fill_(pos, False)
    repel = torch.where(neg, x, ws.neg_inf, out=x).exp_().mul_(g).mul_(r[:, None])
    return torch.where(pos, attract, repel, out=x).mul_(coef)


def _chunks(rows: slice, n_cols: int):
    step = chunk_rows(rows.stop - rows.start, n_cols)
    for start in range(rows.start, rows.stop, step):
        yield slice(start, min(start + step, rows.stop))


def _workspace(p: LossProblem, rows: slice, n_cols: int, n_cls: int, dtype: torch.dtype) -> Workspace:
    return Workspace(chunk_rows(rows.stop - rows.start, n_cols + n_cls), n_cls, n_cols, dtype, p.z.device)


def anchor_statistics(p: LossProblem) -> tuple[Tensor, Tensor]:
    """Losses [a] (times loss_scale) and row statistics [a, 4] of the anchors p.anchors, a = their count."""
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    yc = p.contrast_labels()
    ws = _workspace(p, p.anchors, p.n_contrast, p.num_classes, dtype)
    losses, stats = [], []
    for rows in _chunks(p.anchors, p.n_contrast + p.num_classes):
        tiles = ws.fill(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
        loss, st = row_statistics(ws, *tiles, p.mode)
        losses.append(loss)
        stats.append(st)
    return torch.cat(losses) * p.loss_scale, torch.cat(stats)


def grad_scatter(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Single process: (dL/d[z; queue] [M, d], dL/du) from the statistics of every anchor.

    One sweep over anchor chunks: each tile adds its row gradient to the anchors and its column
    gradient to every contrast row (in place: nothing [M, d] is allocated per chunk).
    """
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    yc = p.contrast_labels()
    coef = grad.to(dtype) * p.loss_scale
    dzc = torch.zeros_like(zc) if need_z else None
    du = torch.zeros_like(p.centre_logits, dtype=dtype) if need_u else None
    n_cls = p.num_classes
    ws = _workspace(p, p.anchors, p.n_contrast, n_cls, dtype)
    for rows in _chunks(p.anchors, p.n_contrast + n_cls):
        tiles = ws.fill(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
        dl = dlogits(ws, *tiles, stats[rows], coef[rows], p.mode)
        if du is not None:
            du[rows] = dl[:, :n_cls] / p.supt
        if dzc is not None:
            dl_s = dl[:, n_cls:].div_(p.temperature)
            dzc[rows].addmm_(dl_s, zc)
            dzc.addmm_(dl_s.T, zc[rows])
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
        ws = _workspace(p, own, p.n_contrast, n_cls, dtype)
        for rows in _chunks(own, p.n_contrast + n_cls):
            here = slice(rows.start - own.start, rows.stop - own.start)
            tiles = ws.fill(p, rows, zc[rows], zc, yc, centre_block(p, rows, dtype))
            dl = dlogits(ws, *tiles, stats[rows], coef[rows], p.mode)
            if du is not None:
                du[here] = dl[:, :n_cls] / p.supt
            if dz is not None:
                dz[here].addmm_(dl[:, n_cls:].div_(p.temperature), zc)
    if dz is not None:
        z_own, y_own = zc[cols], yc[cols]
        every = slice(0, p.n_anchor)
        ws = _workspace(p, every, cols.shape[0], 0, dtype)
        for rows in _chunks(every, cols.shape[0]):
            tiles = ws.fill(p, rows, zc[rows], z_own, y_own, None, cols=cols)
            dl = dlogits(ws, *tiles, stats[rows], coef[rows], p.mode)
            dz.addmm_(dl.div_(p.temperature).T, zc[rows])
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
        refuse_double_backward("torch")
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
