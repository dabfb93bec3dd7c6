"""torch.autograd.gradcheck of the CPU backends in float64 at tiny sizes, every mode and block."""

import pytest
import torch
from conftest import unit_rows

from acl_kernels import contrastive_loss


@pytest.mark.parametrize("impl", ["reference", "torch", "native"])
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
@pytest.mark.parametrize("blocks", ["samples", "queue", "centres", "all"])
@pytest.mark.parametrize("weighting", ["none", "batch", "prior"])
def test_gradcheck(rng, impl, mode, blocks, weighting):
    n, d, c, k = 7, 3, 3, 4
    z = unit_rows(n, d, dtype=torch.float64, generator=rng).requires_grad_()
    y = torch.randint(0, c, (n,), generator=rng)
    inputs = [z]
    kw = {}
    if blocks in ("queue", "all"):
        q = unit_rows(k, d, dtype=torch.float64, generator=rng).requires_grad_()
        kw.update(queue_labels=torch.randint(0, c, (k,), generator=rng))
        inputs.append(q)
    n_anchor = 5 if blocks in ("centres", "all") else n
    if blocks in ("centres", "all"):
        inputs.append(torch.randn(n_anchor, c, dtype=torch.float64, generator=rng).requires_grad_())
        kw.update(log_prior=torch.randn(c, dtype=torch.float64, generator=rng))
    prior = torch.rand(c, generator=rng) + 0.1

    def f(*xs):
        extra = {}
        if blocks in ("queue", "all"):
            extra["queue"] = xs[1]
        if blocks in ("centres", "all"):
            extra["centre_logits"] = xs[-1]
        return contrastive_loss(
            xs[0],
            y,
            mode=mode,
            temperature=0.5,
            n_anchor=n_anchor,
            alpha=0.7,
            beta=1.2,
            negative_weight=weighting,
            class_prior=prior,
            impl=impl,
            reduction="none",
            **kw,
            **extra,
        )

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7)


def test_gradcheck_label_smoothing(rng):
    z = unit_rows(6, 3, dtype=torch.float64, generator=rng).requires_grad_()
    u = torch.randn(6, 4, dtype=torch.float64, generator=rng).requires_grad_()
    y = torch.randint(0, 4, (6,), generator=rng)
    for impl in ["reference", "torch", "native"]:
        assert torch.autograd.gradcheck(
            lambda a, b, impl=impl: contrastive_loss(a, y, centre_logits=b, smooth=0.2, impl=impl, temperature=0.5),
            (z, u),
        )
