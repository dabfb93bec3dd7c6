"""The normalised loss problem every backend receives, and the weights of one tile of it.

The functional core (`acl_kernels.functional`) checks the user's arguments, resolves the presets'
conventions and builds a `LossProblem`; backends only compute. Notation follows README.md here:
anchors are the first `n_anchor` rows of `z`; contrast columns are the `M = N + K` rows of
`[z; queue]`, optionally preceded by `C` class-centre columns.

Under a process group (acl_kernels.distributed) `z` holds the rows of every rank, anchors of all
ranks first; `anchor_rows` are the anchors whose losses this process computes (their centre
logits are the ones `centre_logits` holds) and `own_rows` the global indices of this process's
rows, whose gradient it computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("softmax", "aligned")


@dataclass
class LossProblem:
    z: Tensor  # [N, d] in-batch rows (fp32/fp16/bf16/fp64); rows [:n_anchor] are the anchors
    labels: Tensor  # [N] int64
    n_anchor: int
    queue: Tensor | None  # [K, d] extra contrast rows, same dtype as z
    queue_labels: Tensor | None  # [K] int64
    centre_logits: Tensor | None  # [anchors, C] raw classifier logits u of the anchors p.anchors
    log_prior: Tensor | None  # [C] float32, added to u before dividing by supt
    num_classes: int  # C of the centre block (0 when there is none)
    mode: str  # "softmax" | "aligned"
    temperature: float
    loss_scale: float  # temperature / base_temperature
    alpha: float
    beta: float
    supt: float
    smooth: float
    w_other: Tensor  # [M] fp32: denominator weight g_ij of sample column j when y_j != y_i
    w_same: Tensor  # [M] fp32: denominator weight g_ij of sample column j when y_j == y_i (j != i)
    # explicit positive weights: entry (i, j) = pos_mask[i % rows, j % cols], i.e. [n_anchor, M], or a
    # [B, B] block tiled over the views (SupCon `mask=`); backends read it tile by tile
    pos_mask: Tensor | None = None
    anchor_rows: slice | None = None  # anchors computed here (default all); centre_logits holds their rows
    own_rows: Tensor | None = None  # [n_own] int64 global rows of this process (None: single process)

    @property
    def anchors(self) -> slice:
        """The anchor rows whose losses this process computes."""
        return slice(0, self.n_anchor) if self.anchor_rows is None else self.anchor_rows

    @property
    def distributed(self) -> bool:
        return self.own_rows is not None

    @property
    def n_rows(self) -> int:
        return self.z.shape[0]

    @property
    def n_contrast(self) -> int:
        return self.n_rows + (0 if self.queue is None else self.queue.shape[0])

    @property
    def has_centres(self) -> bool:
        return self.centre_logits is not None

    def contrast(self, dtype: torch.dtype | None = None) -> Tensor:
        """[M, d] contrast rows `[z; queue]`."""
        rows = self.z if self.queue is None else torch.cat([self.z, self.queue.to(self.z.dtype)])
        return rows if dtype is None else rows.to(dtype)

    def contrast_labels(self) -> Tensor:
        """[M] int64 labels of the contrast rows."""
        return self.labels if self.queue_labels is None else torch.cat([self.labels, self.queue_labels])


def refuse_double_backward(backend: str) -> None:
    """The fused backwards have no derivative of their own: called at the start of a backward, raise
    where autograd would record one (create_graph=True), instead of a silent zero second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {backend} backend's gradient is not differentiable (create_graph=True, double backward); "
            "use impl='reference' for second derivatives"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile(
    p: LossProblem,
    rows: slice,
    za: Tensor,
    zc: Tensor,
    yc: Tensor,
    centre: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logits and weights of anchor rows `rows` against every column, as fresh tensors.

    za: [c, d] the anchors of `rows`, zc: [M, d] contrast rows, yc: [M] their labels, centre: the
    [c, C] centre logits of these anchors (u + log prior) / supt, or None. Returns, each
    [c, C + M]: logits `l` (differentiable in za, zc and centre), denominator weights `g` (0 = not
    in the denominator), target weights `t` and the positive indicator `pos` (bool). Centre
    columns come first.
    """
    c, width = za.shape[0], zc.shape[0] + (0 if centre is None else centre.shape[1])
    g, t, scratch = za.new_empty(c, width), za.new_empty(c, width), za.new_empty(c, zc.shape[0])
    pos, same = (torch.empty(c, w, dtype=torch.bool, device=za.device) for w in (width, zc.shape[0]))
    weights_into(p, rows, yc, g, t, pos, same, scratch)
    l_s = (za @ zc.T) / p.temperature
    return (l_s if centre is None else torch.cat([centre, l_s], 1)), g, t, pos


def weights_into(
    p: LossProblem,
    rows: slice,
    yc: Tensor,
    g: Tensor,
    t: Tensor,
    pos: Tensor,
    same: Tensor,
    scratch: Tensor | None,
    cols: Tensor | None = None,
) -> None:
    """Fill, in place, the weights of anchor rows `rows` against C centre columns then the sample
    columns: g, t [c, C + M'] (float), pos [c, C + M'] (bool); `same` [c, M'] bool and `scratch`
    [c, M'] float (needed only when C > 0) are contiguous scratch (out= must be contiguous under
    torch.compile; with C > 0 the sample block of g / t is a strided view, filled by a copy).

    yc: [M'] labels of the sample columns, cols: [M'] int64 indices of those columns among the M
    contrast columns (None: all M of them, in order). C = the width beyond M'. Nothing [c, M'] is
    allocated (the torch backend reuses these buffers for every row chunk).
    """
    ya = p.labels[rows]
    c, m = ya.shape[0], yc.shape[0]
    n_cls = g.shape[1] - m
    dev, dtype = g.device, g.dtype
    g_s, t_s, pos_s = g[:, n_cls:], t[:, n_cls:], pos[:, n_cls:]

    def into(view: Tensor) -> Tensor:  # where an out= may write the sample block of g or t
        return view if n_cls == 0 else scratch

    torch.eq(ya[:, None], yc[None, :], out=same)
    w_same = (p.w_same if cols is None else p.w_same[cols]).to(dtype)
    w_other = (p.w_other if cols is None else p.w_other[cols]).to(dtype)
    g_s.copy_(torch.where(same, w_same[None, :], w_other[None, :], out=into(g_s)))
    anchor_idx = torch.arange(rows.start, rows.start + c, device=dev)
    if p.pos_mask is None:
        pos_s.copy_(same)
        t_s.copy_(same).mul_(p.alpha)  # in t's dtype: bool * float would round alpha to float32
    else:  # entry (i, j) = pos_mask[i % rows, j % cols]: a [B, B] block is tiled over the views
        mask_rows, mask_cols = p.pos_mask.shape
        col_idx = torch.arange(m, device=dev) if cols is None else cols
        block = p.pos_mask.index_select(0, anchor_idx % mask_rows).to(dtype)  # [c, mask_cols]
        t_s.copy_(torch.index_select(block, 1, col_idx % mask_cols, out=into(t_s)).mul_(p.alpha))
        pos_s.copy_(torch.ne(t_s, 0, out=same))
    # the anchor itself is neither in the denominator nor a positive: one column per row at most
    # (no data-dependent shapes, so torch.compile keeps one graph)
    here = torch.arange(c, device=dev)
    if cols is None:  # anchors are in-batch rows, all among the M columns
        at, valid = anchor_idx, None
    else:
        where = torch.full((p.n_contrast,), -1, dtype=torch.long, device=dev)
        where[cols] = torch.arange(m, device=dev)
        at = where[anchor_idx]
        valid, at = at >= 0, at.clamp_min(0)
    for block, off in ((g_s, 0.0), (t_s, 0.0), (pos_s, False)):
        block[here, at] = off if valid is None else torch.where(valid, off, block[here, at])
    if n_cls == 0:
        return
    g[:, :n_cls].fill_(1.0)
    pos[:, :n_cls].fill_(False)
    pos[torch.arange(c, device=dev), ya] = True
    own, other = p.beta, 0.0
    if p.smooth > 0:
        own, other = (1.0 - p.smooth) * p.beta, (p.smooth / (n_cls - 1) if n_cls > 1 else 0.0) * p.beta
    t[:, :n_cls].fill_(other)
    t[torch.arange(c, device=dev), ya] = own


def centre_block(p: LossProblem, rows: slice, dtype: torch.dtype) -> Tensor | None:
    """[c, C] centre logits (u + log prior) / supt of anchor rows `rows` (within p.anchors), or None."""
    if p.centre_logits is None:
        return None
    first = p.anchors.start
    u = p.centre_logits[rows.start - first : rows.stop - first].to(dtype)
    if p.log_prior is not None:
        u = u + p.log_prior.to(dtype)
    return u / p.supt
