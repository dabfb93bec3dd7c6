"""Every backend against the independent float64 oracle (tests/oracle.py) on generated cases.

Hypothesis draws the shapes, labels, options and temperature (anchor subsets, a queue, centres with
or without a log prior, smoothing, every negative weighting, gamma up to 3, rows of norm up to 10);
the tensors come from a torch generator seeded by the drawn `seed`. The example budget is fixed.
The run's seed is printed; ACL_TEST_SEED replays it. The bar is conftest.error_bar's.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_error_bar, require_native, run_seed
from hypothesis import HealthCheck, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from oracle_compare import error_units
from oracle_subset import pick_anchors, subset_oracle

from acl_kernels import contrastive_loss

SEED = run_seed()
REPLAY = f"seed={SEED}, replay with ACL_TEST_SEED={SEED}"
BUDGET = settings(
    max_examples=int(os.environ.get("ACL_ORACLE_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BACKENDS = ["reference64", "reference", "torch", "native", "native-baseline", "triton"]


@st.composite
def cases(draw):
    """(settings of contrastive_loss without the tensors, sizes, seed of the tensors)."""
    n = draw(st.integers(1, 20))
    mode = draw(st.sampled_from(["softmax", "aligned"]))
    centres = draw(st.booleans())
    kw = {
        "mode": mode,
        "temperature": draw(st.sampled_from([0.01, 0.05, 0.07, 0.2, 1.0])),
        "n_anchor": draw(st.none() | st.integers(1, n)),
        "alpha": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0, 2.0])),
        "gamma": draw(st.sampled_from([0.5, 1.0, 3.0])),
        "negative_weight": draw(st.sampled_from(["none", "batch", "prior"])),
        "kappa": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
    }
    kw["base_temperature"] = draw(st.sampled_from([None, 0.07]))
    if centres:
        kw.update(beta=draw(st.sampled_from([0.0, 0.5, 1.0])), supt=draw(st.sampled_from([0.5, 1.0, 2.0])))
        if mode == "softmax":
            kw["smooth"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    elif kw["alpha"] == 0:
        kw["alpha"] = 1.0  # no target anywhere: every loss would be 0
    sizes = {
        "n": n,
        "d": draw(st.sampled_from([1, 3, 8, 16, 33])),
        "classes": draw(st.integers(1, 5)),
        "queue": draw(st.sampled_from([0, 0, 1, 5, 12])),
        "centres": centres,
        "log_prior": centres and draw(st.booleans()),
        "norm": draw(st.sampled_from([1.0, 1.0, 3.0, 10.0])) if kw["temperature"] >= 0.05 else 1.0,
    }
    # some options left out: then contrastive_loss's defaults meet the oracle's own
    for key in [k for k in kw if k not in ("mode", "temperature", "n_anchor")]:
        if draw(st.booleans()) and not (key == "alpha" and not centres):
            del kw[key]
    return kw, sizes, draw(st.integers(0, 2**31 - 1))


def _tensors(kw: dict, sizes: dict, seed: int):
    """features, labels, the keywords with tensors, and the upstream gradient (float64, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    n, d, c = sizes["n"], sizes["d"], sizes["classes"]

    def rows(k):
        return F.normalize(torch.randn(k, d, dtype=torch.float64, generator=gen), dim=1) * sizes["norm"]

    kw = dict(kw)
    z, y = rows(n), torch.randint(0, c, (n,), generator=gen)
    if "labels" in sizes:
        y = torch.tensor(sizes["labels"])
    if sizes["queue"]:
        kw.update(queue=rows(sizes["queue"]), queue_labels=torch.randint(0, c, (sizes["queue"],), generator=gen))
    a = kw["n_anchor"] or n
    if sizes["centres"]:
        kw["centre_logits"] = 3 * torch.randn(a, c, dtype=torch.float64, generator=gen)
        if sizes["log_prior"]:
            kw["log_prior"] = torch.log_softmax(torch.randn(c, dtype=torch.float64, generator=gen), 0)
    if kw.get("negative_weight") == "prior":
        kw["class_prior"] = torch.rand(c, dtype=torch.float64, generator=gen) + 0.05
    return z, y, kw, torch.randn(a, dtype=torch.float64, generator=gen)


def _run(fn, z, y, kw, upstream, dtype):
    """(losses, gradients of z / queue / centre_logits) of fn on the inputs rounded to `dtype`."""
    z = z.to(dtype).requires_grad_()
    kw, inputs = dict(kw), [z]
    for key in ("queue", "centre_logits"):
        if key in kw:
            kw[key] = kw[key].to(dtype).requires_grad_()
            inputs.append(kw[key])
    for key in ("log_prior", "class_prior"):
        if key in kw:
            kw[key] = kw[key].float() if dtype != torch.float64 else kw[key]
    out = fn(z, y, **kw)
    return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype), allow_unused=True)


