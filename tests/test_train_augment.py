"""The two loaders make the same RandAugment views: statistics of 256 augmented samples agree.

DALI runs on the CPU (device_id=None). Tolerances, in normalised units (std 0.25, so 0.1 is 2.5%
of the 0-255 range): per-channel mean within 0.1, per-channel std within 10%, and the fraction of
pixels at the fill level (pixels uncovered by rotate / shear / translate) within 0.03. Measured on
this data: fill fraction 0.072 (DALI) / 0.072 (timm). The test fails for the DALI RandAugment at a
third of the strength (31 magnitude bins: channel means 0.28 apart) and for one that applies every
layer (p = 1: the filled fraction leaves the tolerance).
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import small_cfg

from train import datasets
from train.data import fill_level, make_loader

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 textured 40x40 RGB images, listed 256 times (one epoch = 4 batches of 64)."""
    root = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(4):
        img = np.stack([(xx * 6 + 40 * i) % 256, (yy * 5 + 30 * i) % 256, ((xx + yy) * 3) % 256], -1)
        Image.fromarray(np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)).save(root / f"{i}.png")
    (root / "split.txt").write_text("".join(f"{i % 4}.png {i % 2}\n" for i in range(256)))
    return root


def _stats(root, loader: str) -> dict:
    cfg = small_cfg(
        root,
        *("--data-loader", loader, "--views", "randaug", "--n-views", "1", "--image-size", "32"),
        *("--eval-resize", "32"),
        *("--batch-size", "64", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))),
        *("--max-steps", "0"),  # the whole epoch (small_cfg stops after 2 steps)
    )
    split = datasets.read_split(root / "split.txt", root)
    batches = make_loader(cfg, split, train=True, epoch=0, rank=0, world=1, device=torch.device("cpu"))
    x = torch.cat([views[0] for views, _ in batches])
    assert x.shape == (256, 3, 32, 32)
    fill = (fill_level(MEAN) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    at_fill = ((x - fill.view(1, 3, 1, 1)).abs() < 0.02).all(1).float().mean().item()
    return {"mean": x.mean((0, 2, 3)), "std": x.std((0, 2, 3)), "fill": at_fill}


def test_randaugment_statistics_agree(images):
    dali, timm = _stats(images, "dali"), _stats(images, "pytorch")
    assert (dali["mean"] - timm["mean"]).abs().max() < 0.1, (dali, timm)
    assert ((dali["std"] / timm["std"]) - 1).abs().max() < 0.1, (dali, timm)
    assert abs(dali["fill"] - timm["fill"]) < 0.03, (dali, timm)
    assert 0.03 < timm["fill"] < 0.15  # geometric operations at full strength leave pixels uncovered


def test_dali_recipes_use_current_operator_names(images):
    """Every DALI recipe builds and runs without a deprecation warning (DALI's AutoAugment policies
    still call `fn.experimental.equalize`; the loader swaps in the current operators)."""
    from train.config import RECIPES

    cfg = small_cfg(
        images,
        *("--data-loader", "dali", "--views", ",".join(RECIPES), "--n-views", str(len(RECIPES))),
        *("--image-size", "32", "--eval-resize", "32", "--batch-size", "8", "--max-steps", "1"),
    )
    split = datasets.read_split(images / "split.txt", images)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        views, _ = next(iter(make_loader(cfg, split, train=True, epoch=0, rank=0, world=1, device=torch.device("cpu"))))
    assert len(views) == len(RECIPES)
    deprecated = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
    assert not deprecated, deprecated
