"""The functional core: one loss, every preset. The math is in ops/contrastive/README.md."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks, distributed
from .dispatch import IMPLS, select
from .ops.contrastive.problem import MODES, LossProblem

NEGATIVE_WEIGHTS = ("none", "batch", "prior")
REDUCTIONS = ("mean", "sum", "none")


def column_weights(
    yc: Tensor,
    kind: str,
    gamma: float,
    num_classes: int,
    has_centres: bool,
    class_prior: Tensor | None,
    kappa: float,
) -> tuple[Tensor, Tensor]:
    """[M] fp32 denominator weights of the sample columns: (other class, same class as the anchor).

    none: gamma. batch: gamma / n_c, n_c = class count among the contrast rows (+1 for its centre),
    less one for the anchor's own class. prior: gamma * pi_c^-kappa, normalised to mean 1 over the
    contrast rows.
    """
    if kind == "none":
        w = torch.full(yc.shape, gamma, dtype=torch.float32, device=yc.device)
        return w, w
    if kind == "batch":
        counts = torch.bincount(yc, minlength=num_classes).float() + (1.0 if has_centres else 0.0)
        n = counts[yc]
        return gamma / n, gamma / (n - 1).clamp_min(1.0)
    w = class_prior.to(device=yc.device, dtype=torch.float32)[yc].pow(-kappa)
    w = gamma * w / w.mean()
    return w, w


def contrastive_loss(
    features: Tensor,
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
    pos_mask: Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    check_finite: bool = True,
    process_group=None,
) -> Tensor:
    """Supervised contrastive loss over L2-normalised rows (SupCon / PaCo / GPaCo / ACL core).

    features: [N, d] fp16/bf16/fp32/fp64 unit rows, view-major; the first `n_anchor` rows (default
        all) are the anchors. They are used as given: normalise them yourself.
    labels: [N] int class of each row.
    mode: "softmax" (SupCon/PaCo/GPaCo: one denominator per anchor) or "aligned" (ACL: one
        denominator per positive holding itself and the negatives).
    temperature, base_temperature: logits are s_ij / temperature; the loss is multiplied by
        temperature / base_temperature (base_temperature defaults to temperature).
    queue, queue_labels: [K, d], [K] extra contrast rows (MoCo queue); the gradient reaches `queue`
        only if it requires grad.
    centre_logits: [n_anchor, C] classifier logits u; adds the centre block (u + log_prior) / supt,
        target beta on the own class (label smoothing `smooth` spreads it, softmax mode only).
    alpha, gamma: target weight of sample positives; weight of the sample block in the denominator.
    negative_weight: "none" | "batch" (1 / class count) | "prior" (class_prior^-kappa, mean 1).
    pos_mask: [n_anchor, N + K] explicit positive weights replacing the label test, or a [B, B]
        block tiled over the views (SupCon `mask=`: entry (i, j) = pos_mask[i % B, j % B], B dividing
        n_anchor and N + K); the torch backend reads it one row chunk at a time.
    reduction: "mean" over anchors (anchors without a positive count as 0) | "sum" | "none" ([n_anchor]).
    impl: "auto" | "triton" | "torch" | "reference" (see acl_kernels.dispatch).
    check_finite: raise on NaN/Inf inputs (one device sync); turn off for speed. Under torch.compile
        the checks that read tensor values (this one, label ranges, class_prior) are skipped so the
        compiled graph has no break; shapes, dtypes and devices are still checked.
    process_group: a torch.distributed group (e.g. torch.distributed.group.WORLD): the loss of the
        global batch. Each rank passes its local rows (features, labels, n_anchor, centre_logits of
        its anchors); anchors and contrasts span every rank's rows, anchors of all ranks counting as
        the anchors (as one process on the concatenation of each rank's anchors, then each rank's
        other rows, then the queue). Local sizes may differ; ranks must agree on d, dtype and every
        setting, else all raise ValueError. The queue is replicated (the caller's, identical on every
        rank) and must not require grad. Returns the global "mean"/"sum" on every rank, or for
        "none" the losses of this rank's anchors. Gradient convention: the gradient reaching this
        rank's features / centre_logits is world_size x dJ/d(them), J = the sum over ranks of each
        rank's objective (for "mean"/"sum": J = the returned loss), so that DistributedDataParallel's
        average over ranks gives each parameter exactly the single-process gradient of the
        concatenated batch; divide by world_size if you sum gradients instead of averaging them.
        Backward runs one all_gather on the group (every rank must call it). Traffic: O(N d + N)
        bytes per step (acl_kernels.distributed). impl "torch" and "reference" support it.

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    kwargs = dict(
        mode=mode,
        temperature=temperature,
        base_temperature=base_temperature,
        n_anchor=n_anchor,
        queue=queue,
        queue_labels=queue_labels,
        centre_logits=centre_logits,
        log_prior=log_prior,
        supt=supt,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        smooth=smooth,
        negative_weight=negative_weight,
        class_prior=class_prior,
        kappa=kappa,
        pos_mask=pos_mask,
        reduction=reduction,
        check_finite=check_finite,
    )
    if process_group is None:
        checked = _check(features, labels, **kwargs)
        losses = select(impl, checked.problem).run(checked.problem)
        return _reduce(losses, checked.reduction)
    return _global_loss(features, labels, kwargs, impl, process_group)


