"""Reference backend: the whole [n_anchor, C + M] logit matrix at once, gradients by autograd.

This is the oracle of the tests (run it in float64) and the only backend that accepts an explicit
positive mask. Memory is O(n_anchor * M): use it for checking, not for training at scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import LossProblem, centre_block, compute_dtype, tile


def masked_row_max(l: Tensor, keep: Tensor) -> Tensor:
    """Row max of `l` over `keep`, 0 for rows with nothing kept (a safe shift, never -inf)."""
    m = l.detach().masked_fill(~keep, float("-inf")).amax(1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def safe_log(x: Tensor) -> Tensor:
    """log(x) where x > 0, -inf where x == 0, with a finite gradient everywhere."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), float("-inf"))


def per_anchor_loss(l: Tensor, g: Tensor, t: Tensor, pos: Tensor, mode: str) -> Tensor:
    """L_i of README.md for a dense block of rows; differentiable in `l`."""
    a = t.sum(1)
    has_target = a > 0
    inv_a = torch.where(has_target, 1.0 / torch.where(has_target, a, torch.ones_like(a)), 0.0)
    if mode == "softmax":
        m = masked_row_max(l, g > 0)
        lse = m + safe_log((g * torch.exp(l - m[:, None])).sum(1))
        lse = torch.where(has_target, lse, 0.0)
        return torch.where(has_target, lse - (t * l).sum(1) * inv_a, 0.0)
    neg = (g > 0) & ~pos
    m = masked_row_max(l, neg | pos)
    shifted = l - m[:, None]
    log_neg = safe_log((torch.where(neg, g, 0.0) * torch.exp(shifted)).sum(1))
    # log(e^x / (e^x + N)) = -softplus(log N - x): no cancellation when the positive dominates
    log_p = -torch.nn.functional.softplus(log_neg[:, None] - shifted)
    return -(torch.where(pos, t * log_p, 0.0)).sum(1) * inv_a


def reference_loss(p: LossProblem) -> Tensor:
    """Losses of the anchors p.anchors (already multiplied by temperature / base_temperature)."""
    dtype = compute_dtype(p.z.dtype)
    zc = p.contrast(dtype)
    rows = p.anchors
    l, g, t, pos = tile(p, rows, zc[rows], zc, p.contrast_labels(), centre_block(p, rows, dtype))
    return per_anchor_loss(l, g, t, pos, p.mode) * p.loss_scale
