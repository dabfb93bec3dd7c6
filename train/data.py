"""Batches of V augmented views: a DALI pipeline, or a torchvision fallback that makes the same batches.

Both loaders yield `(views, labels)`: `views` a list of V float32 [B, 3, H, W] normalised tensors
(one per view, in the order of cfg["views"] cycled to n_views), `labels` int64 [B].

Sample order. Each epoch draws one global permutation from (seed, epoch), identical on every rank,
trims it to a multiple of world * per-rank batch (instance-balanced sampling with drop_last, and
the same number of steps on every rank), and gives rank r the r-th contiguous shard. The DALI
reader shards with shard_id / num_shards over that list; the fallback slices it the same way.
The augmentation randomness depends only on (seed, epoch, rank) (DALI: the pipeline seed;
fallback: a seed per sample), so a run resumed from a checkpoint sees the same batches.

Recipes (docs/recipes.md), one processing function per loader applied to every view:
  simclr         random resized crop (0.08-1), flip, colour jitter (0.4, 0.4, 0.4, 0), grayscale p=0.2,
                 Gaussian blur p=0.5
  randaug        random resized crop (0.08-1), flip, colour jitter (0.4, 0.4, 0.4, 0) p=1, RandAugment(n, m)
  randaug_stack  randaug with grayscale p=0.2 and blur p=0.5 before RandAugment
  cifar_strong   random crop with 4 pixels of padding, flip, AutoAugment (CIFAR policy), Cutout 16x16
  cifar_simclr   random resized crop (0.2-1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2
  mnist          random resized crop (0.5-1, aspect 0.8-1.25), brightness/contrast jitter 0.4 p=0.8, no flip
  center         the evaluation transform (resize, centre crop)

RandAugment is the official one, timm's `rand_augment_transform("rand-n{n}-m{m}-mstd0.5")`: 15
operations on timm's magnitude scale (m = 10 is full strength: rotate 30 degrees, shear 0.3,
translate 0.45 of the side, enhance factor 1.9, posterize to 4 bits, solarize-add 110), each of the
n layers applied with p = 0.5. The fallback calls timm; the DALI pipeline builds the same 15
operations with 11 magnitude bins (bin 10 = full strength) and a coin flip per layer. Both loaders
fill uncovered pixels with one grey level, the mean of `mean` (DALI's warps take a single fill value;
the official code fills with the per-channel mean), interpolate bilinearly (the official code picks
bilinear or bicubic at random) and draw the Cutout centre uniformly over the image, clipping the
square at the border. Left as it is: timm jitters each operation's magnitude by a Gaussian of std
0.5 (clipped at 10), DALI applies the magnitude bin m exactly.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .datasets import DataError, Split, find_unreadable

RANDAUG_BINS = 11  # timm's magnitude scale 0..10: m = 10 is full strength
CUTOUT = 16  # side of the Cutout square (cifar_strong)

RECIPES = ("simclr", "randaug", "randaug_stack", "cifar_strong", "cifar_simclr", "mnist", "center")
_CROP_SCALE = {"simclr": 0.08, "randaug": 0.08, "randaug_stack": 0.08, "cifar_simclr": 0.2, "mnist": 0.5}


def view_recipes(cfg: dict) -> list[str]:
    recipes = [cfg["views"][i % len(cfg["views"])] for i in range(cfg["n_views"])]
    for r in recipes:
        if r not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {r!r}; known: {RECIPES}")
    return recipes


def epoch_order(n: int, seed: int, epoch: int, world: int, batch_per_rank: int) -> np.ndarray:
    """The epoch's global sample order, trimmed so every rank gets the same whole number of batches."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = (n // world) // batch_per_rank * batch_per_rank
    return perm[: per_rank * world]


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def _fill_level(mean) -> int:
    """The grey level that fills pixels a geometric augmentation uncovers: the mean of `mean`, in 0-255."""
    return int(round(255 * sum(mean) / len(mean)))