class _Checked(NamedTuple):
    problem: LossProblem  # of the rows given (column weights from their labels)
    reduction: str
    weigh: Callable[[Tensor], tuple[Tensor, Tensor]]  # column labels -> (w_other, w_same)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


# Settings every rank of a process group must share (checked by acl_kernels.distributed.agree).
GROUP_SETTINGS = (
    *("mode", "temperature", "loss_scale", "alpha", "beta", "gamma", "supt", "smooth", "negative_weight"),
    *("kappa", "class_prior", "num_classes", "log_prior", "queue rows K", "reduction", "impl"),
)


def _global_loss(features: Tensor, labels: Tensor, kwargs: dict, impl: str, group) -> Tensor:
    """contrastive_loss over the rows of every rank of `group` (see its docstring)."""

    def check():
        checked = _check(features, labels, **kwargs)
        p = checked.problem
        if p.pos_mask is not None:
            raise ValueError("pos_mask (SupCon `mask=`) is not supported with a process_group; pass labels")
        if p.queue is not None and p.queue.requires_grad:
            raise ValueError(
                "under a process_group the queue is a replicated constant and gets no gradient: pass queue.detach()"
            )
        weigh = checked.weigh.keywords
        settings = {k: getattr(p, k) for k in GROUP_SETTINGS if hasattr(p, k)}
        settings.update({k: weigh[k] for k in ("gamma", "kappa", "class_prior")}, negative_weight=weigh["kind"])
        settings.update({"queue rows K": 0 if p.queue is None else p.queue.shape[0]})
        settings.update(reduction=checked.reduction, impl=impl)
        return checked, p.z, p.n_anchor, settings

    checked, layout = distributed.agree(group, check, GROUP_SETTINGS)
    local = checked.problem
    z = distributed.scale_grad(local.z, layout.world)
    centre = distributed.scale_grad(local.centre_logits, layout.world)
    z_all = layout.gather_rows(local.z.detach())
    labels_all = layout.gather_rows(local.labels.to(torch.int32)).long()
    yc = labels_all if local.queue_labels is None else torch.cat([labels_all, local.queue_labels])
    w_other, w_same = checked.weigh(yc)
    p = dataclasses.replace(
        local,
        z=z_all,
        labels=labels_all,
        n_anchor=layout.n_anchor,
        centre_logits=centre,
        w_other=w_other,
        w_same=w_same,
        anchor_rows=layout.own_anchors,
        own_rows=layout.own_rows(z_all.device),
    )
    mine, every = distributed.global_losses(select(impl, p), p, layout, z, centre)
    if checked.reduction == "none":
        return mine
    # the value of every anchor, the gradient of this rank's own anchors (the others' reach their ranks)
    own = mine.sum()
    total = every.sum() + (own - own.detach())
    return total / layout.n_anchor if checked.reduction == "mean" else total


