"""Bad input gets a clear error that names the argument."""

import warnings

import pytest
import torch
from conftest import require_native, unit_rows

from acl_kernels import ACLLoss, GPaCoLoss, SupConLoss, contrastive_loss

Z = unit_rows(8, 4)
Y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"features": Z.numpy()}, TypeError, "features must be a torch.Tensor"),
        ({"features": Z[None]}, ValueError, "features must have 2 dimensions"),
        ({"features": Z.long()}, TypeError, "features must be float16"),
        ({"features": Z[:0]}, ValueError, "non-empty"),
        ({"labels": Y[:5]}, ValueError, r"labels must have shape \[8\]"),
        ({"labels": Y.float()}, TypeError, "labels must hold integer"),
        ({"labels": Y - 1}, ValueError, "labels must be >= 0"),
        ({"centre_logits": torch.randn(8, 2)}, ValueError, "labels must be < num_classes=2"),
        ({"centre_logits": torch.randn(5, 3)}, ValueError, "centre_logits must have shape"),
        ({"centre_logits": torch.randn(8, 3), "log_prior": torch.zeros(4)}, ValueError, "log_prior must have 3"),
        ({"log_prior": torch.zeros(3)}, ValueError, "log_prior needs centre_logits"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"base_temperature": 0.0}, ValueError, "base_temperature must be > 0"),
        ({"supt": 0.0}, ValueError, "supt must be > 0"),
        ({"alpha": -1.0}, ValueError, "alpha must be >= 0"),
        ({"gamma": 0.0}, ValueError, "gamma must be > 0 when there is no centre block"),
        ({"mode": "supcon"}, ValueError, "mode must be one of"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"negative_weight": "x"}, ValueError, "negative_weight must be one of"),
        ({"negative_weight": "prior"}, ValueError, "needs class_prior"),
        ({"negative_weight": "prior", "class_prior": torch.ones(2)}, ValueError, "class_prior has 2 classes"),
        ({"negative_weight": "prior", "class_prior": torch.tensor([1.0, 0.0, 1.0])}, ValueError, "must be > 0"),
        ({"n_anchor": 0}, ValueError, "n_anchor must be in"),
        ({"n_anchor": 9}, ValueError, "n_anchor must be in"),
        ({"queue": unit_rows(3, 4)}, ValueError, "queue_labels is required"),
        ({"queue": unit_rows(3, 5), "queue_labels": torch.zeros(3, dtype=torch.long)}, ValueError, "queue must"),
        ({"queue": unit_rows(3, 4).double(), "queue_labels": torch.zeros(3, dtype=torch.long)}, TypeError, "dtype"),
        ({"queue": unit_rows(3, 4), "queue_labels": torch.zeros(2, dtype=torch.long)}, ValueError, "queue_labels"),
        ({"queue_labels": torch.zeros(2, dtype=torch.long)}, ValueError, "queue_labels was given without queue"),
        ({"smooth": 0.1}, ValueError, "smooth needs centre_logits"),
        ({"smooth": 1.5}, ValueError, r"smooth must be in \[0, 1\)"),
        ({"smooth": 0.1, "centre_logits": torch.randn(8, 3), "mode": "aligned"}, ValueError, "only defined"),
        ({"pos_mask": torch.ones(3, 3)}, ValueError, r"pos_mask must have shape \[8, 8\], or \[B, B\]"),
        ({"pos_mask": torch.ones(8, 7)}, ValueError, "pos_mask must have shape"),
    ],
)
def test_functional_errors(kwargs, error, match):
    args = {"features": Z, "labels": Y, **kwargs}
    with pytest.raises(error, match=match):
        contrastive_loss(args.pop("features"), args.pop("labels"), **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_reported(bad):
    z = Z.clone()
    z[3, 1] = bad
    with pytest.raises(ValueError, match="features holds 1 NaN/Inf"):
        contrastive_loss(z, Y)
    assert not torch.isfinite(contrastive_loss(z, Y, check_finite=False, impl="reference"))
    u = torch.randn(8, 3)
    u[0, 0] = bad
    with pytest.raises(ValueError, match="centre_logits holds"):
        contrastive_loss(Z, Y, centre_logits=u)


def test_explicit_backend_reports_reasons():
    with pytest.raises(ValueError, match="triton.*(CUDA|Triton|interpret)"):
        contrastive_loss(Z, Y, impl="triton")


def test_preset_errors():
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        SupConLoss()(Z, Y)
    with pytest.raises(ValueError, match="contrast_mode must be one of"):
        SupConLoss(contrast_mode="two")
    with pytest.raises(ValueError, match="labels or mask, not both"):
        SupConLoss()(Z.view(4, 2, 4), Y[:4], mask=torch.eye(4))
    with pytest.raises(ValueError, match=r"labels must have shape \[bsz\]"):
        SupConLoss()(Z.view(4, 2, 4), Y)
    with pytest.raises(ValueError, match="mask must have shape"):
        SupConLoss()(Z.view(4, 2, 4), mask=torch.eye(3))
    with pytest.raises(ValueError, match="K must be >= 0"):
        GPaCoLoss(alpha=0.1, K=-1)
    with pytest.raises(ValueError, match="sup_logits must have shape"):
        ACLLoss(3)(Z.view(4, 2, 4), Y[:4], sup_logits=torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="cal_weight_for_classes"):
        ACLLoss(3, negative_weight="prior")(Z.view(4, 2, 4), Y[:4])
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ACLLoss(0)


def test_device_mismatch_is_named():
    meta = torch.zeros(8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels is on meta but features is on cpu"):
        contrastive_loss(Z, meta)


@pytest.mark.parametrize("impl", ["reference", "torch", "native"])
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_nan_in_the_queue_reaches_every_loss(impl, mode, rng):
    """check_finite=False: a NaN contrast row is in every anchor's denominator, so the loss of every
    anchor with a target is NaN (a kernel that took log(NaN mass) as 0 gave a finite loss and NaN
    gradients)."""
    if impl == "native":
        require_native()
    for n, k, d in ((16, 16, 32), (8, 4, 16), (40, 64, 64)):
        z = unit_rows(n, d, generator=rng)
        q = unit_rows(k, d, generator=rng)
        q[int(torch.randint(0, k, (1,), generator=rng)), 1] = float("nan")
        y, qy = (torch.randint(0, 5, (m,), generator=rng) for m in (n, k))
        kw = dict(queue=q, queue_labels=qy, mode=mode, impl=impl, check_finite=False, reduction="none")
        losses = contrastive_loss(z, y, **kw)
        has_target = (y[:, None] == torch.cat([y, qy])[None, :]).sum(1) > 1  # the loss is 0 without one
        assert has_target.any() and torch.isnan(losses[has_target]).all(), f"n={n} k={k} d={d}: {losses}"
        assert (losses[~has_target] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_second_derivative_is_refused(impl):
    if impl == "native":
        require_native()
    z = Z.clone().requires_grad_()
    (g,) = torch.autograd.grad(contrastive_loss(z, Y, impl=impl), z)  # a first derivative works
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="not differentiable.*impl='reference'"):
        torch.autograd.grad(contrastive_loss(z, Y, impl=impl), z, create_graph=True)


def test_labels_beyond_int32_are_refused():
    big = Y.clone()
    big[0] = 2**32  # as int32 it would be class 0
    with pytest.raises(ValueError, match=r"labels must be < 2\^31"):
        contrastive_loss(Z, big)
    q = unit_rows(2, 4)
    with pytest.raises(ValueError, match=r"queue_labels must be < 2\^31"):
        contrastive_loss(Z, Y, queue=q, queue_labels=torch.tensor([1, 2**31]))


def test_constants_that_require_grad_are_refused():
    u = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"log_prior gets no gradient.*log_prior.detach\(\)"):
        contrastive_loss(Z, Y, centre_logits=u, log_prior=torch.zeros(3, requires_grad=True))
    prior = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="class_prior gets no gradient"):
        contrastive_loss(Z, Y, negative_weight="prior", class_prior=prior)


