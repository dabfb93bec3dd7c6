"""The native C++ CPU kernel: the op's registration checks, shapes that span several tiles, the
process-group entry points, determinism and the backend choice. Value and gradients of every
feature against the float64 reference run in tests/test_core.py and test_gradcheck.py (cpu_impl)."""

import pytest
import torch
from conftest import assert_within_error_bar, make_case, require_native, unit_rows
from test_core import compare

from acl_kernels import contrastive_loss
from acl_kernels.ops.contrastive import op


@pytest.fixture(autouse=True)
def native():
    require_native()


def op_args(rng, aligned, n=20, d=16, k=8, c=5, dtype=torch.float32):
    """Arguments of contrastive_fwd: n anchors + k queue rows, centre logits with a log prior."""
    z = unit_rows(n, d, dtype=dtype, generator=rng).requires_grad_()
    u = torch.randn(n, c, generator=rng, dtype=dtype).requires_grad_()
    q = unit_rows(k, d, dtype=dtype, generator=rng).requires_grad_()
    y = torch.randint(0, c, (n + k,), generator=rng)
    w = torch.rand(n + k, generator=rng) + 0.5
    log_prior = torch.log_softmax(torch.randn(c, generator=rng), 0)
    return (z, y, q, u, log_prior, w, w * 0.5, n, aligned, 0.1, 1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(rng, dtype):
    """Schema, fake implementation, autograd registration and AOT dispatch of the CPU kernels,
    including the process-group arguments (anchor range, output rows) and non-contiguous inputs."""
    for aligned in (False, True):
        args = op_args(rng, aligned, dtype=dtype)
        torch.library.opcheck(op.contrastive_fwd, args)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        plain[0] = plain[0].T.contiguous().T  # column-major z
        _, stats = op.contrastive_fwd(*plain)
        grad = torch.randn(args[7], generator=rng, dtype=stats.dtype)
        for need in [(True, True, True), (True, False, False), (False, True, True)]:
            torch.library.opcheck(op.contrastive_bwd, (grad, stats, *plain, *need))
        # a process group's call: anchors [5, 12) (their centre rows), the gradient of 4 given rows
        part = plain[:3] + [plain[3][5:12]] + plain[4:]
        torch.library.opcheck(op.contrastive_fwd, (*part, 5, 12))
        rows = torch.tensor([3, 7, 25, 11])
        torch.library.opcheck(op.contrastive_bwd, (grad, stats, *part, True, False, True, rows, 5, 12))


def test_many_tiles(rng):
    """Rows and columns spanning several 64 x 256 tiles with ragged edges: 333 anchors of 600 rows,
    a 70-row queue, d = 130, centres, every weighting, both modes."""
    z, y, kw, inputs = make_case(rng, 600, 130, 9, n_anchor=333, queue=70, centres=True)
    prior = torch.rand(9, generator=rng) + 0.05
    for mode, weighting in (("softmax", "batch"), ("aligned", "prior")):
        compare(z, y, kw, inputs, 1e-5, "native", mode=mode, temperature=0.15, negative_weight=weighting,
                class_prior=prior, alpha=0.4, beta=1.3, supt=0.9)  # fmt: skip


def test_label_smoothing(rng):
    z, y, kw, inputs = make_case(rng, 300, 24, 6, centres=True)
    compare(z, y, kw, inputs, 1e-5, "native", temperature=0.2, smooth=0.1)


def test_deterministic_and_thread_independent(rng):
    """Bitwise repeatable for a given thread count; other thread counts change only the order in
    which the backward's partial column sums are added."""
    z, y, kw, inputs = make_case(rng, 700, 32, 7, centres=True)
    threads = torch.get_num_threads()

    def step(n_threads):
        torch.set_num_threads(n_threads)
        try:
            loss = contrastive_loss(z, y, impl="native", mode="aligned", reduction="none", **kw)
            return [loss, *torch.autograd.grad(loss.sum(), inputs)]
        finally:
            torch.set_num_threads(threads)

    first, again, other = step(2), step(2), step(3)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_half_inputs_keep_their_dtype(rng):
    """bf16 rows: the fp32 loss within the fp32 error bar of the fp64 oracle on the same rounded data,
    the bf16 gradient within 2 bf16 ulps of the oracle's gradient rounded to bf16."""
    z = unit_rows(300, 40, dtype=torch.bfloat16, generator=rng).requires_grad_()
    y = torch.randint(0, 4, (300,), generator=rng)
    loss = contrastive_loss(z, y, impl="native")
    (g,) = torch.autograd.grad(loss, [z])
    z64 = z.detach().double().requires_grad_()
    ref = contrastive_loss(z64, y, impl="reference")
    (g64,) = torch.autograd.grad(ref, [z64])
    assert g.dtype == torch.bfloat16
    assert_within_error_bar(loss, ref, None, torch.float32, 1 / 0.07, 1.0, "loss")
    assert_within_error_bar(g, g64, None, torch.bfloat16, 1 / 0.07, 1.0, "grad")


def test_auto_picks_native_on_cpu(rng, monkeypatch):
    import acl_kernels.dispatch as dispatch
    from acl_kernels.ops.contrastive import native

    calls = []
    original = native.native_loss
    monkeypatch.setattr(native, "native_loss", lambda p: calls.append(1) or original(p))
    monkeypatch.setattr(dispatch, "_BACKENDS", None)
    monkeypatch.delenv("ACL_KERNELS_IMPL", raising=False)
    z, y, _, _ = make_case(rng, 10, 4, 3)
    contrastive_loss(z, y)
    assert calls == [1]
    monkeypatch.setattr(dispatch, "_BACKENDS", None)


def test_bad_arguments_name_the_argument(rng):
    args = list(op_args(rng, False))
    args[1] = args[1][:-1]
    with pytest.raises(RuntimeError, match="labels must hold one entry per contrast row"):
        op.contrastive_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args(rng, False)]
    with pytest.raises(RuntimeError, match="anchor range"):
        op.contrastive_fwd(*args, 5, 99)


def test_info_reports_every_backend():
    from acl_kernels.info import report

    lines = report()
    assert any(line.split()[:1] == ["native"] and line.endswith("present") for line in lines), lines
    assert any(line.startswith("native kernel: ") for line in lines), lines
