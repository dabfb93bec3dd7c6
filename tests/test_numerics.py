"""Loss and gradients stay finite and match float64 at tiny temperatures and for unnormalised rows.

Every backend, both modes, with and without the centre block, temperatures 0.005 to 1 and feature
scales 1 to 10 (logits up to 100 / 0.005 = 2e4). A column left out of a sum must be masked before
its exp: 0 * exp(overflow) is NaN. The "triton" cases run in this process on a GPU, and under the
Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported).

Error bar: the fp32 logits l = z.z / T carry an absolute rounding error of about eps32 * max|l|
(max|l| = scale^2 / T), which moves every probability by that relative amount; the bar is
max(1e-4, 16 eps32 * scale^2 / T) of the float64 result's scale.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, require_native, unit_rows

from acl_kernels import contrastive_loss

TEMPERATURES = [0.005, 0.01, 0.07, 1.0]
SCALES = [1.0, 10.0]
MODES = ["softmax", "aligned"]
# class 3 has one row: without centres its anchor has no positive (loss 0, gradient only as a column)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 2, 0, 1])
N_CLASSES = 4


def _triton_runs_here() -> bool:
    try:
        from acl_kernels.ops.contrastive import triton_backend
    except ImportError:
        return False
    return triton_backend.INTERPRET or torch.cuda.is_available()


QUEUE_LABELS = torch.tensor([3, 0, 1, 2, 0, 1])
PRIOR = torch.tensor([0.5, 0.3, 0.15, 0.05])
# Rows that are not anchors (n_anchor < N, a queue) and column weights >= 2 (gamma, prior weighting):
# a backend that leaves such a row's shift at 0 gets 0 * exp(overflow) = NaN in the backward.
VARIANTS = {
    "plain": {},
    "subset": {"n_anchor": 8},
    "queue": {"queue": 6},
    "heavy": {"n_anchor": 8, "queue": 6, "gamma": 3.0, "negative_weight": "prior", "class_prior": PRIOR},
}
CASES = [(t, "plain") for t in TEMPERATURES] + [(t, v) for v in ("subset", "queue", "heavy") for t in (0.005, 0.07)]


def _inputs(gen: torch.Generator, scale: float, centres: bool, device: str, variant: dict):
    n_anchor = variant.get("n_anchor", len(LABELS))
    z = unit_rows(len(LABELS), 8, generator=gen) * scale
    u = 3 * torch.randn(n_anchor, N_CLASSES, generator=gen) if centres else None
    upstream = torch.randn(n_anchor, dtype=torch.float64, generator=gen)
    kw = {k: v for k, v in variant.items() if k != "queue"}
    if "queue" in variant:
        q = unit_rows(variant["queue"], 8, generator=gen) * scale
        kw.update(queue=q.to(device), queue_labels=QUEUE_LABELS[: variant["queue"]].to(device))
    return z.to(device), (None if u is None else u.to(device)), upstream.to(device), kw


def _loss_and_grads(z, u, upstream, impl, **kw):
    z = z.detach().requires_grad_()
    inputs = [z]
    if kw.get("queue") is not None:
        kw["queue"] = kw["queue"].to(z.dtype).detach().requires_grad_()
        inputs.append(kw["queue"])
    if u is not None:
        u = u.detach().requires_grad_()
        inputs.append(u)
    losses = contrastive_loss(z, LABELS.to(z.device), centre_logits=u, impl=impl, reduction="none", **kw)
    grads = torch.autograd.grad(losses, inputs, upstream.to(losses.dtype))
    return losses, grads


@pytest.mark.parametrize("backend", ["reference", "torch", "native", "native-baseline", "triton"])
@pytest.mark.parametrize("centres", [False, True], ids=["samples", "centres"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temperature,variant", CASES)
def test_finite_and_float64_exact(backend, mode, centres, scale, temperature, variant, rng, monkeypatch):
    if backend == "triton" and not _triton_runs_here():
        pytest.skip("triton runs on CUDA or under TRITON_INTERPRET=1 (test_triton_under_the_interpreter)")
    if backend.startswith("native"):
        require_native()
        if backend == "native-baseline":  # the tile loops of the x86-64 baseline, not the run-time pick
            monkeypatch.setenv("ACL_KERNELS_NATIVE_ISA", "default")
            backend = "native"
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    z, u, upstream, extra = _inputs(rng, scale, centres, device, VARIANTS[variant])
    kw = dict(mode=mode, temperature=temperature, base_temperature=temperature, **extra)
    got, got_grads = _loss_and_grads(z, u, upstream, backend, **kw)
    want, want_grads = _loss_and_grads(z.double(), None if u is None else u.double(), upstream, "reference", **kw)
    rtol = max(1e-4, 16 * torch.finfo(torch.float32).eps * scale**2 / temperature)
    assert_close(got, want, rtol, f"{backend} loss")
    names = ["dz"] + ["dqueue"] * ("queue" in extra) + ["du"] * centres
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        assert_close(g, w, rtol, f"{backend} {name}")


@pytest.mark.interpret
def test_triton_under_the_interpreter():
    pytest.importorskip("triton")
    if _triton_runs_here():
        pytest.skip("this process runs the triton cases itself")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "triton and exact"]
    done = subprocess.run(cmd, cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    assert " passed" in done.stdout and " skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_issue_reproducer_supcon_small_temperature(impl):
    """SupConLoss(0.007, base_temperature=0.007) on unit fp32 rows: finite loss and gradients."""
    from acl_kernels import SupConLoss

    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(64, 2, 128, generator=gen), dim=-1).requires_grad_()
    labels = torch.randint(0, 10, (64,), generator=gen)
    loss = SupConLoss(0.007, base_temperature=0.007, impl=impl)(feats, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()
