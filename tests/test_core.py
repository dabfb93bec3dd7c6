"""The CPU backends (chunked torch path, native C++ kernel) against the naive reference: value and every gradient."""

import pytest
import torch
from conftest import (
    assert_close,
    assert_close_to_oracle,
    assert_within_error_bar,
    make_case,
    require_native,
    rounding_floor,
    unit_rows,
)

from acl_kernels import contrastive_loss
from acl_kernels.ops.contrastive import chunked


def upstream_for(z, kw):
    """A random float64 upstream gradient, one entry per anchor (what run's losses hold)."""
    return torch.randn(kw.get("n_anchor") or z.shape[0], dtype=torch.float64)


def run(z, y, kw, inputs, impl, upstream, **extra):
    losses = contrastive_loss(z, y, impl=impl, reduction="none", **kw, **extra)
    grads = torch.autograd.grad(losses, inputs, upstream.to(losses.dtype))
    return losses, grads


def as_float64(kw, inputs):
    """The same (already rounded) inputs in float64, for the oracle; `inputs` = [z, queue?, centres?]."""
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    kw64, rest = dict(kw), iter(inputs64[1:])
    for key in ("queue", "centre_logits"):
        if key in kw:
            kw64[key] = next(rest)
    return inputs64[0], kw64, inputs64


def compare(z, y, kw, inputs, rtol, impl="torch", **extra):
    """`impl` vs the float64 reference; the fp32 reference's own error sets the bar where it is larger."""
    upstream = upstream_for(z, kw)
    z64, kw64, inputs64 = as_float64(kw, inputs)
    oracle = run(z64, y, kw64, inputs64, "reference", upstream, **extra)
    base = run(z, y, kw, inputs, "reference", upstream, **extra)
    got = run(z, y, kw, inputs, impl, upstream, **extra)
    atol = rounding_floor(extra.get("temperature", 0.07), upstream)
    assert_close_to_oracle(got[0], base[0], oracle[0], rtol, "loss", atol)
    for i, (g, b, o) in enumerate(zip(got[1], base[1], oracle[1])):
        assert_close_to_oracle(g, b, o, rtol, f"grad[{i}]", atol)


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("n", [1, 3, 127, 255])
@pytest.mark.parametrize("d", [3, 64, 130])
def test_sizes(rng, cpu_impl, mode, n, d):
    z, y, kw, inputs = make_case(rng, n, d, n_classes=7)
    compare(z, y, kw, inputs, 1e-5, cpu_impl, mode=mode, temperature=0.1)


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("queue", [0, 33])
@pytest.mark.parametrize("centres", [False, True])
@pytest.mark.parametrize("weighting", ["none", "batch", "prior"])
def test_blocks_and_weights(rng, cpu_impl, mode, queue, centres, weighting):
    n, c = 90, 11
    z, y, kw, inputs = make_case(rng, n, 24, c, n_anchor=40, queue=queue, centres=centres)
    prior = torch.rand(c, generator=rng) + 0.01
    compare(
        z,
        y,
        kw,
        inputs,
        1e-5,
        cpu_impl,
        mode=mode,
        temperature=0.2,
        alpha=0.3,
        beta=1.5,
        gamma=0.7,
        supt=0.8,
        negative_weight=weighting,
        class_prior=prior,
        kappa=0.5,
        base_temperature=0.1,
    )


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("views", [1, 2, 5, 8])
def test_views(rng, cpu_impl, mode, views):
    bsz, c = 23, 6
    labels = torch.randint(0, c, (bsz,), generator=rng).repeat(views)
    z, y, kw, inputs = make_case(rng, bsz * views, 32, c, labels=labels, centres=True)
    compare(z, y, kw, inputs, 1e-5, cpu_impl, mode=mode, temperature=0.1)


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("case", ["all_equal", "one_sample_class", "no_positives", "no_positives_with_centres"])
def test_label_corner_cases(rng, cpu_impl, mode, case):
    n = 40
    if case == "all_equal":
        labels = torch.zeros(n, dtype=torch.long)
    elif case == "one_sample_class":
        labels = torch.randint(0, 3, (n,), generator=rng)
        labels[7] = 5
    else:
        labels = torch.randperm(n, generator=rng)
    z, y, kw, inputs = make_case(rng, n, 16, n, labels=labels, centres=case == "no_positives_with_centres", queue=0)
    compare(z, y, kw, inputs, 1e-5, cpu_impl, mode=mode, temperature=0.1, negative_weight="batch")


