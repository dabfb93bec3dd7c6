"""The training objective: the loss switch, the MoCo key encoder and the queue of detached keys."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from acl_kernels import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss
from acl_kernels.distributed import loss_group

from .models import key_encoder, momentum_update

PROJECTING = ("acl", "paco", "gpaco", "supcon")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _group_kwargs(cls) -> dict:
    """The loss's own group of every rank where it supports a global batch across ranks, else per-rank loss."""
    if _distributed() and "process_group" in inspect.signature(cls.__init__).parameters:
        return {"process_group": loss_group()}
    return {}


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate a no-grad tensor over ranks (keys for the queue)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous(), group=loss_group())
    return torch.cat(parts)


class Objective(nn.Module):
    """loss(model, views, labels) for loss in acl | paco | gpaco | supcon | ce | la.

    acl:    ACLLoss over all V views (one forward of the V views together), centre logits of every
            view, optional queue of every view's detached projections.
    paco:   the last view through the momentum key encoder (keys); every other view through the model
            (queries, one forward each), each query view contrasted with [its queries; keys; queue]
            by PaCoLoss and the V - 1 losses averaged (V = 2: the official step); the keys are enqueued.
    gpaco:  every view through the model in its own forward (per-view BatchNorm statistics, as the
            official code), every view an anchor, optional queue; only the last view is enqueued.
    supcon: CE on every view's logits + supcon_weight * SupCon.
    ce, la: CE on every view's logits; la adds la_tau * log(prior) to the logits while training.
    """

    def __init__(self, cfg: dict, model: nn.Module, class_counts, num_classes: int):
        super().__init__()
        self.kind = cfg["loss"]
        self.cfg = cfg
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        self.register_buffer("log_prior", torch.log(counts / counts.sum() + 1e-9), persistent=False)
        common = dict(
            alpha=cfg["alpha"],
            beta=cfg["beta"],
            gamma=cfg["gamma"],
            supt=cfg["supt"],
            temperature=cfg["temperature"],
            num_classes=num_classes,
        )
        self.loss: nn.Module | None = None
        if self.kind == "acl":
            self.loss = ACLLoss(
                negative_weight=cfg["negative_weight"],
                kappa=cfg["kappa"],
                logit_adjust=cfg["logit_adjust"],
                mode=cfg["acl_mode"],
                impl=cfg["loss_impl"],
                **common,
                **_group_kwargs(ACLLoss),
            )
        elif self.kind in ("paco", "gpaco"):
            cls = PaCoLoss if self.kind == "paco" else GPaCoLoss
            self.loss = cls(K=0, smooth=cfg["smooth"], impl=cfg["loss_impl"], **common, **_group_kwargs(cls))
        elif self.kind == "supcon":
            self.loss = SupConLoss(
                temperature=cfg["temperature"],
                base_temperature=cfg["temperature"],
                impl=cfg["loss_impl"],
                **_group_kwargs(SupConLoss),
            )
        # the class prior: PaCo / GPaCo add log(prior) to the centre logits whenever it is set, so only
        # under logit_adjust; ACL has its own logit_adjust switch and also needs it for "prior" weights
        needs_prior = cfg["logit_adjust"] or (self.kind == "acl" and cfg["negative_weight"] == "prior")
        if isinstance(self.loss, (ACLLoss, PaCoLoss)) and needs_prior:
            self.loss.cal_weight_for_classes(class_counts)
        self.key_encoder = key_encoder(model) if self.kind == "paco" else None
        k = cfg["queue_size"] if self.kind in ("acl", "paco", "gpaco") else 0
        self.register_buffer("queue", torch.zeros(k, cfg["proj_dim"]))
        self.register_buffer("queue_labels", torch.zeros(k, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(2, dtype=torch.long))  # (next slot, rows filled)

    def _queue(self) -> tuple[Tensor, Tensor]:
        """Copies of the filled rows: the loss's backward must see the rows of its forward, not the
        keys `_enqueue` writes into the buffer before the backward runs."""
        n = int(self.queue_ptr[1])
        return self.queue[:n].clone(), self.queue_labels[:n].clone()

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, labels: Tensor) -> None:
        k = self.queue.shape[0]
        if k == 0:
            return
        keys, labels = gather(keys.detach().float()), gather(labels)
        keys, labels = keys[-k:], labels[-k:]
        idx = (int(self.queue_ptr[0]) + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys
        self.queue_labels[idx] = labels
        self.queue_ptr[0] = (int(self.queue_ptr[0]) + keys.shape[0]) % k
        self.queue_ptr[1] = min(k, int(self.queue_ptr[1]) + keys.shape[0])

    def forward(self, model: nn.Module, views: list[Tensor], labels: Tensor, autocast) -> Tensor:
        bsz, n_views = labels.shape[0], len(views)
        if self.kind == "paco":
            return self._paco(model, views, labels, autocast)
        if self.kind == "gpaco":
            with autocast():
                logits, z = model(list(views))  # every view in its own forward, as the official GPaCo
        else:
            with autocast():
                logits, z = model(torch.cat(views), project=self.kind in PROJECTING)  # rows view-major
        y = labels.repeat(n_views)
        if self.kind == "ce":
            return F.cross_entropy(logits, y)
        if self.kind == "la":
            return F.cross_entropy(logits + self.cfg["la_tau"] * self.log_prior, y)
        if self.kind == "supcon":
            zv = z.view(n_views, bsz, -1).transpose(0, 1)
            return F.cross_entropy(logits, y) + self.cfg["supcon_weight"] * self.loss(zv, labels)
        queue, queue_labels = self._queue()
        if self.kind == "gpaco":
            self.loss.K = queue.shape[0]
            loss = self.loss(torch.cat([z, queue]), torch.cat([y, queue_labels]), logits)
            self._enqueue(z[-bsz:], labels)  # the official code enqueues the key (last) view only
            return loss
        zv = z.view(n_views, bsz, -1).transpose(0, 1)
        lv = logits.view(n_views, bsz, -1).transpose(0, 1) if self.cfg["acl_centres"] else None
        has_q = queue.shape[0] > 0
        loss = self.loss(zv, labels, lv, queue if has_q else None, queue_labels if has_q else None)
        self._enqueue(z, y)
        if lv is None:  # no centres in the loss: the classifier learns from a logit-adjusted CE beside it
            adjust = self.log_prior if self.cfg["logit_adjust"] else 0.0
            loss = F.cross_entropy(logits + adjust, y) + loss
        return loss

    def _paco(self, model: nn.Module, views: list[Tensor], labels: Tensor, autocast) -> Tensor:
        """MoCo step of PaCo: keys of the last view from the momentum encoder, every other view a query."""
        n_query = len(views) - 1
        with autocast():
            logits, z = model(list(views[:-1]))  # every query view in its own forward
            queries = zip(logits.chunk(n_query), z.chunk(n_query))
            with torch.no_grad():
                momentum_update(self.key_encoder, _unwrap(model), self.cfg["moco_momentum"])
                _, k = self.key_encoder(views[-1])
        queue, queue_labels = self._queue()
        self.loss.K = queue.shape[0]
        contrast, contrast_labels = torch.cat([k, queue]), torch.cat([labels, queue_labels])
        losses = [
            self.loss(torch.cat([q, contrast]), torch.cat([labels, contrast_labels]), logits_q)
            for logits_q, q in queries
        ]
        self._enqueue(k, labels)
        return torch.stack(losses).mean()


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
