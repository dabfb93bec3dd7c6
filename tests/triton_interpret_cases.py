"""Triton kernels vs the float64 reference under the Triton interpreter, on CPU tensors.

Not collected directly (no test_ prefix): tests/test_triton_interpret.py runs this file in a
subprocess with TRITON_INTERPRET=1, which must be set before the kernels are imported. Run by hand:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/triton_interpret_cases.py
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from conftest import (
    assert_close,
    assert_close_to_oracle,
    assert_within,
    assert_within_error_bar,
    make_case,
    rounding_floor,
    unit_rows,
)  # noqa: E402
from oracle_compare import rounded_product_bars  # noqa: E402

from acl_kernels import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss, contrastive_loss  # noqa: E402
from acl_kernels.ops.contrastive import triton_backend  # noqa: E402

# masked lanes compute exp/log of values they then discard: numpy warns, the results are unaffected
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # the correctness contract


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten row or tail fails the test."""
    assert triton_backend.INTERPRET
    monkeypatch.setattr(triton_backend, "POISON", True)


def run(z, y, kw, inputs, impl, upstream, **extra):
    losses = contrastive_loss(z, y, impl=impl, reduction="none", **kw, **extra)
    grads = torch.autograd.grad(losses, inputs, upstream.to(losses.dtype))
    return losses, grads


def compare(z, y, kw, inputs, rng=None, **extra):
    """triton vs the float64 reference on the same rounded inputs; value and every gradient under a
    random upstream gradient. PyTorch's own error (reference in the input precision) widens the bar.
    fp16/bf16 gradients: the contract's 2e-2 and one bar per element from the rounding of dL/dlogit
    before the products (oracle_compare.rounded_product_bars, against the independent oracle)."""
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    kw64, rest = dict(kw), iter(inputs64[1:])
    for key in ("queue", "centre_logits"):
        if key in kw:
            kw64[key] = next(rest) if kw[key].requires_grad else kw[key].double()
    n_anchor = kw.get("n_anchor") or z.shape[0]
    upstream = torch.randn(n_anchor, dtype=torch.float64, generator=rng)
    oracle = run(inputs64[0], y, kw64, inputs64, "reference", upstream, **extra)
    base = run(z, y, kw, inputs, "reference", upstream, **extra)
    got = run(z, y, kw, inputs, "triton", upstream, **extra)
    assert got[0].dtype == torch.float32
    temperature = extra.get("temperature", 0.07)
    atol = rounding_floor(temperature, upstream)
    half = z.dtype in (torch.float16, torch.bfloat16)
    if half:  # fp32 arithmetic on the rounded data; the gradient products round dL/dlogit to the data type
        logit_scale = max(1 / temperature, 15.0 if "centre_logits" in kw else 0.0)
        assert_within_error_bar(got[0], oracle[0], base[0], torch.float32, logit_scale, 1.0, "loss")
        want, bars = rounded_product_bars(z, y, {**kw, **extra}, upstream, z.dtype)
    else:
        assert_close_to_oracle(got[0], base[0], oracle[0], RTOL[z.dtype], "loss", atol)
    for i, (g, b, o) in enumerate(zip(got[1], base[1], oracle[1], strict=True)):
        assert g.dtype == inputs[i].dtype
        assert_close_to_oracle(g, b, o, RTOL[z.dtype], f"grad[{i}]", atol)
        if half:  # and within the bar of each element
            assert_within(g, want[i], bars[i], f"grad[{i}]")


