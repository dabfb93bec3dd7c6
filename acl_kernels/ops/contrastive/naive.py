"""Reference backend: the whole [n_anchor, C + M] logit matrix at once, gradients by autograd.

This is the oracle of the tests (run it in float64). Memory is O(n_anchor * M), an explicit positive
mask included: use it for checking, not for training at scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import LossProblem, centre_block, compute_dtype, tile


def masked_row_max(l: Tensor, keep: Tensor) -> Tensor:
    """Row max of `l` over `keep`, 0 for rows with nothing kept (a safe shift, never -inf)."""
    m = l.detach().masked_fill(~keep, float("-inf")).amax(1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def masked_exp(x: Tensor, keep: Tensor) -> Tensor:
    """exp(x) where `keep`, exactly 0 elsewhere: the mask goes in before the exp, so a left-out
    column whose exp would overflow gives 0, never 0 * inf = NaN (value or gradient)."""
    return torch.exp(x.masked_fill(~keep, float("-inf")))


def safe_log(x: Tensor) -> Tensor:
    """log(x) where x > 0, -inf where x == 0, NaN where x is NaN, with a finite gradient where x >= 0."""
    zero = x == 0
    return torch.where(zero, float("-inf"), torch.log(torch.where(zero, torch.ones_like(x), x)))


def per_anchor_loss(l: Tensor, g: Tensor, t: Tensor, pos: Tensor, mode: str) -> Tensor:
    """L_i of README.md for a dense block of rows; differentiable in `l`.

    Columns outside a sum are masked before the exp (masked_exp), so they add an exact 0 to the
    value and the gradient. Aligned mode shifts by the max over the negatives only, as the torch
    backend does: a dominant positive cannot push the negatives' mass below the float range.
    """
    a = t.sum(1)
    has_target = a > 0
    inv_a = torch.where(has_target, 1.0 / torch.where(has_target, a, torch.ones_like(a)), 0.0)
    if mode == "softmax":
        den = g > 0
        m = masked_row_max(l, den)
        lse = m + safe_log((g * masked_exp(l - m[:, None], den)).sum(1))
        lse = torch.where(has_target, lse, 0.0)
        return torch.where(has_target, lse - (t * l).sum(1) * inv_a, 0.0)
    neg = (g > 0) & ~pos
    shifted = l - masked_row_max(l, neg)[:, None]
    log_neg = safe_log((g * masked_exp(shifted, neg)).sum(1))
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