def test_preset_hints():
    """The errors a new user meets point at the fix: layout, check_finite, sup_logits rank."""
    feats = Z.view(4, 2, 4)
    with pytest.raises(ValueError, match=r"look like \[n_views, bsz, d\]: pass features.transpose\(0, 1\)"):
        SupConLoss()(feats, Y[:2])
    with pytest.raises(ValueError, match=r"look like \[n_views, bsz, d\]"):
        ACLLoss(3)(feats, Y[:2])
    with pytest.raises(ValueError, match=r"view order \[n_views \* bsz, C\] are sup_logits.view\(2, 4, C\)"):
        ACLLoss(3)(feats, Y[:4], sup_logits=torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"\[n_views, bsz, C\]: pass sup_logits.transpose\(0, 1\)"):
        ACLLoss(3)(feats, Y[:4], sup_logits=torch.randn(2, 4, 3))
    bad = feats.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="check_finite=False, to contrastive_loss or to a preset's constructor"):
        SupConLoss()(bad, Y[:4])
    for preset in (SupConLoss(check_finite=False), ACLLoss(3, check_finite=False)):
        assert torch.isnan(preset(bad, Y[:4]))
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        GPaCoLoss(alpha=0.1, check_finite=1)


def test_acl_without_class_counts_warns_once():
    feats, sup = Z.view(4, 2, 4), torch.randn(4, 2, 3)
    loss = ACLLoss(3)
    with pytest.warns(UserWarning, match="ACLLoss: cal_weight_for_classes.*logit_adjust=False") as seen:
        loss(feats, Y[:4], sup_logits=sup)
        loss(feats, Y[:4], sup_logits=sup)
    assert len(seen) == 1
    for quiet in (ACLLoss(3, logit_adjust=False), ACLLoss(3)):
        if quiet.logit_adjust:
            quiet.cal_weight_for_classes([1, 2, 3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet(feats, Y[:4], sup_logits=sup)
            ACLLoss(3)(feats, Y[:4])  # no centre block: nothing to adjust
