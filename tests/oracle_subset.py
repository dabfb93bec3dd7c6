"""The float64 oracle on a subset S of the anchors, for a batch whose dense [N, C + N] oracle
would not fit in memory.

Anchor i's loss depends on its own row, label and centre logits and on the set of contrast columns
(every in-batch row but itself, the queue, the centres; README.md: weights and targets are per
column, class counts and the prior's mean are over all columns). So the oracle on the rows reordered
with S first, n_anchor = |S| and the centre logits of S gives the losses of S from [|S|, C + M]
matrices. The backend runs the whole batch with reduction="none" and an upstream gradient that is
0 outside S: its gradient of every input is then the gradient of sum_{i in S} v_i loss_i, which
autograd gives the oracle on its subset (tests/test_oracle.py checks this against the full oracle).
"""

from __future__ import annotations

import torch
from oracle_compare import oracle_loss
from torch import Tensor


def pick_anchors(n_anchor: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(S: up to `size` random anchor indices, sorted; v [|S|] float64 upstream of their losses;
    the upstream [n_anchor] of the whole batch: v on S, 0 elsewhere). CPU tensors."""
    anchors = torch.randperm(n_anchor, generator=generator)[:size].sort().values
    v = torch.randn(anchors.shape[0], dtype=torch.float64, generator=generator)
    return anchors, v, torch.zeros(n_anchor, dtype=torch.float64).index_copy(0, anchors, v)


def subset_oracle(z: Tensor, labels: Tensor, kw: dict, anchors: Tensor, v: Tensor) -> list[Tensor]:
    """[losses of S, then the gradients of sum_i v_i loss_{S_i} with respect to z, the queue and the
    centre logits (those present)], float64 on the CPU. z, labels, kw: the inputs of
    contrastive_loss (its keywords, tensors on any device, reduction "none"), as the backend got them."""
    kw = {key: x.detach().cpu() if isinstance(x, Tensor) else x for key, x in kw.items()}
    z64 = z.detach().cpu().double().requires_grad_()
    leaves = [z64]
    for key in ("queue", "centre_logits"):
        if kw.get(key) is not None:
            kw[key] = kw[key].double().requires_grad_()
            leaves.append(kw[key])
    anchors = anchors.cpu()
    others = torch.ones(z.shape[0], dtype=torch.bool)
    others[anchors] = False
    order = torch.cat([anchors, torch.arange(z.shape[0])[others]])
    if kw.get("centre_logits") is not None:
        kw["centre_logits"] = kw["centre_logits"][anchors]  # one row per anchor, in the order of S
    kw["n_anchor"] = anchors.shape[0]
    losses = oracle_loss(z64[order], labels.cpu()[order], **{**kw, "reduction": "none"})
    return [losses.detach(), *torch.autograd.grad(losses, leaves, v.to(losses.dtype))]