def _backend(name: str, monkeypatch):
    if name.startswith("native"):
        require_native()
        if name == "native-baseline":
            monkeypatch.setenv("ACL_KERNELS_NATIVE_ISA", "default")
    if name == "triton" and not _triton_runs_here():
        pytest.skip("triton runs on CUDA or under TRITON_INTERPRET=1 (test_triton_against_the_oracle)")
    impl = {"reference64": "reference", "native-baseline": "native"}.get(name, name)
    return lambda z, y, **kw: contrastive_loss(z, y, impl=impl, reduction="none", **kw)


def _triton_runs_here() -> bool:
    try:
        from acl_kernels.ops.contrastive import triton_backend
    except ImportError:
        return False
    return triton_backend.INTERPRET


# Always run, whatever hypothesis draws: "batch" weighting with a class of exactly two rows (its
# positive's weight is 1 / (n_c - 1) = 1, the smallest count the weighting has to get right), and
# "prior" weighting with gamma 3 (weights normalised to mean gamma).
PAIR_CLASS = (
    {"mode": "softmax", "temperature": 0.2, "n_anchor": None, "negative_weight": "batch", "gamma": 0.5},
    {"n": 7, "d": 8, "classes": 3, "queue": 0, "centres": False, "log_prior": False, "norm": 1.0,
     "labels": [0, 1, 0, 2, 2, 2, 1]},
    5,
)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@hypothesis_seed(SEED)
@BUDGET
@given(case=cases())
@example(case=PAIR_CLASS)
@example(case=({**PAIR_CLASS[0], "mode": "aligned"}, PAIR_CLASS[1], 6))
@example(case=({**PAIR_CLASS[0], "negative_weight": "prior", "gamma": 3.0, "kappa": 1.0}, PAIR_CLASS[1], 7))
def test_backend_matches_the_oracle(backend, case, monkeypatch):
    kw, sizes, seed = case
    run = _backend(backend, monkeypatch)
    z, y, kw, upstream = _tensors(kw, sizes, seed)
    want = _run(oracle.losses, z, y, kw, upstream, torch.float64)
    dtype = torch.float64 if backend == "reference64" else torch.float32
    got = _run(run, z, y, kw, upstream, dtype)
    assert got[0].dtype == dtype, f"{backend}: a {dtype} problem's loss is {got[0].dtype}"
    base = _run(functools.partial(oracle.losses, dtype=dtype), z, y, kw, upstream, dtype)  # PyTorch's own error
    logit_scale, fp32_scale, units = error_units(kw, sizes["norm"], upstream.abs().max().item())
    units["dqueue"] = units["dz"]
    names = ["loss", "dz"] + ["dqueue"] * ("queue" in kw) + ["du"] * ("centre_logits" in kw)
    for name, g, b, w in zip(names, [got[0], *got[1]], [base[0], *base[1]], [want[0], *want[1]], strict=True):
        assert_within_error_bar(g, w, b, dtype, logit_scale, units[name], f"{backend} {name} ({REPLAY})", fp32_scale)


@hypothesis_seed(SEED)
@BUDGET
@given(case=cases(), size=st.integers(1, 20))
@example(case=PAIR_CLASS, size=3)
def test_subset_oracle_matches_the_full_oracle(case, size):
    """tests/oracle_subset.py, the oracle of the N = 65536 GPU cases, against the full oracle: the
    losses of the subset S and every gradient under an upstream gradient that is 0 outside S. Both
    are float64 from the same formulas in another order: the bar is error_bar's fp64 floor (no fp32
    weights on either side)."""
    kw, sizes, seed = case
    z, y, kw, _ = _tensors(kw, sizes, seed)
    anchors, v, upstream = pick_anchors(kw["n_anchor"] or sizes["n"], size, torch.Generator().manual_seed(seed))
    full = _run(oracle.losses, z, y, kw, upstream, torch.float64)
    subset = subset_oracle(z, y, kw, anchors, v)
    logit_scale, _, units = error_units(kw, sizes["norm"], v.abs().max().item())
    units["dqueue"] = units["dz"]
    names = ["loss", "dz"] + ["dqueue"] * ("queue" in kw) + ["du"] * ("centre_logits" in kw)
    for name, s, f in zip(names, subset, [full[0][anchors], *full[1]], strict=True):
        assert_within_error_bar(s, f, None, torch.float64, logit_scale, units[name], f"subset {name} ({REPLAY})", 0.0)


@pytest.mark.interpret
def test_triton_against_the_oracle():
    pytest.importorskip("triton")
    if _triton_runs_here():
        pytest.skip("this process runs the triton cases itself")
    env = dict(os.environ, TRITON_INTERPRET="1", ACL_TEST_SEED=str(SEED))
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "matches and triton"]
    done = subprocess.run(cmd, cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    assert " passed" in done.stdout, done.stdout[-2000:]
