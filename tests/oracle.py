"""An independent float64 oracle of the loss, written from acl_kernels/ops/contrastive/README.md.

It shares no code with acl_kernels: its own weights (none / batch / prior, times gamma), targets
(alpha on sample positives, beta on the own centre, label smoothing), centre block, queue and
anchor subset. Dense [a, C + M] matrices, float64, autograd for the gradients. Excluded columns are
left out by selection (torch.where), never by multiplying with 0, so nothing here can turn an
overflow into NaN. Not a backend: used by the tests only.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _column_weights(yc: Tensor, kind: str, gamma: float, n_centres: int, prior: Tensor | None, kappa: float, dtype):
    """(w_other, w_same) [M] of the sample columns (README: Negative weighting)."""
    if kind == "none":
        w = torch.full(yc.shape, gamma, dtype=dtype)
        return w, w
    if kind == "batch":
        n_c = torch.tensor([(yc == c).sum().item() for c in yc.tolist()], dtype=dtype)
        n_c = n_c + (1.0 if n_centres else 0.0)
        # n_c - 1 = 0 only for a class whose one row is the anchor itself: that column is left out anyway
        return gamma / n_c, gamma / torch.where(n_c > 1, n_c - 1, 1.0)
    w = prior.to(dtype)[yc] ** -kappa
    w = gamma * w / w.mean()
    return w, w


def _logsumexp_where(x: Tensor, keep: Tensor) -> Tensor:
    """log sum_k exp(x_k) over `keep` per row, -inf for a row with nothing kept (gradient 0 there)."""
    any_kept = keep.any(1)
    inner = torch.where(keep, x, NEG_INF)
    inner = torch.where(any_kept[:, None], inner, 0.0)  # a row of -inf would give a NaN gradient
    return torch.where(any_kept, torch.logsumexp(inner, 1), NEG_INF)


def losses(
    z: Tensor,
    labels: Tensor,
    *,
    mode: str = "softmax",
    temperature: float = 0.07,
    base_temperature: float | None = None,
    n_anchor: int | None = None,
    queue: Tensor | None = None,
    queue_labels: Tensor | None = None,
    centre_logits: Tensor | None = None,
    log_prior: Tensor | None = None,
    supt: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    smooth: float = 0.0,
    negative_weight: str = "none",
    class_prior: Tensor | None = None,
    kappa: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Per-anchor losses [n_anchor], differentiable in z, queue and centre_logits; the keywords of
    acl_kernels.contrastive_loss (reduction "none"). Computed in `dtype`: float64 is the oracle,
    float32 gives PyTorch's own fp32 error of the same formulas (the tests' error bar)."""
    rows = z.to(dtype) if queue is None else torch.cat([z.to(dtype), queue.to(dtype)])
    yc = labels if queue_labels is None else torch.cat([labels, queue_labels])
    a = z.shape[0] if n_anchor is None else n_anchor
    ya = yc[:a]
    n_centres = 0 if centre_logits is None else centre_logits.shape[1]

    same = ya[:, None] == yc[None, :]
    itself = torch.arange(a)[:, None] == torch.arange(rows.shape[0])[None, :]
    w_other, w_same = _column_weights(yc, negative_weight, gamma, n_centres, class_prior, kappa, dtype)
    g = torch.where(itself, 0.0, torch.where(same, w_same[None, :], w_other[None, :]))
    pos = same & ~itself
    t = pos.to(dtype) * alpha  # (torch.where of two Python numbers would be float32)
    logits = rows[:a] @ rows.T / temperature

    if n_centres:
        u = centre_logits.to(dtype) + (0.0 if log_prior is None else log_prior.to(dtype))
        own = torch.arange(n_centres)[None, :] == ya[:, None]
        t_other = beta * smooth / (n_centres - 1) if n_centres > 1 else 0.0
        logits = torch.cat([u / supt, logits], 1)
        g = torch.cat([torch.ones(a, n_centres, dtype=dtype), g], 1)
        t = torch.cat([own.to(dtype) * (beta * (1 - smooth) - t_other) + t_other, t], 1)
        pos = torch.cat([own, pos], 1)

    total = t.sum(1)
    has_target = total > 0
    safe_total = torch.where(has_target, total, 1.0)
    log_g = torch.log(torch.where(g > 0, g, 1.0))
    if mode == "softmax":
        lse = _logsumexp_where(logits + log_g, g > 0)
        lse = torch.where(has_target, lse, 0.0)
        loss = lse - (t * logits).sum(1) / safe_total
    else:
        log_neg = _logsumexp_where(logits + log_g, (g > 0) & ~pos)
        # -log(e^l_p / (e^l_p + N)) = log(e^l_p + N) - l_p
        per_positive = torch.logaddexp(logits, log_neg[:, None]) - logits
        loss = torch.where(pos, t * per_positive, 0.0).sum(1) / safe_total
    scale = temperature / (temperature if base_temperature is None else base_temperature)
    return torch.where(has_target, loss, 0.0) * scale