def check_settings(
    *,
    mode: str = "softmax",
    temperature: float = 0.07,
    base_temperature: float | None = None,
    supt: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    smooth: float = 0.0,
    negative_weight: str = "none",
    kappa: float = 1.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> dict:
    """The scalar settings of `contrastive_loss`, checked and normalised (floats; base_temperature
    resolved). The presets call it in their constructors, so a bad option fails there, not at the
    first forward. Every number must be finite."""
    temperature = checks.positive("temperature", temperature)
    base_temperature = temperature if base_temperature is None else base_temperature
    smooth = checks.number("smooth", smooth)
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    return dict(
        mode=checks.choice("mode", mode, MODES),
        temperature=temperature,
        base_temperature=checks.positive("base_temperature", base_temperature),
        supt=checks.positive("supt", supt),
        alpha=checks.non_negative("alpha", alpha),
        beta=checks.non_negative("beta", beta),
        gamma=checks.non_negative("gamma", gamma),
        smooth=smooth,
        negative_weight=checks.choice("negative_weight", negative_weight, NEGATIVE_WEIGHTS),
        kappa=checks.non_negative("kappa", kappa),
        reduction=checks.choice("reduction", reduction, REDUCTIONS),
        impl=checks.choice("impl", impl, IMPLS),
    )


# The arguments of contrastive_loss that check_settings normalises.
_SETTINGS = ("mode", "temperature", "base_temperature", "supt", "alpha", "beta", "gamma", "smooth")
_SETTINGS += ("negative_weight", "kappa", "reduction")


class _Args:
    """The arguments of contrastive_loss while they are checked (a plain class: torch.compile traces it)."""

    def __init__(self, **kwargs):
        self.set(kwargs)

    def set(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)


_Rule = tuple[Callable[[_Args], bool], type, Callable[[_Args], str]]


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape)


# (broken when, error, message) over the arguments checked so far, in the order they are checked
_OPTION_RULES: tuple[_Rule, ...] = (
    (lambda a: a.log_prior is not None and a.centre_logits is None, ValueError,
     lambda a: "log_prior needs centre_logits (it shifts the centre logits)"),
    (lambda a: a.smooth > 0 and a.centre_logits is None, ValueError,
     lambda a: "smooth needs centre_logits (it smooths the centre target)"),
    (lambda a: a.smooth > 0 and a.mode != "softmax", ValueError,
     lambda a: "smooth is only defined for mode='softmax'"),
    (lambda a: a.gamma == 0 and a.centre_logits is None, ValueError,
     lambda a: "gamma must be > 0 when there is no centre block (the denominator would be empty)"),
    (lambda a: a.queue is not None and a.queue.shape[1] != a.d, ValueError,
     lambda a: f"queue must have shape [K, {a.d}] like features, got {_shape(a.queue)}"),
    (lambda a: a.queue is not None and a.queue.dtype != a.features.dtype, TypeError,
     lambda a: f"queue dtype {a.queue.dtype} differs from features dtype {a.features.dtype}"),
    (lambda a: a.queue is not None and a.queue_labels is None, ValueError,
     lambda a: "queue_labels is required when queue is given"),
    (lambda a: a.queue is None and a.queue_labels is not None, ValueError,
     lambda a: "queue_labels was given without queue"),
)  # fmt: skip
_CENTRE_RULES: tuple[_Rule, ...] = (
    (lambda a: a.centre_logits.shape[0] != a.n_anchor, ValueError,
     lambda a: f"centre_logits must have shape [n_anchor={a.n_anchor}, num_classes], got {_shape(a.centre_logits)}"),
    (lambda a: a.centre_logits.shape[1] < 1, ValueError,
     lambda a: "centre_logits must have at least one class column"),
    (lambda a: a.log_prior is not None and a.log_prior.numel() != a.centre_logits.shape[1], ValueError,
     lambda a: f"log_prior must have {a.centre_logits.shape[1]} entries (one per class), got {_shape(a.log_prior)}"),
)  # fmt: skip
# value checks (a device sync each; skipped under torch.compile, whose graph cannot branch on values)
_PRIOR_RULES: tuple[_Rule, ...] = (
    (lambda a: a.class_prior is None, ValueError,
     lambda a: "negative_weight='prior' needs class_prior (training-set class frequencies)"),
    (lambda a: not torch.compiler.is_compiling() and int(a.yc.max()) >= a.class_prior.numel(), ValueError,
     lambda a: f"class_prior has {a.class_prior.numel()} classes but a label is {int(a.yc.max())}"),
    (lambda a: not torch.compiler.is_compiling() and not bool((a.class_prior > 0).all()), ValueError,
     lambda a: "class_prior must be > 0 for every class"),
)  # fmt: skip
# inputs the backends read as constants: a gradient asked of them would silently be missing
_CONSTANTS = ("log_prior", "class_prior", "pos_mask")


def _apply(rules: tuple[_Rule, ...], a: _Args) -> None:
    for broken, error, message in rules:
        if broken(a):
            raise error(message(a))