MODES = ["softmax", "aligned"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "queue, centres, weighting",
    [(0, False, "none"), (37, False, "batch"), (0, True, "prior"), (29, True, "batch")],
)
def test_blocks_and_weights(rng, mode, queue, centres, weighting):
    z, y, kw, inputs = make_case(rng, 75, 40, 6, queue=queue, centres=centres)
    prior = torch.rand(6, generator=rng) + 0.05
    compare(z, y, kw, inputs, rng=rng, mode=mode, negative_weight=weighting, class_prior=prior, temperature=0.1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n, d", [(1, 16), (3, 3), (130, 130)])
def test_sizes(rng, mode, n, d):
    """Ragged N (one row, three rows, three row tiles with a tail) and d (one column, three chunks)."""
    z, y, kw, inputs = make_case(rng, n, d, 4)
    compare(z, y, kw, inputs, rng=rng, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(rng, mode, dtype):
    z, y, kw, inputs = make_case(rng, 70, 48, 5, queue=20, centres=True, dtype=dtype)
    compare(z, y, kw, inputs, rng=rng, mode=mode, negative_weight="batch")


@pytest.mark.parametrize("mode, smooth", [("softmax", 0.0), ("softmax", 0.1), ("aligned", 0.0)])
def test_anchor_subset_with_queue_and_centres(rng, mode, smooth):
    """PaCo's layout: anchors are the first rows; key rows and queue rows get the column gradient only."""
    z, y, kw, inputs = make_case(rng, 90, 24, 7, n_anchor=45, queue=33, centres=True)
    compare(
        z,
        y,
        kw,
        inputs,
        rng=rng,
        mode=mode,
        smooth=smooth,
        gamma=0.7,
        alpha=0.3,
        beta=0.8,
        supt=0.9,
        base_temperature=0.2,
        temperature=0.15,
    )


def test_detached_queue(rng):
    z, y, kw, inputs = make_case(rng, 40, 16, 3, queue=25, centres=True)
    kw["queue"] = kw["queue"].detach()
    del inputs[1]
    compare(z, y, kw, inputs, rng=rng, mode="aligned")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["all_equal", "all_distinct", "singleton"])
def test_label_corner_cases(rng, mode, case):
    n = 66
    labels = {
        "all_equal": torch.zeros(n, dtype=torch.long),
        "all_distinct": torch.arange(n),
        "singleton": torch.cat([torch.zeros(n - 1, dtype=torch.long), torch.ones(1, dtype=torch.long)]),
    }[case]
    z, y, kw, inputs = make_case(rng, n, 20, n, labels=labels)
    compare(z, y, kw, inputs, rng=rng, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_small_temperature(rng, mode):
    """Logits up to 1/T = 100 (e^100 overflows fp32): the online max must keep every exp finite."""
    z, y, kw, inputs = make_case(rng, 50, 8, 3, centres=True)
    compare(z, y, kw, inputs, rng=rng, mode=mode, temperature=0.01, supt=0.05)


def test_presets(rng):
    """Every preset runs on impl='triton' unchanged and matches impl='reference'."""
    bsz, d, n_cls, k = 24, 32, 5, 16
    y = torch.randint(0, n_cls, (bsz,), generator=rng)
    feats = unit_rows(bsz, 2, d, generator=rng)
    logits = torch.randn(bsz, n_cls, generator=rng)
    counts = torch.randint(1, 50, (n_cls,), generator=rng).tolist()

    def grads(make, impl, args):
        args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        loss = make(impl)(*args)
        floats = [a for a in args if a.requires_grad]
        return [loss, *torch.autograd.grad(loss, floats)]

    def paco(cls, impl):
        m = cls(alpha=0.5, beta=1.0, gamma=1.0, temperature=0.2, K=k, num_classes=n_cls, impl=impl)
        m.cal_weight_for_classes(counts)
        return m

    def acl(impl):
        m = ACLLoss(n_cls, negative_weight="prior", impl=impl)
        m.cal_weight_for_classes(counts)
        return m

    q = unit_rows(k, d, generator=rng)
    qy = torch.randint(0, n_cls, (k,), generator=rng)
    paco_feats = torch.cat([feats[:, 0], feats[:, 1], q])
    paco_y = torch.cat([y, y, qy])
    cases = {
        "supcon": (lambda impl: SupConLoss(temperature=0.1, impl=impl), [feats, y]),
        "supcon_one": (lambda impl: SupConLoss(contrast_mode="one", impl=impl), [feats, y]),
        "paco": (lambda impl: paco(PaCoLoss, impl), [paco_feats, paco_y, logits]),
        "gpaco": (lambda impl: paco(GPaCoLoss, impl), [paco_feats, paco_y, torch.cat([logits, logits])]),
        "acl": (acl, [feats, y, torch.randn(bsz, 2, n_cls, generator=rng)]),
    }
    for name, (make, args) in cases.items():
        for i, (a, b) in enumerate(zip(grads(make, "triton", args), grads(make, "reference", args))):
            assert_close(a, b, 1e-4, f"{name}[{i}]")


def test_backward_is_deterministic(rng):
    z, y, kw, inputs = make_case(rng, 100, 40, 4, queue=20, centres=True)
    upstream = torch.randn(100, dtype=torch.float64, generator=rng)
    first = run(z, y, kw, inputs, "triton", upstream, mode="aligned")
    second = run(z, y, kw, inputs, "triton", upstream, mode="aligned")
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


def _op_args(rng, aligned, column_major=False):
    """Arguments of the contrastive_fwd op: 20 anchors + 8 queue rows, d = 16, 5 classes."""
    n, d, k, c = 20, 16, 8, 5
    z = unit_rows(n, d, generator=rng)
    u = torch.randn(n, c, generator=rng)
    if column_major:
        z, u = z.T.contiguous().T, u.T.contiguous().T
        assert not z.is_contiguous() and not u.is_contiguous()
    z, u = z.requires_grad_(), u.requires_grad_()
    q = unit_rows(k, d, generator=rng).requires_grad_()
    y = torch.randint(0, c, (n + k,), generator=rng)
    w = torch.rand(n + k, generator=rng) + 0.5
    log_prior = torch.log_softmax(torch.randn(c, generator=rng), 0)
    return (z, y, q, u, log_prior, w, w * 0.5, n, aligned, 0.1, 1.0, 1.0, 1.0, 0.0)


def test_opcheck(rng):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the op."""
    for aligned in (False, True):
        torch.library.opcheck(triton_backend.contrastive_fwd, _op_args(rng, aligned))


def test_opcheck_non_contiguous_inputs(rng):
    """Transposed z and centre logits: the real backward returns contiguous gradients, and so must
    the fake implementation (torch.compile trusts its strides; empty_like would copy the input's)."""
    for aligned in (False, True):
        args = _op_args(rng, aligned, column_major=True)
        torch.library.opcheck(triton_backend.contrastive_fwd, args)
        _, stats = triton_backend.contrastive_fwd(*args)
        grad = torch.randn(args[7], generator=rng)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # the backward has no backward
        for need in [(True, True, True), (True, False, False), (False, True, True)]:
            torch.library.opcheck(triton_backend.contrastive_bwd, (grad, stats.detach(), *plain, *need))


def test_compiled_step_has_no_graph_break(rng):
    """The op traces into one graph with its backward (contrastive_loss's own argument checks read
    label values, so this compiles the op with the surrounding tensor code, not the checks)."""
    n, c = 40, 4
    x = torch.randn(n, 16, generator=rng, requires_grad=True)
    u = torch.randn(n, c, generator=rng, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=rng)
    w = torch.ones(n)

    def step(x, u):
        z = torch.nn.functional.normalize(x, dim=1)
        loss, _ = triton_backend.contrastive_fwd(z, y, None, u, None, w, w, n, True, 0.1, 1.0, 1.0, 1.0, 0.0)
        return loss.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x, u)
    gx, gu = torch.autograd.grad(got, [x, u])
    want = step(x, u)
    wx, wu = torch.autograd.grad(want, [x, u])
    for a, b, name in [(got, want, "loss"), (gx, wx, "dx"), (gu, wu, "du")]:
        assert_close(a, b, 1e-6, name)


@pytest.mark.parametrize("mode", MODES)
def test_many_classes(rng, mode):
    """C = 300 centre columns: three ragged chunks of the centre kernels."""
    z, y, kw, inputs = make_case(rng, 70, 24, 300, centres=True, queue=10)
    compare(z, y, kw, inputs, rng=rng, mode=mode, negative_weight="batch")


# ---- the label-sorted band (tiles of 32 under the interpreter: these batches span several) -------


def _labels(case: str, n: int, rng) -> torch.Tensor:
    if case == "unsorted":  # random order, few classes: wide bands
        return torch.randint(0, 3, (n,), generator=rng)
    if case == "class_spans_blocks":  # one class of 80 rows spans three row tiles once sorted
        y = torch.cat([torch.zeros(80, dtype=torch.long), torch.randint(1, 6, (n - 80,), generator=rng)])
        return y[torch.randperm(n, generator=rng)]
    if case == "band_at_edge":  # the largest label owns the ragged last tile
        return torch.cat([torch.randint(0, 4, (n - 5,), generator=rng), torch.full((5,), 9)])
    if case == "sorted_descending":
        return torch.sort(torch.randint(0, 8, (n,), generator=rng), descending=True).values
    raise ValueError(case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["unsorted", "class_spans_blocks", "band_at_edge", "sorted_descending"])
def test_band_layouts(rng, mode, case):
    n = 133
    z, y, kw, inputs = make_case(rng, n, 24, 10, labels=_labels(case, n, rng), queue=17, centres=True)
    compare(z, y, kw, inputs, rng=rng, mode=mode, negative_weight="batch")


@pytest.mark.parametrize("mode", MODES)
def test_anchor_subset_after_sorting(rng, mode):
    """PaCo's anchors (the first rows) land anywhere once the rows are sorted by label."""
    n = 120
    y = torch.randint(0, 4, (n,), generator=rng)
    z, y, kw, inputs = make_case(rng, n, 16, 4, n_anchor=50, queue=40, labels=y, centres=True)
    compare(z, y, kw, inputs, rng=rng, mode=mode)


def _one_exp(z, y, kw, mode, temperature):
    """Whether the backward launch takes the one-exp form of its off-band tiles for this problem."""
    tb = triton_backend
    n = z.shape[0]
    w = torch.ones(n)
    u = kw.get("centre_logits")
    loss, stats = tb.fwd(z.detach(), y, None, None if u is None else u.detach(), None, w, w, n,
                         mode == "aligned", temperature, 1.0, 1.0, 1.0, 0.0)  # fmt: skip
    srt = tb._sort(z.detach(), y, w, w)
    k2 = tb.LOG2E / temperature
    _, scal = tb._backward_rows(srt, stats, torch.ones(n), n, mode == "aligned", z.dtype, k2, temperature)
    return bool(scal[2] > 0)


@pytest.mark.parametrize("mode", MODES)
def test_one_exp_and_its_fallback(rng, mode):
    """The shared exp of the backward where it is safe, two exps where its shift could overflow:
    T = 0.01 with unit rows, and centre logits spread over 0 .. 400 (supt 1)."""
    z, y, kw, inputs = make_case(rng, 90, 16, 4)
    assert _one_exp(z, y, kw, mode, 0.1)
    compare(z, y, kw, inputs, rng=rng, mode=mode, temperature=0.1)
    z, y, kw, inputs = make_case(rng, 90, 16, 4)
    assert not _one_exp(z, y, kw, mode, 0.005)
    compare(z, y, kw, inputs, rng=rng, mode=mode, temperature=0.005)
    z, y, kw, inputs = make_case(rng, 90, 16, 4, centres=True, prior=False)
    with torch.no_grad():
        kw["centre_logits"].mul_(torch.linspace(0, 100, 90)[:, None])
    assert not _one_exp(z, y, kw, mode, 0.1)
    compare(z, y, kw, inputs, rng=rng, mode=mode, temperature=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_the_queue_reaches_the_loss(rng, mode):
    """check_finite=False: a NaN in the queue makes the loss of every anchor with a target NaN (a NaN
    mass once became log_mass = 0: a finite loss with NaN gradients)."""
    for n, k, d in ((16, 16, 32), (40, 64, 64)):
        z, q = unit_rows(n, d, generator=rng), unit_rows(k, d, generator=rng)
        q[int(torch.randint(0, k, (1,), generator=rng)), 1] = float("nan")
        y, qy = (torch.randint(0, 5, (m,), generator=rng) for m in (n, k))
        kw = dict(queue=q, queue_labels=qy, mode=mode, check_finite=False, reduction="none")
        losses = contrastive_loss(z, y, impl="triton", **kw)
        has_target = (y[:, None] == torch.cat([y, qy])[None, :]).sum(1) > 1
        assert torch.isnan(losses[has_target]).all() and (losses[~has_target] == 0).all(), losses


def test_second_derivative_is_refused(rng):
    z = unit_rows(12, 8, generator=rng).requires_grad_()
    y = torch.randint(0, 3, (12,), generator=rng)
    with pytest.raises(RuntimeError, match="not differentiable.*impl='reference'"):
        torch.autograd.grad(contrastive_loss(z, y, impl="triton"), z, create_graph=True)


@pytest.mark.parametrize("mode", MODES)
def test_wide_rows_take_the_chunk_loop(rng, mode):
    """d > 256: the forward's similarity in chunks of CHUNK_K, the backward's output in 256-wide chunks
    (on a GPU only before); a queue and centres so every kernel takes the wide path."""
    d = triton_backend.WHOLE_D_MAX + 44
    z, y, kw, inputs = make_case(rng, 40, d, 4, n_anchor=24, queue=9, centres=True)
    compare(z, y, kw, inputs, rng=rng, mode=mode)


@pytest.mark.parametrize("tiles", [(64, 64), (128, 64)], ids=["64x64", "128x64"])
@pytest.mark.parametrize("mode", MODES)
def test_production_tiles(rng, monkeypatch, mode, tiles):
    """The kernels with tile shapes of the GPU's tables (not the interpreter's 32x32), ragged rows."""
    monkeypatch.setattr(triton_backend, "INTERPRET_TILES", triton_backend.Tiles(*tiles, 4, 1))
    z, y, kw, inputs = make_case(rng, 150, 64, 5, n_anchor=100, queue=37)
    compare(z, y, kw, inputs, rng=rng, mode=mode)
