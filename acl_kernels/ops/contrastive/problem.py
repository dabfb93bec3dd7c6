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
    cols: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logits and weights of anchor rows `rows` against every column (or the columns `cols`).

    za: [c, d] the anchors of `rows`, zc: [M', d] contrast rows, yc: [M'] their labels, cols: [M']
    int64 indices of those columns among the M contrast columns (None: zc holds all M of them, in
    order), centre: the [c, C] centre logits of these anchors (u + log prior) / supt, or None.
    Returns, each [c, C + M']: logits `l`, denominator weights `g` (0 = not in the denominator),
    target weights `t` and the positive indicator `pos` (bool). Centre columns come first.
    """
    ya = p.labels[rows]
    c = za.shape[0]
    l_s = (za @ zc.T) / p.temperature
    same = ya[:, None] == yc[None, :]
    col_idx = torch.arange(yc.shape[0], device=za.device) if cols is None else cols
    anchor_idx = torch.arange(rows.start, rows.start + c, device=za.device)
    is_self = col_idx[None, :] == anchor_idx[:, None]
    w_same = (p.w_same if cols is None else p.w_same[cols]).to(l_s.dtype)
    w_other = (p.w_other if cols is None else p.w_other[cols]).to(l_s.dtype)
    g_s = torch.where(same, w_same[None, :], w_other[None, :]).masked_fill(is_self, 0.0)
    if p.pos_mask is None:
        pos_s = same & ~is_self
        t_s = pos_s.to(l_s.dtype) * p.alpha
    else:
        mask_rows, mask_cols = p.pos_mask.shape
        mask = p.pos_mask[anchor_idx % mask_rows][:, col_idx % mask_cols]
        t_s = mask.to(l_s.dtype).masked_fill(is_self, 0.0) * p.alpha
        pos_s = t_s != 0
    if centre is None:
        return l_s, g_s, t_s, pos_s
    n_cls = centre.shape[1]
    onehot = torch.nn.functional.one_hot(ya, n_cls).to(torch.bool)
    if p.smooth > 0:
        off = p.smooth / (n_cls - 1) if n_cls > 1 else 0.0
        t_c = torch.where(onehot, 1.0 - p.smooth, off).to(l_s.dtype) * p.beta
    else:
        t_c = onehot.to(l_s.dtype) * p.beta
    g_c = torch.ones_like(centre)
    return (
        torch.cat([centre, l_s], 1),
        torch.cat([g_c, g_s], 1),
        torch.cat([t_c, t_s], 1),
        torch.cat([onehot, pos_s], 1),
    )


def centre_block(p: LossProblem, rows: slice, dtype: torch.dtype) -> Tensor | None:
    """[c, C] centre logits (u + log prior) / supt of anchor rows `rows` (within p.anchors), or None."""
    if p.centre_logits is None:
        return None
    first = p.anchors.start
    u = p.centre_logits[rows.start - first : rows.stop - first].to(dtype)
    if p.log_prior is not None:
        u = u + p.log_prior.to(dtype)
    return u / p.supt
