"""The project's training step for PaCo and GPaCo against a restatement of the official training code
(PaCo/LT and GPaCo/LT model steps, tests/official.py): same weights, batch, queue and key encoder give
the same loss, parameter gradients, enqueued keys and key-encoder weights (fp32, relative 1e-5)."""

import contextlib
import copy

import official
import pytest
import torch
from conftest import assert_close, unit_rows

from train.config import DEFAULTS
from train.models import Model
from train.objective import Objective

C, B, K, D = 5, 12, 16, 16
COUNTS = [40, 20, 9, 4, 2]


def _setup(loss: str, n_views: int = 2):
    torch.manual_seed(0)
    cfg = {
        **DEFAULTS,
        "loss": loss,
        "alpha": 0.05,
        "temperature": 0.2,
        "queue_size": K,
        "proj_dim": D,
        "moco_momentum": 0.9,
        "loss_impl": "torch",
        "n_views": n_views,
    }
    model = Model("tiny_cnn", C, "mlp_bn" if loss == "paco" else "mlp3", D)
    obj = Objective(cfg, model, COUNTS, C)
    if obj.key_encoder is not None:  # a key encoder that differs from the model, as after some steps
        with torch.no_grad():
            for p in obj.key_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    obj.queue.copy_(unit_rows(K, D, generator=g))
    obj.queue_labels.copy_(torch.randint(0, C, (K,), generator=g))
    obj.queue_ptr.copy_(torch.tensor([3, K]))  # full queue, next slot 3
    views = [torch.randn(B, 3, 28, 28, generator=g) for _ in range(n_views)]
    labels = torch.randint(0, C, (B,), generator=g)
    weight = torch.tensor(COUNTS, dtype=torch.float32).view(1, C) / sum(COUNTS)
    kwargs = {"alpha": 0.05, "temperature": 0.2, "num_classes": C}
    return cfg, model, obj, views, labels, weight, kwargs


def _check_grads(model, ref):
    """Every parameter gradient within relative 1e-5 of the official one. A gradient that is zero in exact
    arithmetic (the bias of PaCo's Linear before BatchNorm) is rounding noise: it is held to 1e-5 of
    the largest gradient instead."""
    pairs = [(name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), ref.parameters())]
    top = max(g.abs().max().item() for _, _, g in pairs if g is not None)
    for name, ours, theirs in pairs:
        assert (ours is None) == (theirs is None), name
        if theirs is None:
            continue
        if theirs.abs().max().item() < 1e-4 * top:
            assert (ours - theirs).abs().max().item() <= 1e-5 * top, f"grad {name}"
        else:
            assert_close(ours, theirs, 1e-5, f"grad {name}")


@pytest.mark.parametrize("loss", ["paco", "gpaco"])
def test_training_step_matches_official(loss):
    cfg, model, obj, views, labels, weight, kwargs = _setup(loss)
    ref = copy.deepcopy(model)
    queue, queue_labels = obj.queue.clone(), obj.queue_labels.clone()
    if loss == "paco":
        ref_key = copy.deepcopy(obj.key_encoder)
        theirs, keys = official.moco_step(
            ref, ref_key, *views, labels, queue, queue_labels, momentum=0.9, loss_kwargs=kwargs, weight=weight
        )
    else:
        theirs, keys = official.gpaco_step(ref, *views, labels, queue, queue_labels, loss_kwargs=kwargs, weight=weight)
    ours = obj(model, views, labels, contextlib.nullcontext)
    assert_close(ours, theirs, 1e-5, "loss")
    ours.backward()
    theirs.backward()
    _check_grads(model, ref)
    # the official queue: the key view only, written at the pointer
    assert_close(obj.queue[3 : 3 + B], keys, 1e-5, "enqueued keys")
    assert torch.equal(obj.queue_labels[3 : 3 + B], labels)
    assert torch.equal(obj.queue[3 + B :], queue[3 + B :]) and torch.equal(obj.queue[:3], queue[:3])
    if loss == "paco":
        for (name, p), q in zip(obj.key_encoder.named_parameters(), ref_key.parameters()):
            assert_close(p, q, 1e-6, f"key encoder {name}")


def test_paco_more_views_uses_every_query_view():
    """V = 3: views 0 and 1 are queries against the keys of view 2 (one momentum update); the loss is
    the mean of the two official losses."""
    cfg, model, obj, views, labels, weight, kwargs = _setup("paco", 3)
    ref, ref_key = copy.deepcopy(model), copy.deepcopy(obj.key_encoder)
    queue, queue_labels = obj.queue.clone(), obj.queue_labels.clone()
    ours = obj(model, views, labels, contextlib.nullcontext)
    expect = [
        official.moco_step(
            ref, ref_key, views[v], views[2], labels, queue, queue_labels, momentum=m, loss_kwargs=kwargs, weight=weight
        )[0]
        for v, m in ((0, 0.9), (1, 1.0))  # momentum 1: the second call reuses the updated key encoder
    ]
    theirs = torch.stack(expect).mean()
    assert_close(ours, theirs, 1e-5, "loss")
    ours.backward()
    theirs.backward()
    _check_grads(model, ref)


def test_prior_negative_weight_keeps_logit_adjustment_off():
    """negative_weight=prior (an ACL option) must not turn on PaCo's logit compensation."""
    cfg = {**DEFAULTS, "loss": "paco", "negative_weight": "prior", "logit_adjust": False, "proj_dim": D}
    obj = Objective(cfg, Model("tiny_cnn", C, "mlp_bn", D), COUNTS, C)
    assert obj.loss.weight is None
    cfg = {**cfg, "loss": "acl"}
    obj = Objective(cfg, Model("tiny_cnn", C, "mlp3", D), COUNTS, C)
    assert obj.loss.weight is not None and obj.loss.logit_adjust is False
