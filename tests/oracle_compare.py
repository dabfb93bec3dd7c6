"""How a test compares a loss with the float64 oracle (tests/oracle.py): the oracle behind
contrastive_loss's signature, the units of conftest.error_bar's floor, a check of a single-process
loss computation (presets included) against the oracle, and the per-element bars of gradients whose
products round dL/dlogit to fp16/bf16.
"""

from __future__ import annotations

from unittest import mock

import oracle
import torch
from conftest import assert_within_error_bar
from torch.overrides import TorchFunctionMode

import acl_kernels.losses

CALL_ONLY = ("impl", "check_finite", "process_group")  # how the loss is run, not which loss


def oracle_loss(features, labels, *, reduction="mean", pos_mask=None, dtype=torch.float64, **kw):
    """contrastive_loss (its keywords and defaults) computed by the oracle in `dtype`."""
    if pos_mask is not None:
        raise NotImplementedError("the oracle takes positives from labels only (no pos_mask)")
    losses = oracle.losses(features, labels, dtype=dtype, **{k: v for k, v in kw.items() if k not in CALL_ONLY})
    return {"mean": losses.mean, "sum": losses.sum}.get(reduction, lambda: losses)()


def error_units(kw: dict, norm: float, upstream: float) -> tuple[float, float, dict]:
    """(logit_scale, fp32_scale, units) of conftest.error_bar for a loss with contrastive_loss keywords
    `kw` (tensors included), rows of norm up to `norm` and per-anchor upstream gradients up to
    `upstream`. units: "loss" (per anchor), "dz" (rows of features or queue), "du" (centre logits)."""
    temperature = kw.get("temperature", 0.07)
    supt = kw.get("supt", 1.0)
    logit_scale = norm**2 / temperature
    if kw.get("centre_logits") is not None:
        logit_scale = max(logit_scale, kw["centre_logits"].abs().max().item() / supt + 5)
    log_prior = kw.get("log_prior")
    fp32_scale = 1.0 + (0.0 if log_prior is None else log_prior.abs().max().item() / supt)
    scale = temperature / (kw.get("base_temperature") or temperature)  # the loss's factor
    up = upstream * scale
    return logit_scale, fp32_scale, {"loss": scale, "dz": up * norm / temperature, "du": up / supt}


class _Recorder:
    """oracle_loss in `dtype` that keeps the keywords and the anchor count of its last call."""

    def __init__(self, dtype):
        self.dtype, self.kw = dtype, None

    def __call__(self, features, labels, **kw):
        rows = features if kw.get("queue") is None else torch.cat([features, kw["queue"].to(features.dtype)])
        self.norm = rows.detach().double().norm(dim=1).max().item()
        self.n_anchor, self.kw = kw.get("n_anchor") or features.shape[0], kw
        return oracle_loss(features, labels, dtype=self.dtype, **kw)


def _evaluate(single, leaves, dtype, upstream):
    """single(core, *leaves) with every loss core (presets' included) the oracle in `dtype`: the loss,
    the gradients of the leaves under `upstream` (None: a scalar loss), the recorder."""
    core = _Recorder(dtype)
    inputs = [x.detach().to(dtype).requires_grad_() for x in leaves]
    with mock.patch.object(acl_kernels.losses, "contrastive_loss", core):
        out = single(core, *inputs)
    grads = torch.autograd.grad(out, inputs, None if upstream is None else upstream.to(out.dtype))
    return out, grads, core


