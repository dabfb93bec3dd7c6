"""Backbones, projection heads and the model whose classifier rows are the class centres."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Basic(nn.Module):
    """3x3-3x3 residual block; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, CIFAR variant); n=5 is ResNet-32, 64-d feature."""

    def __init__(self, n: int = 5, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(_Basic(cin, w, 2 if (i == 0 and stage > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)


class SmallCNN(nn.Module):
    """Five 3x3 conv layers with BN for 28x28 digits; 4 * width feature (width 16: small_cnn, 8: tiny_cnn)."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
        )
        self.out_dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def build_backbone(arch: str, pretrained: str = "") -> nn.Module:
    """A backbone mapping [B, 3, H, W] to a pooled feature [B, out_dim]; nothing is downloaded."""
    if arch == "resnet32":
        net = CifarResNet(5)
    elif arch == "small_cnn":
        net = SmallCNN()
    elif arch == "tiny_cnn":  # half the width: a quarter of the convolution work (the CPU study)
        net = SmallCNN(width=8)
    else:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        net.out_dim = net.fc.in_features
        net.fc = nn.Identity()
    if pretrained:
        load_pretrained(net, pretrained)
    return net


def load_pretrained(net: nn.Module, path: str) -> None:
    """Backbone weights from a local file (a state_dict, or a checkpoint holding one under
    "state_dict" / "model"); the classifier `fc.*` and DDP's "module." prefix are dropped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"pretrained checkpoint {p} lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
    if unexpected:
        print(f"pretrained checkpoint {p}: ignored {len(unexpected)} keys, e.g. {unexpected[:3]}")


def freeze(backbone: nn.Module, mode: str) -> None:
    """mode "all_but_last_block" (the official Places-LT fine-tuning): every convolution of a torchvision
    ResNet outside its last residual block (layer4[-1]) keeps its weights; BatchNorm, that block, the
    classifier and the head still train."""
    if mode != "all_but_last_block":
        raise ValueError(f"freeze must be '' or 'all_but_last_block', got {mode!r}")
    if not hasattr(backbone, "layer4"):
        raise ValueError("freeze=all_but_last_block needs a torchvision ResNet backbone (resnet50 / resnet152 / ...)")
    trained = {id(m) for m in backbone.layer4[-1].modules()}
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in trained:
            for p in m.parameters():
                p.requires_grad_(False)


def projection_head(kind: str, dim: int, out: int) -> nn.Module:
    if kind == "mlp_bn":  # PaCo
        return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, out))
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))  # GPaCo


class Model(nn.Module):
    """backbone -> feature f; classifier(f) = class-centre logits; head(f) -> unit projection z."""

    def __init__(self, arch: str, num_classes: int, head: str = "mlp_bn", proj_dim: int = 128, pretrained: str = ""):
        super().__init__()
        self.backbone = build_backbone(arch, pretrained)
        dim = self.backbone.out_dim
        self.classifier = nn.Linear(dim, num_classes)
        self.head = projection_head(head, dim, proj_dim) if proj_dim else None  # no head for CE / LA

    def forward(self, x: Tensor | list[Tensor], project: bool = True) -> tuple[Tensor, Tensor | None]:
        """x [B, 3, H, W] -> (logits [B, C] fp32, z [B, proj_dim] fp32 unit rows or None).

        x a list of views: each view through the network on its own (its own BatchNorm statistics, as
        the official PaCo / GPaCo steps), outputs concatenated view-major; one call, so that
        DistributedDataParallel sees one forward per backward."""
        if isinstance(x, (list, tuple)):
            outs = [self(v, project) for v in x]
            z = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
            return torch.cat([o[0] for o in outs]), z
        f = self.backbone(x)
        logits = self.classifier(f).float()
        if not project or self.head is None:
            return logits, None
        return logits, F.normalize(self.head(f).float(), dim=1)


def key_encoder(model: nn.Module) -> nn.Module:
    """MoCo key encoder: a frozen copy, updated by `momentum_update`."""
    enc = copy.deepcopy(model)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)
