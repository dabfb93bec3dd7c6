"""freeze="all_but_last_block" (the official Places-LT fine-tuning): only the last residual block's
convolutions train, with BatchNorm everywhere; a backbone without layer4 is refused."""

import pytest
import torchvision
from torch import nn

from train.models import SmallCNN, freeze


def test_freeze_all_but_last_block():
    net = torchvision.models.resnet18(weights=None)
    freeze(net, "all_but_last_block")
    last = {id(m) for m in net.layer4[-1].modules()}
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.requires_grad == (id(m) in last)
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.requires_grad and m.bias.requires_grad
    assert net.fc.weight.requires_grad


def test_freeze_refuses_other_backbones():
    with pytest.raises(ValueError, match="torchvision ResNet"):
        freeze(SmallCNN(), "all_but_last_block")
    with pytest.raises(ValueError, match="freeze must be"):
        freeze(torchvision.models.resnet18(weights=None), "everything")