def _check(features: Tensor, labels: Tensor, *, check_finite: bool, **kwargs) -> _Checked:
    """Check and normalise the arguments of `contrastive_loss` (its defaults apply); the problem of the rows given."""
    a = _Args(**kwargs, features=checks.tensor("features", features, ndim=2, floating=True))
    a.n, a.d = a.features.shape
    if a.n == 0 or a.d == 0:
        raise ValueError(f"features must be a non-empty [N, d] tensor, got shape {_shape(a.features)}")
    a.set(check_settings(**{k: kwargs[k] for k in _SETTINGS}))
    a.n_anchor = a.n if a.n_anchor is None else int(a.n_anchor)
    if not 1 <= a.n_anchor <= a.n:
        raise ValueError(f"n_anchor must be in [1, {a.n}] (the number of feature rows), got {a.n_anchor}")
    _centres(a)
    _tensors(a)
    _apply(_OPTION_RULES, a)
    a.labels = checks.labels("labels", labels, a.n, a.features, a.num_classes or None)
    if a.queue is not None:
        a.queue_labels = checks.labels(
            "queue_labels", a.queue_labels, a.queue.shape[0], a.features, a.num_classes or None
        )
        if a.queue.shape[0] == 0:
            a.queue = a.queue_labels = None
    if check_finite:
        for name in ("features", "queue", "centre_logits"):
            checks.finite(name, getattr(a, name))
    a.yc = a.labels if a.queue_labels is None else torch.cat([a.labels, a.queue_labels])
    if a.negative_weight == "prior":
        _apply(_PRIOR_RULES, a)
    if a.pos_mask is not None:
        _pos_mask(a)
    return _problem(a)


def _centres(a: _Args) -> None:
    """The centre block: centre_logits [n_anchor, C] and log_prior [C] (flattened to fp32)."""
    a.num_classes = 0
    if a.centre_logits is None:
        return
    a.centre_logits = checks.tensor("centre_logits", a.centre_logits, ndim=2, floating=True)
    checks.same_device("centre_logits", a.centre_logits, a.features, "features")
    if a.log_prior is not None:
        a.log_prior = checks.tensor("log_prior", a.log_prior, floating=True)
    _apply(_CENTRE_RULES, a)
    a.num_classes = a.centre_logits.shape[1]
    if a.log_prior is not None:
        checks.same_device("log_prior", a.log_prior, a.features, "features")
        a.log_prior = a.log_prior.reshape(-1).float()


def _tensors(a: _Args) -> None:
    """Types, devices and gradients of the optional tensors (their shapes: the rule tables)."""
    if a.queue is not None:
        a.queue = checks.tensor("queue", a.queue, ndim=2, floating=True)
        checks.same_device("queue", a.queue, a.features, "features")
    if a.class_prior is not None and a.negative_weight == "prior":
        a.class_prior = checks.tensor("class_prior", a.class_prior).reshape(-1)
    for name in _CONSTANTS:
        x = getattr(a, name)
        if isinstance(x, Tensor) and x.requires_grad:
            raise ValueError(f"{name} gets no gradient from the loss (it is read as a constant); pass {name}.detach()")


def _pos_mask(a: _Args) -> None:
    a.pos_mask = checks.tensor("pos_mask", a.pos_mask, ndim=2)
    rows, cols = a.pos_mask.shape
    m = a.n + (0 if a.queue is None else a.queue.shape[0])
    tiled = rows == cols and rows > 0 and a.n_anchor % rows == 0 and m % cols == 0
    if (rows, cols) != (a.n_anchor, m) and not tiled:
        raise ValueError(
            f"pos_mask must have shape [{a.n_anchor}, {m}], or [B, B] with B dividing both, got {_shape(a.pos_mask)}"
        )
    checks.same_device("pos_mask", a.pos_mask, a.features, "features")


def _problem(a: _Args) -> _Checked:
    weigh = functools.partial(
        column_weights,
        kind=a.negative_weight,
        gamma=a.gamma,
        num_classes=a.num_classes,
        has_centres=a.centre_logits is not None,
        class_prior=a.class_prior,
        kappa=a.kappa,
    )
    w_other, w_same = weigh(a.yc)
    problem = LossProblem(
        z=a.features,
        labels=a.labels,
        n_anchor=a.n_anchor,
        queue=a.queue,
        queue_labels=a.queue_labels,
        centre_logits=a.centre_logits,
        log_prior=a.log_prior,
        num_classes=a.num_classes,
        mode=a.mode,
        temperature=a.temperature,
        loss_scale=a.temperature / a.base_temperature,
        alpha=a.alpha,
        beta=a.beta,
        supt=a.supt,
        smooth=float(a.smooth),
        w_other=w_other,
        w_same=w_same,
        pos_mask=a.pos_mask,
    )
    return _Checked(problem, a.reduction, weigh)
