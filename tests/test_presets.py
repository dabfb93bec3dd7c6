"""Each preset against a restatement of its official code: value and gradients, fp32 relative 1e-5."""

import warnings

import official
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, unit_rows

from acl_kernels import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss

IMPLS = ["reference", "torch"]


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def check(ours, theirs, inputs, rtol=1e-5):
    assert_close(ours, theirs, rtol, "loss")
    for i, (a, b) in enumerate(zip(grads(ours, inputs), grads(theirs, inputs))):
        assert_close(a, b, rtol, f"grad[{i}]")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("views", [1, 2, 4])
def test_supcon_labels(rng, impl, contrast_mode, views):
    bsz = 37
    feats = unit_rows(bsz, views, 32, generator=rng).requires_grad_()
    labels = torch.randint(0, 5, (bsz,), generator=rng)
    labels[0] = 9  # a class with one sample: no positive when views == 1
    kw = {"temperature": 0.1, "contrast_mode": contrast_mode, "base_temperature": 0.07}
    ours = SupConLoss(**kw, impl=impl)(feats, labels)
    theirs = official.supcon(feats, labels, **kw)
    check(ours, theirs, [feats])


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_simclr_and_mask(rng, contrast_mode):
    bsz, views = 20, 3
    feats = unit_rows(bsz, views, 2, 8, generator=rng).requires_grad_()  # [bsz, n_views, ...] is flattened
    kw = {"temperature": 0.2, "contrast_mode": contrast_mode}
    check(SupConLoss(**kw)(feats), official.supcon(feats, **kw), [feats])
    mask = (torch.rand(bsz, bsz, generator=rng) < 0.3).float()  # asymmetric, as the official code allows
    check(SupConLoss(**kw)(feats, mask=mask), official.supcon(feats, mask=mask, **kw), [feats])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("k", [0, 64])
