import importlib.util
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "value", atol: float = 0.0
) -> None:
    """Fail on NaN/Inf, or when the worst |actual - expected| exceeds rtol * max|expected| + atol.

    The error is measured against the tensor's scale (not element-wise), so tiny entries of a
    gradient do not demand more accuracy than the arithmetic can give.
    """
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the result"
    assert torch.isfinite(expected).all(), f"{name}: non-finite values in the expected result"
    if actual.numel() == 0:
        return
    diff = (actual - expected).abs()
    scale = max(expected.abs().max().item(), 1e-12)
    worst = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
    err = (diff.max().item() - atol) / scale
    assert err <= rtol, (
        f"{name}: relative error {err:.3e} > {rtol:.1e} (after an absolute allowance of {atol:.1e}) at {idx}: "
        f"got {actual.reshape(-1)[worst].item():.8g}, expected {expected.reshape(-1)[worst].item():.8g} "
        f"(scale {scale:.3g})"
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
    return diff.max().item() / max(expected.detach().abs().max().item(), 1e-12) if diff.numel() else 0.0


def assert_close_to_oracle(actual, baseline, oracle, rtol: float, name: str = "value", atol: float = 0.0) -> None:
    """`actual` within max(rtol, 2 x the error of `baseline`) of the float64 `oracle`, plus `atol`.

    `baseline` is the reference computed in the same precision as `actual`: where the problem is
    ill-conditioned (gradients that cancel to almost nothing), PyTorch's own error sets the bar,
    as in flash-attention's tests. `atol` is the rounding floor (rounding_floor below).
    """
    assert_close(actual, oracle, max(rtol, 2 * relative_error(baseline, oracle)), name, atol)


def rounding_floor(temperature: float, upstream: torch.Tensor) -> float:
    """The absolute error that float32 arithmetic alone (every backend computes in float32) gives a
    loss value or gradient: 8 ulps of a logit-sized quantity, eps / temperature, times the largest
    upstream gradient.

    A relative bar alone fails where the exact answer is almost 0: e.g. a softmax loss of 1e-6 (the
    positive takes nearly all the mass) has a gradient p - 1 that cancels in any precision. Measured
    over 3,000 random cases of 3 to 127 rows (float32, temperature 0.1), the worst absolute error in
    these units was 2.6-6.7 for PyTorch's own float32 reference and 4.3-13 for the fused backends.
    """
    return 8 * torch.finfo(torch.float32).eps / temperature * max(1.0, upstream.abs().max().item())


HALF = (torch.float16, torch.bfloat16)


def error_bar(
    oracle: torch.Tensor, baseline, dtype: torch.dtype, logit_scale: float, unit: float, fp32_scale: float = 1.0
) -> float:
    """The tolerance of every comparison with a float64 result, from the error model (one rule).

    - fp16/bf16 data: the float64 result rounded to the data type, +- 2 ulps of the data type at
      the result's scale (the kernels compute in fp32 from the rounded inputs, so the rounding of
      the output dominates): |actual - oracle| <= |rnd(oracle) - oracle| + 2 eps max|oracle|.
    - fp32 data: twice the error of PyTorch's own fp32 computation of the same quantity
      (`baseline`: the same formulas in fp32 on the same inputs, never the code under test), and
      at least 8 ulps of what
      the arithmetic rounds: a logit of size `logit_scale` carries eps * logit_scale absolute
      error, which moves every probability by that relative amount; `unit` is the size of the
      quantity per unit of probability (1 for a loss, |z| / T times the upstream gradient for dz).
    - fp64 data: the 8 ulps alone (the baseline would be the result itself).
    Every backend holds the column weights and the log prior in fp32, fp64 data included (README:
    two [M] fp32 vectors): a logit shifted by log g or log pi / supt carries eps32 times that
    shift (`fp32_scale`, at least 1), so the floor holds 8 eps32 fp32_scale too.
    Returns the largest absolute error allowed (a scalar; the fp16/bf16 bar is per element: its max).
    """
    o = oracle.detach().double().cpu()
    if dtype in HALF:
        rounded = o.to(dtype).double()
        return ((rounded - o).abs() + 2 * torch.finfo(dtype).eps * o.abs().max()).max().item() if o.numel() else 0.0
    floor = 8 * (torch.finfo(dtype).eps * max(1.0, logit_scale) + torch.finfo(torch.float32).eps * fp32_scale) * unit
    if dtype == torch.float64 or baseline is None:
        return floor
    return max(floor, 2 * (baseline.detach().double().cpu() - o).abs().max().item() if o.numel() else 0.0)


def assert_within_error_bar(
    actual, oracle, baseline, dtype, logit_scale: float, unit: float, name: str, fp32_scale: float = 1.0
) -> None:
    """actual within error_bar of the float64 oracle, element by element for fp16/bf16; NaN fails."""
    o = oracle.detach().double().cpu()
    if dtype in HALF and o.numel():
        allowed = (o.to(dtype).double() - o).abs() + 2 * torch.finfo(dtype).eps * o.abs().max()
    else:
        allowed = error_bar(o, baseline, dtype, logit_scale, unit, fp32_scale)
    assert_within(actual, o, allowed, name)


def assert_within(actual, oracle, allowed, name: str) -> None:
    """|actual - oracle| <= allowed (a number, or a tensor of one bar per element); NaN fails."""
    a, o = actual.detach().double().cpu(), oracle.detach().double().cpu()
    assert a.shape == o.shape, f"{name}: shape {tuple(a.shape)} != {tuple(o.shape)}"
    assert torch.isfinite(o).all(), f"{name}: the oracle is not finite"
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    if not a.numel():
        return
    err = (a - o).abs()
    allowed = torch.as_tensor(allowed, dtype=torch.float64).cpu().expand_as(err)
    worst = int((err - allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"{name}: error {err.reshape(-1)[worst].item():.3e} > bar {allowed.reshape(-1)[worst].item():.3e} at flat "
        f"index {worst}: got {a.reshape(-1)[worst].item():.10g}, expected {o.reshape(-1)[worst].item():.10g}"
    )


def run_seed() -> int:
    """The seed of a random test run: ACL_TEST_SEED, or a fresh one (print it where the test runs)."""
    return int(os.environ.get("ACL_TEST_SEED") or int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)


def unit_rows(*shape, dtype=torch.float32, generator=None) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=generator), dim=-1).to(dtype)


