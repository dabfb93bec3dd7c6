"""The learning rate of each step: linear warm-up, then cosine to 0 or x0.1 steps."""

from __future__ import annotations

import math

import torch


def lr_at(cfg: dict, epoch: int, step: int, steps: int) -> float:
    """Linear warm-up per step over warmup_epochs, then cosine to 0 or x0.1 at each of lr_steps."""
    t = epoch + step / steps
    warm = cfg["warmup_epochs"]
    if t < warm:
        return cfg["lr"] * (epoch * steps + step + 1) / (warm * steps)
    if cfg["schedule"] == "step":
        return cfg["lr"] * 0.1 ** sum(epoch >= s for s in cfg["lr_steps"])
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(cfg["epochs"] - warm, 1e-8)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