@pytest.mark.filterwarnings("ignore:PaCoLoss. cal_weight_for_classes")
def test_paco(rng, impl, with_prior, k):
    b, c, d = 24, 10, 32
    feats = unit_rows(2 * b + k, d, generator=rng).requires_grad_()
    labels = torch.randint(0, c, (2 * b + k,), generator=rng)
    sup_logits = torch.randn(b, c, generator=rng).requires_grad_()
    kw = {"alpha": 0.05, "beta": 1.0, "gamma": 1.0, "supt": 1.0, "temperature": 0.2, "K": k, "num_classes": c}
    loss = PaCoLoss(**kw, impl=impl)
    weight = None
    if with_prior:
        counts = torch.randint(1, 500, (c,), generator=rng).tolist()
        loss.cal_weight_for_classes(counts)
        weight = torch.tensor(counts, dtype=torch.float32).view(1, c) / sum(counts)
    check(
        loss(feats, labels, sup_logits),
        official.paco(feats, labels, sup_logits, weight=weight, **kw),
        [feats, sup_logits],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("smooth", [0.0, 0.1])
def test_gpaco(rng, impl, smooth):
    n, k, c, d = 40, 30, 8, 16
    feats = unit_rows(n + k, d, generator=rng).requires_grad_()
    labels = torch.randint(0, c, (n + k,), generator=rng)
    sup_logits = torch.randn(n, c, generator=rng).requires_grad_()
    kw = {
        "alpha": 0.045,
        "beta": 1.0,
        "gamma": 1.0,
        "supt": 1.0,
        "temperature": 0.2,
        "K": k,
        "num_classes": c,
        "smooth": smooth,
    }
    loss = GPaCoLoss(**kw, impl=impl)
    counts = torch.randint(1, 300, (c,), generator=rng).tolist()
    loss.cal_weight_for_classes(counts)
    weight = torch.tensor(counts, dtype=torch.float32).view(1, c) / sum(counts)
    theirs = official.paco(feats, labels, sup_logits, weight=weight, queries_only=False, **kw)
    check(loss(feats, labels, sup_logits), theirs, [feats, sup_logits])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("negative_weight", ["none", "batch", "prior"])
@pytest.mark.parametrize("centres", [False, True])
def test_acl(rng, impl, negative_weight, centres):
    bsz, views, c, d = 9, 3, 4, 8
    feats = unit_rows(bsz, views, d, dtype=torch.float64, generator=rng).requires_grad_()
    labels = torch.randint(0, c, (bsz,), generator=rng)
    sup = torch.randn(bsz, views, c, dtype=torch.float64, generator=rng).requires_grad_() if centres else None
    loss = ACLLoss(
        c, temperature=0.3, alpha=0.5, beta=1.0, gamma=0.9, negative_weight=negative_weight, kappa=0.7, impl=impl
    )
    counts = torch.randint(1, 100, (c,), generator=rng)
    loss.cal_weight_for_classes(counts.tolist())
    rows = feats.transpose(0, 1).reshape(-1, d)
    y = labels.repeat(views)
    prior = counts.double() / counts.sum()
    if negative_weight == "batch":
        n_c = torch.bincount(y, minlength=c).double() + (1 if centres else 0)
        class_weight = lambda cj, ci: 1.0 / (n_c[cj] - float(cj == ci))  # noqa: E731
    elif negative_weight == "prior":
        raw = prior[y] ** -0.7
        class_weight = lambda cj, ci: prior[cj] ** -0.7 / raw.mean()  # noqa: E731
    else:
        class_weight = None
    sup_rows = sup.transpose(0, 1).reshape(-1, c) if centres else None
    log_prior = torch.log(prior + 1e-9) if centres else None
    theirs = official.aligned(
        rows,
        y,
        sup_rows,
        temperature=0.3,
        alpha=0.5,
        beta=1.0,
        gamma=0.9,
        log_prior=log_prior,
        class_weight=class_weight,
    )
    inputs = [feats] + ([sup] if centres else [])
    check(loss(feats, labels, sup), theirs, inputs, rtol=1e-6)


def test_acl_gradient_signs(rng):
    """The point of ACL: positives are only attracted, negatives only repelled (no gradient conflict).

    SupCon's softmax pushes away a positive whose share exceeds 1/|P|; the aligned mode never does.
    """
    from acl_kernels.ops.contrastive.naive import per_anchor_loss

    n = 48
    z = unit_rows(n, 8, dtype=torch.float64, generator=rng)
    y = torch.randint(0, 3, (n,), generator=rng)
    same = y[:, None] == y[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    pos = same & ~eye
    for mode, expect_conflict in [("aligned", False), ("softmax", True)]:
        s = (z @ z.T).requires_grad_()
        per_anchor_loss(s / 0.1, (~eye).double(), pos.double(), pos, mode).sum().backward()
        assert (s.grad[~same] >= 0).all(), "a negative is attracted"
        assert bool((s.grad[pos] > 0).any()) == expect_conflict


# the missing-prior warning is tested in test_paco_drop_in_keywords_and_prior_warning
@pytest.mark.filterwarnings("ignore:PaCoLoss. cal_weight_for_classes")
def test_paco_checks_its_inputs(rng):
    feats = unit_rows(20, 4, generator=rng)
    labels = torch.randint(0, 3, (20,), generator=rng)
    loss = PaCoLoss(alpha=0.1, K=30, num_classes=3)
    with pytest.raises(ValueError, match="K=30"):
        loss(feats, labels, torch.randn(5, 3))
    loss = PaCoLoss(alpha=0.1, K=4, num_classes=3)
    with pytest.raises(ValueError, match="sup_logits must have shape"):
        loss(feats, labels, torch.randn(8, 4))
    with pytest.raises(ValueError, match="sup_logits is required"):
        loss(feats, labels)
    with pytest.raises(ValueError, match="cls_num_list"):
        loss.cal_weight_for_classes([1, 2])


def test_presets_do_not_renormalise(rng):
    """Features are used as given (like the official code): scaling them changes the loss."""
    feats = unit_rows(16, 2, 8, generator=rng)
    labels = torch.randint(0, 3, (16,), generator=rng)
    a = SupConLoss()(feats, labels)
    b = SupConLoss()(F.normalize(feats, dim=-1) * 0.5, labels)
    assert not torch.isclose(a, b)


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_mask_is_read_chunk_by_chunk(rng, monkeypatch, contrast_mode):
    """auto serves `mask=` on the torch path from the [bsz, bsz] block, a few anchor rows at a time."""
    from acl_kernels.ops.contrastive import chunked

    bsz, views, d = 24, 2, 8
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 5 * bsz * views)  # 5 anchor rows per chunk
    seen = []
    weights_into = chunked.weights_into

    def spy(p, rows, yc, g, *args, **kw):
        seen.append((tuple(p.pos_mask.shape), g.shape[0]))
        return weights_into(p, rows, yc, g, *args, **kw)

    monkeypatch.setattr(chunked, "weights_into", spy)
    feats = unit_rows(bsz, views, d, generator=rng).requires_grad_()
    mask = (torch.rand(bsz, bsz, generator=rng) < 0.3).float()
    kw = {"temperature": 0.2, "contrast_mode": contrast_mode}
    check(SupConLoss(**kw)(feats, mask=mask), official.supcon(feats, mask=mask, **kw), [feats])
    assert seen and all(shape == (bsz, bsz) and rows <= 5 for shape, rows in seen), seen


def test_paco_drop_in_keywords_and_prior_warning(rng):
    b, c, d = 6, 3, 8
    feats = unit_rows(2 * b, d, generator=rng)
    labels = torch.randint(0, c, (2 * b,), generator=rng)
    logits = torch.randn(b, c, generator=rng)
    for cls in (PaCoLoss, GPaCoLoss):
        loss = cls(alpha=0.05, K=0, num_classes=c)
        n_anchor = 2 * b if cls is GPaCoLoss else b
        with pytest.warns(UserWarning, match="cal_weight_for_classes") as seen:
            first = loss(feats, labels, logits[:1].expand(n_anchor, c), epoch=3)
            loss(feats, labels, logits[:1].expand(n_anchor, c), mask=None, epoch=4)
        assert len(seen) == 1 and torch.isfinite(first)  # once per instance
        loss.cal_weight_for_classes([1, 2, 3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(feats, labels, logits[:1].expand(n_anchor, c), epoch=5)
        with pytest.raises(ValueError, match="mask must be None"):
            loss(feats, labels, logits[:1].expand(n_anchor, c), mask=torch.ones(b, 2 * b))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SupConLoss(temperature=float("nan")), "temperature must be a finite number"),
        (lambda: SupConLoss(base_temperature=float("inf")), "base_temperature must be a finite number"),
        (lambda: SupConLoss(impl="cuda"), "impl must be one of"),
        (lambda: PaCoLoss(alpha=-1.0), "alpha must be >= 0"),
        (lambda: PaCoLoss(alpha=0.1, smooth=1.0), r"smooth must be in \[0, 1\)"),
        (lambda: PaCoLoss(alpha=0.1, K=2.5), "K must be an int"),
        (lambda: GPaCoLoss(alpha=0.1, supt=0.0), "supt must be > 0"),
        (lambda: ACLLoss(3, negative_weight="x"), "negative_weight must be one of"),
        (lambda: ACLLoss(3, kappa=float("nan")), "kappa must be a finite number"),
        (lambda: ACLLoss(3, gamma="1"), "gamma must be a number"),
        (lambda: ACLLoss(3, logit_adjust="yes"), "logit_adjust must be True or False"),
        (lambda: ACLLoss(2.0), "num_classes must be an int"),
    ],
)
def test_preset_options_are_checked_in_the_constructor(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: SupConLoss()(torch.zeros(0, 2, 8)), r"non-empty \[bsz, n_views, d\].*\(0, 2, 8\)"),
        (lambda: SupConLoss()(torch.zeros(4, 2, 0)), r"non-empty \[bsz, n_views, d\].*\(4, 2, 0\)"),
        (lambda: ACLLoss(3)(torch.zeros(0, 2, 8), torch.zeros(0, dtype=torch.long)), "non-empty"),
        (lambda: PaCoLoss(alpha=0.1, K=0, num_classes=3)(torch.zeros(4, 0), torch.zeros(4).long()), "non-empty"),
    ],
)
def test_empty_batches_are_refused_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call()
