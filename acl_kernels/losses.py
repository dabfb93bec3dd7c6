"""Drop-in loss modules: each maps its official constructor and forward onto `contrastive_loss`.

Every preset also takes `impl=` (backend), `process_group=` (a torch.distributed group: each
rank passes its local inputs and gets the loss of the global batch; the layout and the gradient
convention, under which DistributedDataParallel's average equals the single-process gradient, are
in `contrastive_loss`'s docstring) and `check_finite=` (False skips the NaN/Inf check of the inputs).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import checks, distributed
from .functional import check_settings, contrastive_loss


def _views_to_rows(name: str, x: Tensor) -> Tensor:
    """[bsz, n_views, ...] -> [n_views * bsz, prod(...)] view-major (row v * bsz + b)."""
    x = checks.tensor(name, x, floating=True)
    if x.dim() < 3:
        raise ValueError(f"{name} must be [bsz, n_views, ...] (at least 3 dimensions), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [bsz, n_views, d] tensor, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return x.transpose(0, 1).reshape(-1, x.shape[2])


def _batch_labels(labels: Tensor, features: Tensor) -> Tensor:
    """labels [bsz] of features [bsz, n_views, ...], flattened; the error hints at a [n_views, bsz, d] layout."""
    labels = checks.tensor("labels", labels, floating=False).reshape(-1)
    bsz, n_views = features.shape[0], features.shape[1]
    if labels.shape[0] != bsz:
        hint = ""
        if labels.shape[0] == n_views:
            hint = f"; features {tuple(features.shape)} look like [n_views, bsz, d]: pass features.transpose(0, 1)"
        raise ValueError(f"labels must have shape [bsz] = [{bsz}], got {tuple(labels.shape)}{hint}")
    return labels


def _view_logits(sup_logits: Tensor, bsz: int, n_views: int, num_classes: int) -> Tensor:
    """sup_logits [bsz, n_views, C] -> [n_views * bsz, C] view-major, with a hint for the usual other layouts."""
    want = (bsz, n_views, num_classes)
    sup_logits = checks.tensor("sup_logits", sup_logits, floating=True)
    if tuple(sup_logits.shape) != want:
        hint = ""
        if sup_logits.dim() == 2 and sup_logits.shape[0] == bsz * n_views:
            hint = (
                f"; logits of the rows in view order [n_views * bsz, C] are "
                f"sup_logits.view({n_views}, {bsz}, C).transpose(0, 1)"
            )
        elif tuple(sup_logits.shape) == (n_views, bsz, num_classes):
            hint = "; logits laid out [n_views, bsz, C]: pass sup_logits.transpose(0, 1)"
        got = tuple(sup_logits.shape)
        raise ValueError(f"sup_logits must have shape [bsz, n_views, num_classes] = {list(want)}, got {got}{hint}")
    return sup_logits.transpose(0, 1).reshape(-1, num_classes)


class SupConLoss(nn.Module):
    """Supervised contrastive loss with the arguments and semantics of HobbitLong/SupContrast.

    forward(features [bsz, n_views, ...] unit rows, labels [bsz] or mask [bsz, bsz] or neither
    (SimCLR)). Anchors without a positive contribute 0 and count in the mean, as the current
    official code does. An explicit `mask` is read one row chunk at a time by the torch backend
    (auto picks it for a mask, on CUDA too: the Triton kernels take labels only).
    Under a process group, without labels (SimCLR) each image is its own class across ranks, and
    `mask` is refused.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        impl: str = "auto",
        process_group=None,
        check_finite: bool = True,
    ):
        super().__init__()
        settings = check_settings(temperature=temperature, base_temperature=base_temperature, impl=impl)
        self.temperature = settings["temperature"]
        self.contrast_mode = checks.choice("contrast_mode", contrast_mode, ("all", "one"))
        self.base_temperature = settings["base_temperature"]
        self.impl = impl
        self.process_group = process_group
        self.check_finite = checks.flag("check_finite", check_finite)

    def forward(self, features: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        z = _views_to_rows("features", features)
        bsz, n_views = features.shape[0], features.shape[1]
        if labels is not None and mask is not None:
            raise ValueError("pass labels or mask, not both")
        pos_mask = None
        if mask is not None:
            mask = checks.tensor("mask", mask, ndim=2)
            if tuple(mask.shape) != (bsz, bsz):
                raise ValueError(f"mask must have shape [bsz, bsz] = [{bsz}, {bsz}], got {tuple(mask.shape)}")
            # the [bsz, bsz] block, tiled over the views by the backend: nothing N x N is built
            pos_mask = mask.to(device=z.device, dtype=torch.float32)
            labels = torch.zeros(bsz, dtype=torch.long, device=z.device)
        elif labels is None:
            first = 0
            if self.process_group is not None:
                first = distributed.row_offset(bsz, self.process_group, z.device)
            labels = torch.arange(first, first + bsz, device=z.device)
        else:
            labels = _batch_labels(labels, features)
        return contrastive_loss(
            z,
            labels.to(z.device).repeat(n_views),
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            n_anchor=bsz if self.contrast_mode == "one" else None,
            pos_mask=pos_mask,
            impl=self.impl,
            process_group=self.process_group,
            check_finite=self.check_finite,
        )


class _CentreLoss(nn.Module):
    """Shared state of the presets with a class-centre block: the class prior."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = checks.count("num_classes", num_classes, 1)
        self.weight: Tensor | None = None  # [1, C] training-set class frequencies, as the official code
        self._warned_prior = False

    def cal_weight_for_classes(self, cls_num_list) -> None:
        """Set the class prior pi from per-class training counts (enables logit compensation)."""
        counts = torch.as_tensor(cls_num_list, dtype=torch.float32).reshape(-1)
        if counts.shape[0] != self.num_classes:
            raise ValueError(f"cls_num_list must have num_classes={self.num_classes} entries, got {counts.shape[0]}")
        if not bool((counts >= 0).all()) or counts.sum() <= 0:
            raise ValueError("cls_num_list must hold non-negative counts with a positive total")
        self.weight = (counts / counts.sum()).view(1, self.num_classes)

    # why the preset wants the prior (PaCo/GPaCo: their official code fails without it)
    _prior_note = "the official code requires it"

    def _warn_without_prior(self) -> None:
        """cal_weight_for_classes adds log pi to the centre logits; without it the preset computes the
        loss without that compensation, and says so once."""
        if self.weight is None and not self._warned_prior:
            self._warned_prior = True
            warnings.warn(
                f"{type(self).__name__}: cal_weight_for_classes(cls_num_list) was not called, so the centre "
                f"logits get no log-prior compensation ({self._prior_note}); call it with the "
                "training-set class counts",
                UserWarning,
                stacklevel=2,
            )

    def _log_prior(self, like: Tensor) -> Tensor | None:
        # log(pi + 1e-9) exactly as the official code, so values match to fp32 rounding
        return None if self.weight is None else torch.log(self.weight.to(like.device) + 1e-9).reshape(-1)

    def _check_sup_logits(self, sup_logits: Tensor | None, rows: int) -> Tensor:
        if sup_logits is None:
            raise ValueError("sup_logits is required (the classifier logits of the anchors)")
        sup_logits = checks.tensor("sup_logits", sup_logits, ndim=2, floating=True)
        if tuple(sup_logits.shape) != (rows, self.num_classes):
            raise ValueError(
                f"sup_logits must have shape [{rows}, num_classes={self.num_classes}], got {tuple(sup_logits.shape)}"
            )
        return sup_logits


class PaCoLoss(_CentreLoss):
    """Parametric contrastive loss with the arguments and semantics of the official PaCo/LT code.

    forward(features [2B + K, d] = [q; k; queue] unit rows, labels [2B + K], sup_logits [B, C]):
    anchors are the B query rows; the contrast set is every row but the anchor itself; the own
    class centre is a positive of weight beta, sample positives weigh alpha, the sample block is
    scaled by gamma in the denominator. After `cal_weight_for_classes`, log(pi) is added to the
    centre logits (logit compensation); the official code fails without it, this preset warns once
    (UserWarning) and computes the loss without compensation. `forward(..., mask=None, epoch=None)`
    takes the official keywords, so `criterion(features, labels, logits, epoch=epoch)` runs unchanged.
    Under a process group the anchors are the query rows of every rank, the queue rows (replicated, the
    caller's) get no gradient.
    """

    anchors_are_queries_only = True
    default_K = 128  # the official code's default queue size

    def __init__(
        self,
        alpha: float,
        beta: float = 1.0,
        gamma: float = 1.0,
        supt: float = 1.0,
        temperature: float = 1.0,
        base_temperature: float | None = None,
        K: int | None = None,  # None: default_K
        num_classes: int = 1000,
        smooth: float = 0.0,
        impl: str = "auto",
        process_group=None,
        check_finite: bool = True,
    ):
        super().__init__(num_classes)
        s = check_settings(
            temperature=temperature,
            base_temperature=base_temperature,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            supt=supt,
            smooth=smooth,
            impl=impl,
        )
        self.alpha, self.beta, self.gamma, self.supt = s["alpha"], s["beta"], s["gamma"], s["supt"]
        self.temperature, self.base_temperature = s["temperature"], s["base_temperature"]
        self.K = checks.count("K", self.default_K if K is None else K, 0)
        self.smooth = s["smooth"]
        self.impl = impl
        self.process_group = process_group
        self.check_finite = checks.flag("check_finite", check_finite)

    def forward(
        self,
        features: Tensor,
        labels: Tensor | None = None,
        sup_logits: Tensor | None = None,
        mask: Tensor | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        """The official forward's keywords: `epoch` is accepted and unused (as there); the official code
        overwrites `mask` with the label test, so a mask is refused here rather than ignored."""
        if mask is not None:
            raise ValueError(f"{type(self).__name__} takes positives from labels; mask must be None")
        features = checks.tensor("features", features, ndim=2, floating=True)
        if features.numel() == 0:
            raise ValueError(f"features must be a non-empty [rows, d] tensor, got shape {tuple(features.shape)}")
        rows = features.shape[0] - self.K
        if rows < 1 + self.anchors_are_queries_only:
            raise ValueError(
                f"K={self.K} leaves {rows} in-batch rows of the {features.shape[0]} feature rows; "
                f"features must be [{'2B' if self.anchors_are_queries_only else 'N'} + K, d]"
            )
        if labels is None:
            raise ValueError("labels is required")
        labels = checks.labels("labels", labels, features.shape[0], features, self.num_classes)
        n_anchor = rows // 2 if self.anchors_are_queries_only else rows
        self._warn_without_prior()
        queue = features[rows:] if self.K else None
        if queue is not None and self.process_group is not None:
            queue = queue.detach()
        return contrastive_loss(
            features[:rows],
            labels[:rows],
            queue=queue,
            queue_labels=labels[rows:] if self.K else None,
            n_anchor=n_anchor,
            centre_logits=self._check_sup_logits(sup_logits, n_anchor),
            log_prior=self._log_prior(features),
            supt=self.supt,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            smooth=self.smooth,
            impl=self.impl,
            process_group=self.process_group,
            check_finite=self.check_finite,
        )


class GPaCoLoss(PaCoLoss):
    """GPaCo's loss (official GPaCo/LT PaCoLoss): like PaCo, but every in-batch row is an anchor.

    forward(features [N + K, d] = [views; queue], labels [N + K], sup_logits [N, C]); `smooth` is
    the label smoothing of the centre target. Same arguments as PaCoLoss; K defaults to 8192.
    """

    anchors_are_queries_only = False
    default_K = 8192


class ACLLoss(_CentreLoss):
    """Aligned Contrastive Loss (mode "aligned"), multi-view, with class centres and re-weighted negatives.

    The formula is this package's reconstruction of the analysis in Ma et al., arXiv 2506.01071
    (the paper's full text could not be read): every positive p of anchor i gets its own
    denominator holding only itself and the negatives,
        L_i = -(1/A_i) sum_p t_ip log( e^{l_ip} / (e^{l_ip} + sum_neg g_ik e^{l_ik}) ),
    so positives are only attracted and negatives only repelled (ops/contrastive/README.md).

    With its defaults, every view of every image is an anchor; its positives are its own class centre
    (weight beta = 1, logit u_c + log pi_c) and every other same-class row (alpha = 0.05 each, logit
    z_i.z_j / 0.2); its negatives are the other centres (weight 1) and the other classes' rows, each
    weighted gamma / (rows of its class in the batch + 1), gamma = 0.1. The centre term is thus
    logit-adjusted cross-entropy with lightly weighted, class-balanced sample negatives in its
    denominator. These defaults are the MNIST-LT study's recommended ACL: the best validation top-1
    of ACL's search winner (gamma 1) and its ablation's variants (train/results/study.md;
    docs/losses.md spells it out, with what that selection means).

    Arguments:
        num_classes: C of the classifier whose rows are the class centres.
        temperature (0.2), base_temperature (= temperature): logits s / temperature, loss scaled by
            temperature / base_temperature.
        alpha (0.05): target weight of each sample positive; beta (1.0): of the own class centre.
        gamma (0.1): weight of sample negatives in the denominators (1.0 weighs them as PaCo does);
            supt (1.0): centre temperature.
        negative_weight ("batch"): "batch" weighs a negative of class c by 1 / (count of c in the
            contrast set, centre included); "prior" by pi_c^-kappa (needs cal_weight_for_classes);
            "none".
        kappa (1.0): exponent of the "prior" weighting.
        logit_adjust (True): add log(pi) to the centre logits once cal_weight_for_classes was called
            (with centres and without it, the first forward warns that the adjustment is missing).
        check_finite (True): refuse NaN/Inf inputs (one device sync per call), as contrastive_loss.
        mode ("aligned"): "softmax" gives all positives of an anchor one shared denominator, as
            SupCon, with everything else unchanged (the ablation of the aligned denominators).

    forward(features [bsz, n_views, d] unit rows (any n_views >= 1), labels [bsz],
            sup_logits [bsz, n_views, C] or None (no centre block),
            queue [K, d] and queue_labels [K] or None).
    Under a process group the queue must be detached.
    """

    _prior_note = "logit_adjust=True by default; pass logit_adjust=False to go without"

    def __init__(
        self,
        num_classes: int,
        temperature: float = 0.2,
        base_temperature: float | None = None,
        alpha: float = 0.05,
        beta: float = 1.0,
        gamma: float = 0.1,
        supt: float = 1.0,
        negative_weight: str = "batch",
        kappa: float = 1.0,
        logit_adjust: bool = True,
        mode: str = "aligned",
        impl: str = "auto",
        process_group=None,
        check_finite: bool = True,
    ):
        super().__init__(num_classes)
        s = check_settings(
            mode=mode,
            temperature=temperature,
            base_temperature=base_temperature,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            supt=supt,
            negative_weight=negative_weight,
            kappa=kappa,
            impl=impl,
        )
        self.temperature, self.base_temperature = s["temperature"], s["base_temperature"]
        self.alpha, self.beta, self.gamma, self.supt = s["alpha"], s["beta"], s["gamma"], s["supt"]
        self.negative_weight = s["negative_weight"]
        self.kappa, self.mode = s["kappa"], s["mode"]
        self.logit_adjust = checks.flag("logit_adjust", logit_adjust)
        self.impl = impl
        self.process_group = process_group
        self.check_finite = checks.flag("check_finite", check_finite)

    def forward(
        self,
        features: Tensor,
        labels: Tensor,
        sup_logits: Tensor | None = None,
        queue: Tensor | None = None,
        queue_labels: Tensor | None = None,
    ) -> Tensor:
        z = _views_to_rows("features", features)
        bsz, n_views = features.shape[0], features.shape[1]
        labels = checks.labels("labels", _batch_labels(labels, features), bsz, z, self.num_classes).repeat(n_views)
        centre = None
        if sup_logits is not None:
            centre = _view_logits(sup_logits, bsz, n_views, self.num_classes)
            if self.logit_adjust:
                self._warn_without_prior()
        if self.negative_weight == "prior" and self.weight is None:
            raise ValueError("negative_weight='prior' needs cal_weight_for_classes(cls_num_list) first")
        return contrastive_loss(
            z,
            labels,
            mode=self.mode,
            queue=queue,
            queue_labels=queue_labels,
            centre_logits=centre,
            log_prior=self._log_prior(z) if (centre is not None and self.logit_adjust) else None,
            supt=self.supt,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            negative_weight=self.negative_weight,
            class_prior=None if self.weight is None else self.weight.reshape(-1),
            kappa=self.kappa,
            impl=self.impl,
            process_group=self.process_group,
            check_finite=self.check_finite,
        )
