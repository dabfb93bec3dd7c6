"""Triton kernels vs the float64 oracle at realistic sizes on a GPU (skipped without CUDA).

The oracle is the reference backend (N <= 8192) or, for larger N whose N x N matrices would not
fit, the independent oracle of tests/oracle.py on 256 random anchors (tests/oracle_subset.py: their
losses, and every gradient under an upstream gradient that is 0 outside them), in float64 on the
same rounded inputs; the bar is the contract's tolerance or twice PyTorch's own error in the same
precision, whichever is larger.
"""

import pytest
import torch
from conftest import assert_close_to_oracle
from oracle_subset import pick_anchors, subset_oracle

from acl_kernels import contrastive_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DENSE_ORACLE_MAX_N = 8192  # beyond: the oracle on SUBSET anchors
SUBSET = 256


def _case(n, d, dtype, n_classes, *, queue=0, centres=0, n_anchor=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    z = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1).to(dtype)
    y = torch.randint(0, n_classes, (n,), device=dev, generator=g)
    kw = {"n_anchor": n_anchor}
    inputs = [z]
    if queue:
        q = torch.nn.functional.normalize(torch.randn(queue, d, device=dev, generator=g), dim=1).to(dtype)
        kw.update(queue=q, queue_labels=torch.randint(0, n_classes, (queue,), device=dev, generator=g))
        inputs.append(q)
    if centres:
        u = (2 * torch.randn(n_anchor or n, centres, device=dev, generator=g)).to(dtype)
        kw.update(centre_logits=u, log_prior=torch.log_softmax(torch.randn(centres, device=dev, generator=g), 0))
        inputs.append(u)
    return z, y, kw, inputs


def _run(y, kw, inputs, impl, upstream, dtype=None, **extra):
    inputs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]
    kw, rest = dict(kw), iter(inputs[1:])
    for key in ("queue", "centre_logits"):
        if key in kw:
            kw[key] = next(rest)
    losses = contrastive_loss(inputs[0], y, impl=impl, reduction="none", **kw, **extra)
    grads = torch.autograd.grad(losses, inputs, upstream.to(losses.dtype))
    return [losses.detach(), *grads]


def _compare(n, d, dtype, mode, tf32=False, seed=0, **case):
    # labels must be < C with a centre block (N = 65536 draws 1024 classes, against 1000 centres)
    n_classes = min(max(2, n // 64), case.get("centres") or n)
    z, y, kw, inputs = _case(n, d, dtype, n_classes, seed=seed, **case)
    n_anchor, dense = kw.get("n_anchor") or n, n <= DENSE_ORACLE_MAX_N
    if dense:
        rows, upstream = slice(None), torch.randn(n_anchor, device="cuda", dtype=torch.float64) / n_anchor
    else:
        anchors, v, upstream = pick_anchors(n_anchor, SUBSET, torch.Generator().manual_seed(seed))
        rows, upstream = anchors.cuda(), upstream.cuda()
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        if dense:
            oracle = _run(y, kw, inputs, "reference", upstream, torch.float64, mode=mode)
        else:
            oracle = subset_oracle(z, y, {**kw, "mode": mode}, anchors, v)
        base = _run(y, kw, inputs, "torch", upstream, mode=mode)  # PyTorch in the input precision
        torch.backends.cuda.matmul.allow_tf32 = tf32
        got = _run(y, kw, inputs, "triton", upstream, mode=mode)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    got[0], base[0] = got[0][rows], base[0][rows]  # the losses the oracle has
    rtol = 3e-3 if (tf32 and dtype == torch.float32) else RTOL[dtype]
    for i, (a, b, o) in enumerate(zip(got, base, oracle)):
        assert_close_to_oracle(a, b, o, rtol, "loss" if i == 0 else f"grad[{i - 1}]")


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, d", [(4096, 128), (4095, 512)])
def test_sizes_and_dtypes(n, d, dtype, mode):
    _compare(n, d, dtype, mode)


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_fp32_tf32(mode):
    _compare(8192, 128, torch.float32, mode, tf32=True)


@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_paco_layout(mode):
    """Anchors = first half, a queue of 8192 rows with gradient, 1000 centres."""
    _compare(4096, 128, torch.bfloat16, mode, n_anchor=2048, queue=8192, centres=1000)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("d", [128, 512])
def test_n65536(mode, d):
    _compare(65536, d, torch.bfloat16, mode, centres=1000 if mode == "aligned" else 0)


def test_opcheck_cuda():
    from acl_kernels.ops.contrastive import triton_backend

    z, y, kw, _ = _case(300, 64, torch.bfloat16, 8, queue=100, centres=8)
    z.requires_grad_()
    q = kw["queue"].requires_grad_()
    u = kw["centre_logits"].requires_grad_()
    yc = torch.cat([y, kw["queue_labels"]])
    w = torch.ones(400, device="cuda")
    for aligned in (False, True):
        args = (z, yc, q, u, kw["log_prior"], w, w, 300, aligned, 0.1, 1.0, 1.0, 1.0, 0.0)
        torch.library.opcheck(triton_backend.contrastive_fwd, args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one():
    """Triton launches on the current device: the launchers must make the tensors' device current."""
    torch.cuda.set_device(0)
    z, y, kw, inputs = _case(300, 64, torch.float32, 8, queue=100, centres=8)
    upstream = torch.randn(300, device="cuda:0", dtype=torch.float64)
    want = _run(y, kw, inputs, "triton", upstream, mode="aligned")
    on1 = {k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got = _run(y.to("cuda:1"), on1, [x.to("cuda:1") for x in inputs], "triton", upstream.to("cuda:1"), mode="aligned")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.to("cuda:0"), b, rtol=1e-5, atol=1e-6)