def assert_single_matches_oracle(name, single, leaves, kinds, got, upstream=None):
    """A single-process loss within conftest.error_bar of the oracle, value and gradients.

    single(core, *leaves) computes the loss, calling `core` with contrastive_loss's signature where it
    calls the functional core directly (presets call theirs, swapped for the oracle here too);
    leaves: leaf tensors of one dtype; kinds: "dz" or "du" per leaf (its error unit); got: (the loss
    the test computed with the real core, then each leaf's gradient); upstream: the gradient that
    reached a reduction="none" loss (None for a scalar loss). The loss is fp32 arithmetic (fp64 for
    fp64 leaves); fp16/bf16 gradients take error_bar's rule of the data type.
    """
    want = _evaluate(single, leaves, torch.float64, upstream)
    base = _evaluate(single, leaves, torch.float32, upstream)  # PyTorch's own fp32 error
    core = want[2]
    reduction = core.kw.get("reduction", "mean")
    # the gradient one anchor's loss receives; a sum's error is up to n_anchor times one loss's
    up = {"mean": 1.0 / core.n_anchor, "sum": 1.0}.get(reduction) or upstream.abs().max().item()
    logit_scale, fp32_scale, units = error_units(core.kw, core.norm, up)
    units["loss"] *= core.n_anchor if reduction == "sum" else 1.0
    for what, g, w, b in zip(["loss", *kinds], got, [want[0], *want[1]], [base[0], *base[1]], strict=True):
        dtype = torch.float32 if what == "loss" else leaves[0].dtype
        assert_within_error_bar(g, w, b, dtype, logit_scale, units[what], f"{name} {what}", fp32_scale)


class _Similarity(TorchFunctionMode):
    """Keeps the oracle's one matrix product: the similarity S = z_a [z; queue]^T [a, M]."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
            assert not hasattr(self, "s"), "the oracle has one matrix product"
            self.s = out
        return out


def rounded_product_bars(z, labels, kw, upstream, dtype):
    """(float64 oracle gradients, one bar per element) of z, then the queue and the centre logits
    where they require grad, for fp16/bf16 data whose gradient products round dL/dlogit to `dtype`
    (the Triton kernels: the products run on tensor cores at the data's rate, fp32 accumulation).

    The rows' gradient is G R + G^T z_a, G = dL/dS from the oracle, R = [z; queue]. Rounding each
    element of G (or the kernel's G_jk + G_kj) moves it by at most one ulp, eps |G|, so element
    (j, c) moves by at most e = eps (|G| |R| + |G|^T |z_a|)_jc: one ulp, not half, as the Triton
    interpreter truncates fp32 to bf16. Add M eps32 times the same sum (fp32 accumulation over M
    columns) and conftest.error_bar's fp32 floor; the result is rounded to `dtype`: (1 + eps) e +
    eps |oracle|. The centre logits' gradient has no product: the floor and the output rounding only.
    """
    kw, leaves = dict(kw), [z.detach().double().requires_grad_()]
    for key in ("queue", "centre_logits"):
        if kw.get(key) is not None:
            kw[key], wants = kw[key].detach().double(), kw[key].requires_grad
            leaves += [kw[key].requires_grad_()] if wants else []
    queue_grad = kw.get("queue") is not None and kw["queue"].requires_grad
    with _Similarity() as similarity:
        losses = oracle_loss(leaves[0], labels, reduction="none", **kw)
    g, *grads = torch.autograd.grad(losses, [similarity.s, *leaves], upstream.to(losses.dtype))
    rows = torch.cat([leaves[0], *([] if kw.get("queue") is None else [kw["queue"]])]).detach()
    products = g.abs().T @ rows[: g.shape[0]].abs()  # [M, d]: the column side of every row
    products[: g.shape[0]] += g.abs() @ rows.abs()  # the anchor side of the anchors
    logit_scale, fp32_scale, units = error_units(kw, rows.norm(dim=1).max().item(), upstream.abs().max().item())
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    floor = {k: 8 * eps32 * (max(1.0, logit_scale) + fp32_scale) * units[k] for k in ("dz", "du")}
    parts = [products[: z.shape[0]]] + [products[z.shape[0] :]] * queue_grad
    bars = [(eps + rows.shape[0] * eps32) * p + floor["dz"] for p in parts]
    bars += [torch.full_like(grads[-1], floor["du"])] * (len(grads) > len(parts))
    return grads, [(1 + eps) * e + eps * o.abs() for e, o in zip(bars, grads, strict=True)]