def _blur_window(size: int) -> int:
    return max(3, int(0.1 * size) // 2 * 2 + 1)  # SimCLR: about 10% of the image side, odd


# --------------------------------------------------------------------------------------- DALI


def _dali_view(images, recipe: str, size: int, mean, std, ra_n: int, ra_m: int, eval_resize: int):
    """One view of `images` (uint8 HWC) by `recipe`; every view of a pipeline is made by this function."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import auto_augment, rand_augment

    def coin(p):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    fill = _fill_level(mean)

    def jitter(x, b, c, s, h, p):
        kw = {}
        for key, amount, lo in (
            ("brightness", b, 1.0),
            ("contrast", c, 1.0),
            ("saturation", s, 1.0),
            ("hue", h * 360.0, 0.0),
        ):  # hue in degrees: torchvision's hue factor h is a fraction of the full circle
            if amount:
                kw[key] = fn.random.uniform(range=[lo - amount, lo + amount])
        if coin(p):
            x = fn.color_twist(x, **kw)
        return x

    def grayscale(x, p):
        if coin(p):
            x = fn.color_twist(x, saturation=0.0)
        return x

    def blur(x, p):
        if coin(p):
            x = fn.gaussian_blur(x, window_size=_blur_window(size), sigma=fn.random.uniform(range=[0.1, 2.0]))
        return x

    mirror = 0
    if recipe == "center":
        images = fn.resize(images, resize_shorter=eval_resize)
        images = fn.crop(images, crop=(size, size))
    elif recipe == "cifar_strong":
        anchor = fn.random.uniform(range=[-4, 5], dtype=types.INT32, shape=2)
        images = fn.slice(images, anchor, (size, size), axis_names="WH", out_of_bounds_policy="pad", fill_values=0)
        mirror = fn.random.coin_flip()
        images = fn.flip(images, horizontal=mirror)
        mirror = 0
        images = auto_augment.auto_augment(
            images,
            policy_name="reduced_cifar10",
            shape=(size, size),
            fill_value=fill,
            interp_type=types.INTERP_LINEAR,
            max_translate_rel=150 / 331,  # the CIFAR policy's translate range, as torchvision's
        )
        centre = fn.random.uniform(range=[0, size], shape=2, dtype=types.INT32)  # as _Cutout: clipped square
        images = fn.erase(
            images,
            anchor=fn.cast(centre, dtype=types.FLOAT) - CUTOUT // 2,
            shape=(CUTOUT, CUTOUT),
            axis_names="HW",
            fill_value=0,
        )
    else:
        ratio = [0.8, 1.25] if recipe == "mnist" else [3 / 4, 4 / 3]
        images = fn.random_resized_crop(
            images, size=(size, size), random_area=[_CROP_SCALE[recipe], 1.0], random_aspect_ratio=ratio
        )
        if recipe == "mnist":
            images = jitter(images, 0.4, 0.4, 0.0, 0.0, 0.8)
        elif recipe == "simclr":
            images = blur(grayscale(jitter(images, 0.4, 0.4, 0.4, 0.0, 1.0), 0.2), 0.5)
            mirror = fn.random.coin_flip()
        elif recipe == "cifar_simclr":
            images = grayscale(jitter(images, 0.4, 0.4, 0.4, 0.1, 0.8), 0.2)
            mirror = fn.random.coin_flip()
        else:  # randaug, randaug_stack
            mirror = fn.random.coin_flip()
            images = fn.flip(images, horizontal=mirror)
            mirror = 0
            images = jitter(images, 0.4, 0.4, 0.4, 0.0, 1.0)
            if recipe == "randaug_stack":
                images = blur(grayscale(images, 0.2), 0.5)
            suite = _dali_randaugment_suite()
            for _ in range(ra_n):  # timm applies each of the n chosen operations with p = 0.5
                if coin(0.5):
                    images = rand_augment.apply_rand_augment(
                        suite,
                        images,
                        n=1,
                        m=ra_m,
                        num_magnitude_bins=RANDAUG_BINS,
                        shape=(size, size),
                        fill_value=fill,
                        interp_type=types.INTERP_LINEAR,
                    )
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mirror=mirror,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
    )


def _dali_randaugment_suite():
    """timm's 15 RandAugment operations at timm's magnitudes (bin RANDAUG_BINS - 1 = full strength)."""
    from nvidia.dali.auto_aug import augmentations, rand_augment

    suite = rand_augment.get_rand_augment_non_monotonic_suite(use_shape=True, max_translate_rel=0.45)
    return [a for a in suite if a.name != "identity"] + [augmentations.invert, augmentations.solarize_add]


def _dali_pipeline(files, labels, root, shard_id, num_shards, recipes, decode_device, opts, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def pipe():
        jpegs, y = fn.readers.file(
            file_root=str(root),
            files=files,
            labels=labels,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            name="Reader",
        )
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        views = [_dali_view(images, r, **opts) for r in recipes]
        return (*views, y)

    return pipe(**pipe_kwargs)


class DaliLoader:
    """Iterates one epoch (or the evaluation set) of this rank's shard through a DALI pipeline."""

    def __init__(
        self,
        split: Split,
        order: np.ndarray,
        recipes: list[str],
        batch: int,
        cfg: dict,
        rank: int,
        world: int,
        seed: int,
        device: torch.device,
        train: bool,
        skip: int = 0,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        self.split, self.batch, self.skip = split, batch, skip
        self.files = [split.files[i] for i in order]
        n = len(self.files)
        self.shard = (n * rank // world, n * (rank + 1) // world)  # as DALI's reader splits
        gpu = device.type == "cuda"
        opts = dict(
            size=cfg["image_size"],
            mean=cfg["mean"],
            std=cfg["std"],
            ra_n=cfg["randaug_n"],
            ra_m=cfg["randaug_m"],
            eval_resize=cfg["eval_resize"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pipe = _dali_pipeline(
                self.files,
                [int(split.labels[i]) for i in order],
                split.root,
                rank,
                world,
                recipes,
                "mixed" if gpu else "cpu",
                opts,
                batch_size=batch,
                num_threads=max(1, cfg["workers"]),
                device_id=device.index or 0 if gpu else None,
                seed=seed,
                prefetch_queue_depth=2,
            )
            self.pipe.build()
        self.n_views = len(recipes)
        self.iterator = DALIGenericIterator(
            self.pipe,
            [f"v{i}" for i in range(len(recipes))] + ["label"],
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        self.steps = (self.shard[1] - self.shard[0]) // batch if train else -(-(self.shard[1] - self.shard[0]) // batch)

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        step = 0
        it = iter(self.iterator)
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                return
            except RuntimeError as e:
                lo = self.shard[0] + step * self.batch
                window = self.files[lo : min(self.shard[1], lo + 4 * self.batch)]
                bad = find_unreadable([self.split.root / f for f in window]) or find_unreadable(
                    [self.split.root / f for f in self.files[self.shard[0] : self.shard[1]]]
                )
                if bad is not None:
                    raise DataError(f"cannot decode image {bad}") from e
                raise
            step += 1
            if step <= self.skip:
                continue
            yield [out[f"v{i}"] for i in range(self.n_views)], out["label"].reshape(-1).long()


# ----------------------------------------------------------------------------- torchvision


def _torch_view(recipe: str, cfg: dict):
    from PIL import Image
    from torchvision.transforms import v2 as T

    size = cfg["image_size"]
    fill = _fill_level(cfg["mean"])

    def jitter(b, c, s, h, p):
        return T.RandomApply([T.ColorJitter(b, c, s, h)], p=p)

    blur = T.RandomApply([T.GaussianBlur(_blur_window(size), sigma=(0.1, 2.0))], p=0.5)
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
    ops = [*ops, T.ToImage(), *after, T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(ops)


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
        with _seeded(_mix_seed(self.seed, pos)):  # augmentation depends on (seed, position) only
            views = [t(img) for t in self.transforms]
        return (*views, int(self.split.labels[i]))


class TorchLoader:
    """The torchvision fallback: the same shard, order and batch shapes as DaliLoader."""

    def __init__(
        self,
        split: Split,
        order: np.ndarray,
        recipes: list[str],
        batch: int,
        cfg: dict,
        rank: int,
        world: int,
        seed: int,
        device: torch.device,
        train: bool,
        skip: int = 0,
    ):
        n = len(order)
        shard = order[n * rank // world : n * (rank + 1) // world]
        if train:
            shard = shard[: len(shard) // batch * batch]
        self.skip = skip
        self.dataset = _ViewDataset(split, shard, [_torch_view(r, cfg) for r in recipes], seed)
        self.steps = len(shard) // batch if train else -(-len(shard) // batch)
        sampler = range(skip * batch, len(shard))
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=cfg["workers"],
            pin_memory=device.type == "cuda",
            drop_last=train,
            persistent_workers=False,
        )
        self.device = device

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self):
        for *views, labels in self.loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)


def make_loader(
    cfg: dict, split: Split, *, train: bool, epoch: int, rank: int, world: int, device: torch.device, skip: int = 0
):
    """This rank's loader for one training epoch (train=True) or for evaluation."""
    batch = cfg["batch_size"] // world
    if train:
        order = epoch_order(len(split), cfg["seed"], epoch, world, batch)
        recipes = view_recipes(cfg)
    else:
        order = np.arange(len(split))
        recipes = ["center"]
    seed = _mix_seed(cfg["seed"], epoch, rank, int(train))
    cls = DaliLoader if cfg["data_loader"] == "dali" else TorchLoader
    return cls(split, order, recipes, batch, cfg, rank, world, seed, device, train, skip)
