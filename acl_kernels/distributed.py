"""The loss over the global batch of a process group: row layout, collectives, autograd.

Each rank passes its local rows; anchors and contrasts span the rows of every rank. The global
rows are laid out with the anchors of every rank first (rank order), then the non-anchor rows of
every rank, then the queue (replicated: the caller's), so the anchors stay a prefix as the loss
core expects. Per step, with W ranks, n^ = max local rows, a^ = max local anchors, s = bytes per
feature element, c = 4 (8 for fp64 inputs) and F = 5 + len(functional.GROUP_SETTINGS) = 21, each
rank receives through all_gather

    W * (8 F  +  n^ (d s + 4)  +  5 a^ c)   bytes in forward:  settings, features + int32 labels,
                                                               per-anchor statistics and losses,
    W * a^ c                                bytes in backward: upstream gradient of every anchor,

that is O(N d + N), plus W * 8 bytes when SupConLoss numbers SimCLR images across ranks; nothing
N x N and no gradient reduce-scatter (ops/contrastive/README.md, "Across processes"). Only the
reference backend (the test oracle) all-reduces an N x d gradient instead.

Every rank must call forward and backward: backward runs one all_gather on the group, issued at
the same point of the same autograd graph on every rank. To keep it off the group that
DistributedDataParallel reduces gradients on, pass the loss its own group: loss_group() below.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import Backend, RowStats
from .ops.contrastive.problem import LossProblem

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _meta_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_padded(x: Tensor, length: int, group) -> Tensor:
    """[W, length, ...]: every rank's x ([<= length, ...]) zero-padded to `length` rows."""
    x = x.contiguous()
    if x.shape[0] < length:
        x = torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


_LOSS_GROUP: list = [None, None]  # (the default group it was made for, the loss's group)


def loss_group():
    """A second process group over every rank, for a loss's collectives (made once per default group).

    DistributedDataParallel all-reduces gradient buckets on the default group while backward runs,
    and the autograd engine issues the loss's backward all_gather among them. On the same group
    they share one communicator (with NCCL, one stream), so the gather queues behind the buckets in
    flight; on a group of its own it does not. dist.new_group is collective: every rank must make
    the first call at the same point of the program (e.g. right after init_process_group).
    """
    world = dist.group.WORLD
    if _LOSS_GROUP[0] is not world:
        _LOSS_GROUP[:] = [world, dist.new_group()]
    return _LOSS_GROUP[1]


def _fingerprint(value: Any) -> int:
    if isinstance(value, Tensor):
        value = tuple(value.detach().reshape(-1).tolist())
    return zlib.crc32(repr(value).encode())


@dataclass(frozen=True)
class Layout:
    """Where every rank's rows lie in the global batch (anchors of all ranks first)."""

    group: Any
    world: int
    rank: int
    rows: tuple[int, ...]  # local rows per rank
    anchors: tuple[int, ...]  # local anchors per rank (the first rows of each rank)

    @property
    def n_rows(self) -> int:
        return sum(self.rows)

    @property
    def n_anchor(self) -> int:
        return sum(self.anchors)

    @property
    def own_anchors(self) -> slice:
        start = sum(self.anchors[: self.rank])
        return slice(start, start + self.anchors[self.rank])

    def own_rows(self, device: torch.device) -> Tensor:
        """[n_local] global indices of this rank's rows, in local order."""
        a = self.own_anchors
        start = self.n_anchor + sum(r - a_ for r, a_ in zip(self.rows[: self.rank], self.anchors[: self.rank]))
        rest = self.rows[self.rank] - self.anchors[self.rank]
        return torch.cat(
            [torch.arange(a.start, a.stop, device=device), torch.arange(start, start + rest, device=device)]
        )

    def _row_order(self, device: torch.device) -> Tensor:
        """[N] index of each global row in the flattened padded gather [W * max(rows)]."""
        width = max(self.rows)
        first = [torch.arange(a, device=device) + r * width for r, a in enumerate(self.anchors)]
        rest = [torch.arange(a, n, device=device) + r * width for r, (a, n) in enumerate(zip(self.anchors, self.rows))]
        return torch.cat(first + rest)

    def gather_rows(self, x: Tensor) -> Tensor:
        """[N, ...] the local rows x [n_local, ...] of every rank, in the global layout (no gradient)."""
        padded = _all_gather_padded(x, max(self.rows), self.group)
        return padded.flatten(0, 1)[self._row_order(x.device)]

    def gather_anchors(self, x: Tensor) -> Tensor:
        """[n_anchor, ...] per-anchor values x [local anchors, ...] of every rank, in anchor order (no gradient)."""
        width = max(self.anchors)
        padded = _all_gather_padded(x, width, self.group)
        keep = torch.cat([torch.arange(a, device=x.device) + r * width for r, a in enumerate(self.anchors)])
        return padded.flatten(0, 1)[keep]