def test_no_positive_anchor_contributes_zero(rng, cpu_impl):
    labels = torch.arange(6)
    z = unit_rows(6, 8, generator=rng).requires_grad_()
    for impl in ["reference", cpu_impl]:
        losses = contrastive_loss(z, labels, impl=impl, reduction="none")
        assert torch.equal(losses, torch.zeros(6))
        (g,) = torch.autograd.grad(contrastive_loss(z, labels, impl=impl), [z])
        assert torch.equal(g, torch.zeros_like(z))


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_small_temperature(rng, cpu_impl, mode):
    """tau = 0.01 puts logits at +-100: the fp32 CPU backends must still match the fp64 oracle."""
    z, y, kw, inputs = make_case(rng, 64, 16, 4, centres=True)
    upstream = upstream_for(z, kw)
    z64 = z.detach().double().requires_grad_()
    u64 = kw["centre_logits"].detach().double().requires_grad_()
    kw64 = dict(kw, centre_logits=u64)
    ref = run(z64, y, kw64, [z64, u64], "reference", upstream, mode=mode, temperature=0.01)
    got = run(z, y, kw, inputs, cpu_impl, upstream, mode=mode, temperature=0.01)
    assert_close(got[0], ref[0], 1e-4, "loss")
    for g, r in zip(got[1], ref[1]):
        assert_close(g, r, 1e-4, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_half_inputs(rng, cpu_impl, dtype, mode):
    """Half inputs are accumulated in fp32: the fp32 loss within the fp32 error bar of the fp64 oracle
    on the same (rounded) data, the half gradient within 2 ulps of the oracle rounded to its dtype."""
    check_half_inputs(rng, cpu_impl, dtype, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_reference_half_inputs(rng, dtype, mode):
    """The reference backend too accumulates half inputs in fp32 (at the data's precision, bf16
    logits of size 10 would be off by about 0.04)."""
    check_half_inputs(rng, "reference", dtype, mode, centres=True)


def check_half_inputs(rng, impl, dtype, mode, centres=False):
    z, y, kw, inputs = make_case(rng, 96, 32, 5, dtype=dtype, centres=centres)
    upstream = upstream_for(z, kw)
    z64 = z.detach().double().requires_grad_()
    ref = run(z64, y, kw, [z64], "reference", upstream, mode=mode, temperature=0.1)
    got = run(z, y, kw, inputs, impl, upstream, mode=mode, temperature=0.1)
    assert got[1][0].dtype == dtype
    assert_within_error_bar(got[0], ref[0], None, torch.float32, 1 / 0.1, 1.0, "loss")
    assert_within_error_bar(got[1][0], ref[1][0], None, dtype, 1 / 0.1, 1.0, "grad")


def test_many_chunks(rng, monkeypatch):
    """Force tiny chunks so the chunk loop, not one big tile, is what gets compared."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 500)
    for mode in ["softmax", "aligned"]:
        z, y, kw, inputs = make_case(rng, 77, 8, 5, n_anchor=50, queue=9, centres=True)
        compare(z, y, kw, inputs, 1e-5, mode=mode, negative_weight="batch")


def test_reductions(rng):
    z, y, kw, _ = make_case(rng, 30, 8, 3)
    per = contrastive_loss(z, y, reduction="none")
    assert per.shape == (30,)
    torch.testing.assert_close(contrastive_loss(z, y, reduction="mean"), per.mean())
    torch.testing.assert_close(contrastive_loss(z, y, reduction="sum"), per.sum())


def test_env_var_forces_backend(rng, monkeypatch):
    z, y, _, _ = make_case(rng, 10, 4, 3)
    monkeypatch.setenv("ACL_KERNELS_IMPL", "reference")
    calls = []
    import acl_kernels.ops.contrastive.naive as naive

    original = naive.reference_loss
    monkeypatch.setattr("acl_kernels.dispatch.reference_loss", lambda p: calls.append(1) or original(p))
    import acl_kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_BACKENDS", None)
    contrastive_loss(z, y)
    assert calls == [1]
    monkeypatch.setattr(dispatch, "_BACKENDS", None)


def _compiled_matches_eager(rng, impl, mode, dynamic, sizes):
    z, y, kw, inputs = make_case(rng, max(sizes), 8, 4, centres=True)
    kw.update(negative_weight="prior", class_prior=torch.rand(4, generator=rng) + 0.1)

    def loss(z, y, u, temperature):
        return contrastive_loss(z, y, mode=mode, impl=impl, temperature=temperature, **dict(kw, centre_logits=u))

    torch._dynamo.reset()  # each case's closure shares one code object: start its guard count afresh
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for rows, temperature in zip(sizes, (0.1, 0.2)):
        part = [z[:rows].detach().requires_grad_(), inputs[1][:rows].detach().requires_grad_()]
        got = compiled(part[0], y[:rows], part[1], temperature)
        expected = loss(part[0], y[:rows], part[1], temperature)
        assert_close(got, expected, 1e-6, "loss")
        for g, e in zip(torch.autograd.grad(got, part), torch.autograd.grad(expected, part)):
            assert_close(g, e, 1e-6, "grad")


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_torch_compile_fullgraph(rng, cpu_impl, mode):
    """A compiled training step keeps the loss in one graph (value checks are skipped under compile)."""
    _compiled_matches_eager(rng, cpu_impl, mode, False, (48,))


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_torch_compile_dynamic(rng, mode):
    """dynamic=True makes the sizes and the temperature symbolic: the scalar checks must take them,
    and a second size and temperature run the same graph. (The native op: compiling the torch
    backend's row chunks with symbolic sizes takes about a minute.)"""
    require_native()
    _compiled_matches_eager(rng, "native", mode, True, (48, 40))
