"""Evaluation: top-1 of the raw classifier overall and per Many / Medium / Few group, summed over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .data import make_loader
from .datasets import Split
from .metrics import accuracy_report
from .objective import _unwrap
from .run import Data, Run


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP sends them before each
    forward: evaluation on every rank then uses the statistics of the checkpoint rank 0 saves."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def eval_loader(run: Run, split: Split):
    """This rank's evaluation loader of `split` (reusable: DALI builds its pipeline once)."""
    return make_loader(run.cfg, split, train=False, epoch=0, rank=run.rank, world=run.world, device=run.device)


@torch.no_grad()
def evaluate(model: nn.Module, run: Run, data: Data, loader, autocast) -> dict:
    """Top-1 of the raw classifier (no logit compensation) on this rank's shard of `loader`, summed
    over ranks; the groups come from the training class counts (train/metrics.py)."""
    cfg, device, c = run.cfg, run.device, data.num_classes
    net = _unwrap(model)
    net.eval()
    correct = torch.zeros(c, dtype=torch.float64, device=device)
    total = torch.zeros(c, dtype=torch.float64, device=device)
    for i, (views, labels) in enumerate(loader):
        if cfg["max_eval_batches"] and i >= cfg["max_eval_batches"]:
            break
        x = views[0].to(device)
        if cfg["_channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, _ = net(x, project=False)
        labels = labels.to(device)
        hit = (logits.argmax(1) == labels).double()
        correct += torch.bincount(labels, weights=hit, minlength=c)
        total += torch.bincount(labels, minlength=c).double()
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    net.train()
    return accuracy_report(correct.cpu().numpy(), total.cpu().numpy(), data.counts)