def agree(
    group, check: Callable[[], tuple[Any, Tensor, int, dict]], setting_names: Sequence[str]
) -> tuple[Any, Layout]:
    """Run the local argument checks, then make sure every rank agrees; returns (checked, Layout).

    check() -> (checked arguments, features [n, d], local anchors, {setting: value} holding at least
    setting_names). One all_gather of W x (5 + len(setting_names)) int64 tells every rank each
    rank's sizes, d, dtype and a fingerprint of each setting, so all ranks raise the same error on
    a disagreement, and a rank whose own checks failed does not leave the others waiting.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = 5 + len(setting_names)
    meta = torch.zeros(width, dtype=torch.int64)
    failure = None
    try:
        checked, features, n_anchor, settings = check()
        meta[0] = 1
        meta[1], meta[3] = features.shape
        meta[2] = n_anchor
        meta[4] = _DTYPES.index(features.dtype)
        meta[5:] = torch.tensor([_fingerprint(settings[k]) for k in setting_names])
    except (TypeError, ValueError) as err:
        failure = err
    table = _all_gather_padded(meta[None].to(_meta_device(group)), 1, group)[:, 0].cpu().tolist()
    if failure is not None:
        raise failure
    failed = [r for r in range(world) if table[r][0] != 1]
    if failed:
        raise ValueError(f"process_group: the loss arguments of rank(s) {failed} failed their checks (see their error)")
    problems = []
    for col, what, show in ((3, "the feature dimension d", str), (4, "the features dtype", lambda i: str(_DTYPES[i]))):
        if len({row[col] for row in table}) > 1:
            problems.append(f"{what} ({', '.join(f'rank {r}: {show(row[col])}' for r, row in enumerate(table))})")
    for i, name in enumerate(setting_names):
        differ = [r for r in range(world) if table[r][5 + i] != table[0][5 + i]]
        if differ:
            problems.append(f"{name} (rank(s) {differ} differ from rank 0; here {settings[name]!r})")
    if problems:
        raise ValueError(
            "process_group: ranks disagree on "
            + "; ".join(problems)
            + ". Every rank must call the loss with the same feature dimension, dtype and settings."
        )
    layout = Layout(group, world, rank, tuple(row[1] for row in table), tuple(row[2] for row in table))
    return checked, layout


def row_offset(n: int, group, device: torch.device) -> int:
    """Sum of `n` over the ranks before this one (e.g. the global index of this rank's first image)."""
    counts = _all_gather_padded(torch.tensor([[n]], device=device), 1, group).reshape(-1).tolist()
    return sum(counts[: dist.get_rank(group)])


class _ScaleGrad(torch.autograd.Function):
    """Identity whose gradient is multiplied by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(x: Tensor | None, scale: float) -> Tensor | None:
    """x, with its gradient multiplied by `scale` (the world size: DistributedDataParallel then averages)."""
    return None if x is None else _ScaleGrad.apply(x, scale)


class _AttachRows(torch.autograd.Function):
    """The gathered global rows, differentiable in the local rows: backward all-reduces dL/dz (N x d)."""

    @staticmethod
    def forward(ctx, z_local: Tensor, z_global: Tensor, layout: Layout):
        ctx.layout = layout
        return z_global.view_as(z_global)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout: Layout = ctx.layout
        width = max(layout.rows)
        flat = grad.new_zeros(layout.world * width, *grad.shape[1:])
        flat[layout._row_order(grad.device)] = grad
        dist.all_reduce(flat, group=layout.group)
        start = layout.rank * width
        return flat[start : start + layout.rows[layout.rank]], None, None


class _GlobalRowsLoss(torch.autograd.Function):
    """Losses of this rank's anchors against the global batch, from a backend's RowStats.

    Forward: per-row statistics of the local anchors against all columns, all-gathered with the
    losses. Backward: all-gather every anchor's upstream gradient, then the backend forms the exact
    gradient of this rank's rows (and of its anchors' centre logits) from the gathered statistics.
    """

    @staticmethod
    def forward(ctx, z: Tensor, centre: Tensor | None, p: LossProblem, layout: Layout, ops: RowStats):
        losses, stats = ops.forward(p)
        every = layout.gather_anchors(torch.cat([stats, losses[:, None].to(stats.dtype)], 1))
        ctx.save_for_backward(every[:, :-1].contiguous())
        ctx.problem, ctx.layout, ctx.ops = p, layout, ops
        all_losses = every[:, -1].to(losses.dtype)
        ctx.mark_non_differentiable(all_losses)
        return losses, all_losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor, _):
        (stats,) = ctx.saved_tensors
        p: LossProblem = ctx.problem
        grad = ctx.layout.gather_anchors(grad_losses.to(stats.dtype).contiguous())
        dz, du = ctx.ops.backward(p, stats, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dz = None if dz is None else dz.to(p.z.dtype)
        du = None if du is None else du.to(p.centre_logits.dtype)
        return dz, du, None, None, None


def global_losses(
    backend: Backend, p: LossProblem, layout: Layout, z: Tensor, centre: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(losses of this rank's anchors, differentiable in z and centre; every anchor's loss, detached).

    p holds the gathered rows (no gradient); z [n_local, d] and centre [local anchors, C] are the
    local inputs the gradient goes to: dJ/dz where J = sum over ranks of each rank's objective of
    its own anchors' losses (the caller scales it for DistributedDataParallel).
    """
    if backend.row_stats is not None:
        return _GlobalRowsLoss.apply(z, centre, p, layout, backend.row_stats)
    if not backend.autograd_exact:
        raise ValueError(f"impl={backend.name!r} cannot serve a process group")
    local = backend.run(replace(p, z=_AttachRows.apply(z, p.z, layout), centre_logits=centre))
    return local, layout.gather_anchors(local.detach())
