"""The torchvision fallback loader: the same shards, order and batch shapes as the DALI loader
(train/data.py), one DataLoader per epoch. Every sample's augmentation is seeded by (seed, epoch,
rank, position), so a resumed epoch sees the same views without any loader state.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from .data import CUTOUT, Sharding, fill_level, mix_seed
from .datasets import DataError, Split


def _torch_view(recipe: str, cfg: dict):
    from PIL import Image
    from torchvision.transforms import v2 as T

    size = cfg["image_size"]
    fill = fill_level(cfg["mean"])

    def jitter(b, c, s, h, p):
        return T.RandomApply([T.ColorJitter(b, c, s, h)], p=p)

    blur = T.RandomApply([_PilGaussianBlur(0.1, 2.0)], p=0.5)
    after = []  # tensor operations, after the PIL ones
    if recipe == "center":
        ops = [T.Resize(cfg["eval_resize"]), T.CenterCrop(size)]
    elif recipe == "cifar_strong":
        ops = [
            T.RandomCrop(size, padding=4),
            T.RandomHorizontalFlip(),
            T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, T.InterpolationMode.BILINEAR, fill=[fill] * 3),
        ]
        after = [_Cutout(CUTOUT)]
    elif recipe == "cifar_simclr":
        ops = [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            jitter(0.4, 0.4, 0.4, 0.1, 0.8),
            T.RandomGrayscale(0.2),
        ]
    elif recipe == "mnist":
        ops = [T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25)), jitter(0.4, 0.4, 0, 0, 0.8)]
    elif recipe == "simclr":
        ops = [
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            jitter(0.4, 0.4, 0.4, 0, 1.0),
            T.RandomGrayscale(0.2),
            blur,
            T.RandomHorizontalFlip(),
        ]
    else:
        from timm.data.auto_augment import rand_augment_transform

        ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), jitter(0.4, 0.4, 0.4, 0, 1.0)]
        if recipe == "randaug_stack":
            ops += [T.RandomGrayscale(0.2), blur]
        hparams = {"translate_pct": 0.45, "img_mean": (fill,) * 3, "interpolation": Image.BILINEAR}
        ops += [rand_augment_transform(f"rand-n{cfg['randaug_n']}-m{cfg['randaug_m']}-mstd0.5", hparams)]
    # PIL images until the end: decoded as PIL, and PIL's own blur (the official one) takes PIL images
    ops = [*ops, T.ToImage(), *after, T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(ops)


class _PilGaussianBlur(torch.nn.Module):
    """PIL's Gaussian blur with sigma ~ U(lo, hi), as the official SimCLR / MoCo / PaCo code draws it
    (PIL's radius is the standard deviation); sigma is drawn from torch's generator."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, img):
        from PIL import ImageFilter

        sigma = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class _Cutout(torch.nn.Module):
    """Zero a size x size square at a uniformly drawn centre (clipped at the border)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img):
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.size // 2
        out = img.clone()
        out[..., max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 0
        return out


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch, random and numpy (timm's RandAugment draws from the last two) for one sample, and
    restore their states after it."""
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


class _ViewDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, order: np.ndarray, transforms, seed: int):
        self.split, self.order, self.transforms, self.seed = split, order, transforms, seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int):
        from PIL import Image

        i = int(self.order[pos])
        path: Path = self.split.full_path(i)
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        with _seeded(mix_seed(self.seed, pos)):  # augmentation depends on (seed, position) only
            views = [t(img) for t in self.transforms]
        return (*views, int(self.split.labels[i]))


class TorchLoader:
    """This rank's shard of every epoch (or of the evaluation set) through a torch DataLoader."""

    def __init__(
        self,
        split: Split,
        sharding: Sharding,
        recipes: list[str],
        cfg: dict,
        device: torch.device,
        epoch: int = 0,
        skip: int = 0,
        state: dict | None = None,
    ):
        self.split, self.sharding, self.cfg, self.device = split, sharding, cfg, device
        self.transforms = [_torch_view(r, cfg) for r in recipes]
        self.set_epoch(epoch, skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        s = self.sharding
        self.epoch, self.skip = epoch, skip
        seed = mix_seed(self.cfg["seed"], epoch, s.rank, int(s.train))
        dataset = _ViewDataset(self.split, s.shard(epoch), self.transforms, seed)
        workers = self.cfg["workers"]
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=s.batch,
            sampler=s.positions(epoch, skip),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=s.train,
            prefetch_factor=self.cfg["prefetch"] if workers else None,
        )

    def state(self) -> None:
        return None  # the augmentation depends on (seed, epoch, rank, position) only

    def __len__(self) -> int:
        return self.sharding.steps(self.epoch) - self.skip

    def __iter__(self):
        for *views, labels in self.loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)