@pytest.fixture
def rng():
    """A fresh generator per test (fresh random inputs each run); the seed is printed on failure.

    Set ACL_TEST_SEED to replay a failing run.
    """
    seed = run_seed()
    print(f"seed={seed} (replay with ACL_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def make_case(
    rng, n, d, n_classes, *, n_anchor=None, queue=0, centres=False, dtype=torch.float32, labels=None, prior=True
):
    """Unit rows z [n, d] (+ queue [queue, d], + centre logits) with random labels.

    Returns (z, labels, keyword arguments of contrastive_loss, the inputs that require grad).
    """
    z = unit_rows(n, d, dtype=dtype, generator=rng).requires_grad_()
    y = torch.randint(0, n_classes, (n,), generator=rng) if labels is None else labels
    kw = {"n_anchor": n_anchor}
    inputs = [z]
    if queue:
        q = unit_rows(queue, d, dtype=dtype, generator=rng).requires_grad_()
        kw.update(queue=q, queue_labels=torch.randint(0, n_classes, (queue,), generator=rng))
        inputs.append(q)
    if centres:
        u = (2 * torch.randn(n_anchor or n, n_classes, generator=rng)).to(dtype).requires_grad_()
        kw["centre_logits"] = u
        if prior:
            kw["log_prior"] = torch.log_softmax(torch.randn(n_classes, generator=rng), 0)
        inputs.append(u)
    return z, y, kw, inputs


def require_native() -> None:
    """Skip without the native kernel, or fail where a C++ compiler exists (the install should
    then have built it)."""
    from acl_kernels.dispatch import backends

    missing = backends()["native"].missing
    if missing and shutil.which(os.environ.get("CXX", "c++")) and not os.environ.get("TRITON_INTERPRET"):
        pytest.fail(f"a C++ compiler exists but the native kernel is missing: {missing}")
    if missing:
        pytest.skip(missing)


@pytest.fixture(params=["torch", "native", "native-baseline"])
def cpu_impl(request):
    """Each fast CPU backend: the chunked torch path and the native C++ kernel (require_native),
    the latter with the tile loops of its run-time pick (AVX2 + FMA where the CPU has them) and of
    the x86-64 baseline (ACL_KERNELS_NATIVE_ISA=default)."""
    if request.param == "torch":
        return "torch"
    require_native()
    if request.param == "native-baseline":
        request.getfixturevalue("monkeypatch").setenv("ACL_KERNELS_NATIVE_ISA", "default")
        from acl_kernels import _C

        assert _C.isa() == "default"
    return "native"


@pytest.fixture(scope="session")
def kernel_cost():
    """bench/kernel_cost.py as a module (the static cost report and its sm_90 compiler); skips where
    this process interprets the Triton kernels (they must be compiled in a process without
    TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process; compile them in one without TRITON_INTERPRET")
    bench = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
    if bench not in sys.path:  # on the path: its process pool's workers (fresh interpreters) import it
        sys.path.insert(0, bench)
    return importlib.import_module("kernel_cost")
