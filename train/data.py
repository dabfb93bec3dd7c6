"""Batches of V augmented views: a DALI pipeline, or a torchvision fallback that makes the same batches.

Both loaders yield `(views, labels)`: `views` a list of V float32 [B, 3, H, W] normalised tensors
(one per view, in the order of cfg["views"] cycled to n_views), `labels` int64 [B].

Sample order. Each epoch draws one global permutation from (seed, epoch), identical on every rank,
trims it to a multiple of world * per-rank batch (instance-balanced sampling with drop_last, and
the same number of steps on every rank), and gives rank r the r-th contiguous shard. The DALI
reader shards with shard_id / num_shards over that list; the fallback slices it the same way.
The augmentation randomness depends only on (seed, epoch, rank): the fallback seeds every sample;
DALI seeds its pipeline at the run's first epoch and keeps it across epochs, and a checkpoint holds
the pipeline's state. So a run resumed from a checkpoint sees the same batches.

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
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
            # sigma ~ U(0.1, 2) as the official code (PIL); DALI sizes the window per sample: 2 ceil(3 sigma) + 1
            x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[0.1, 2.0]))
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


def _dali_pipeline(source, recipes, decode_device, opts, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def pipe():
        jpegs, y = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        views = [_dali_view(images, r, **opts) for r in recipes]
        return (*views, y.gpu() if decode_device == "mixed" else y)  # on the GPU: no blocking copy per step

    return pipe(**pipe_kwargs)


def _rank_shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of an epoch's sample order."""
    n = len(order)
    return order[n * rank // world : n * (rank + 1) // world]


def _steps(n: int, batch: int, train: bool) -> int:
    """Batches in a shard of n samples: full batches when training, the last one partial in evaluation."""
    return n // batch if train else -(-n // batch)


def _weak_source(loader: DaliLoader) -> Callable:
    """loader._source through a weak reference. A bound method would make loader -> pipeline ->
    source -> loader a cycle, freed only by the cyclic garbage collector, which may then run in a
    forked DataLoader worker, where destroying the DALI pipeline (its threads gone) hangs."""
    ref = weakref.ref(loader)

    def source(info):
        return ref()._source(info)

    return source


class DaliLoader:
    """This rank's shard of every epoch (or of the evaluation set) through one DALI pipeline.

    The pipeline is built once and reset at each epoch (building costs seconds). Its external
    source hands it the encoded files of the epoch's order batch by batch (read ahead by a thread
    pool), so the order can change per epoch without a rebuild; DALI prefetches `prefetch` batches
    ahead. state() is a DALI checkpoint (random generators and position): a new loader restored
    from it continues exactly, mid-epoch too.
    """

    def __init__(
        self,
        split: Split,
        order_of: Callable[[int], np.ndarray],
        recipes: list[str],
        batch: int,
        cfg: dict,
        rank: int,
        world: int,
        device: torch.device,
        train: bool,
        epoch: int = 0,
        skip: int = 0,
        state: dict | None = None,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.split, self.order_of, self.batch, self.train = split, order_of, batch, train
        self.rank, self.world = rank, world
        self.max_steps = cfg["max_steps"] if train else cfg["max_eval_batches"]  # ends the epoch: reset works
        self.first_epoch = state["first_epoch"] if state else epoch
        self._shards: dict[int, np.ndarray] = {}
        self.read_ahead = cfg["prefetch"]
        self._pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="read-ahead")
        self._reads: dict[tuple[int, int], Future] = {}
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
                _weak_source(self),
                recipes,
                "mixed" if gpu else "cpu",
                opts,
                batch_size=batch,
                num_threads=max(1, cfg["workers"]),
                device_id=device.index or 0 if gpu else None,
                seed=_mix_seed(cfg["seed"], epoch, rank, int(train)),
                prefetch_queue_depth=cfg["prefetch"],
                checkpoint=state["dali"] if state else None,
            )
            self.pipe.build()
        self.n_views = len(recipes)
        self.iterator = DALIGenericIterator(self.pipe, [f"v{i}" for i in range(len(recipes))] + ["label"])
        self.epoch, self.skip, self.at_end = epoch, skip, False
        self.replay = 0 if state else skip  # restored: the pipeline is already at step `skip`

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of `epoch`, in order."""
        if epoch not in self._shards:
            self._shards = {epoch: _rank_shard(self.order_of(epoch), self.rank, self.world)}
        return self._shards[epoch]

    def steps_of(self, epoch: int) -> int:
        steps = _steps(len(self.shard(epoch)), self.batch, self.train)
        return min(steps, self.max_steps) if self.max_steps else steps

    def _read(self, epoch: int, step: int):
        idx = self.shard(epoch)[step * self.batch : (step + 1) * self.batch]
        files = [np.fromfile(self.split.full_path(int(i)), np.uint8) for i in idx]
        return files, [np.array([self.split.labels[i]], np.int64) for i in idx]

    def _source(self, info):
        """The encoded files and labels of batch `info.iteration` of the pipeline's epoch `info.epoch_idx`.

        DALI calls this on the training loop's thread; the files of this and the next `prefetch`
        batches are read by a thread pool, so the loop does not wait on storage.
        """
        epoch = self.first_epoch + info.epoch_idx
        steps = self.steps_of(epoch)
        if info.iteration >= steps:
            raise StopIteration
        for step in range(info.iteration, min(steps, info.iteration + 1 + self.read_ahead)):
            if (epoch, step) not in self._reads:
                self._reads[(epoch, step)] = self._pool.submit(self._read, epoch, step)
        return self._reads.pop((epoch, info.iteration)).result()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` next, from its step `skip`; epochs follow one another (the pipeline's own count)."""
        following = self.epoch + 1 if self.at_end else self.epoch
        if epoch != following:
            raise ValueError(f"set_epoch({epoch}): this DALI pipeline continues with epoch {following}")
        self.epoch, self.skip, self.replay = epoch, skip, skip

    def state(self) -> dict:
        return {"first_epoch": self.first_epoch, "dali": self.iterator.checkpoints()[0]}

    def __len__(self) -> int:
        return self.steps_of(self.epoch) - self.skip

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if self.at_end:
            self.iterator.reset()
            self.at_end = False
        step = 0
        it = iter(self.iterator)
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                self.at_end = True
                return
            except RuntimeError as e:
                shard = [self.split.full_path(int(i)) for i in self.shard(self.epoch)]
                bad = find_unreadable(shard[step * self.batch : (step + 4) * self.batch]) or find_unreadable(shard)
                if bad is not None:
                    raise DataError(f"cannot decode image {bad}") from e
                raise
            step += 1
            if step <= self.replay:  # a resume without the pipeline's state: replay the skipped batches
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
        with _seeded(_mix_seed(self.seed, pos)):  # augmentation depends on (seed, position) only
            views = [t(img) for t in self.transforms]
        return (*views, int(self.split.labels[i]))


class TorchLoader:
    """The torchvision fallback: the same shard, order and batch shapes as DaliLoader (a DataLoader per epoch)."""

    def __init__(
        self,
        split: Split,
        order_of: Callable[[int], np.ndarray],
        recipes: list[str],
        batch: int,
        cfg: dict,
        rank: int,
        world: int,
        device: torch.device,
        train: bool,
        epoch: int = 0,
        skip: int = 0,
        state: dict | None = None,
    ):
        self.split, self.order_of, self.batch, self.cfg = split, order_of, batch, cfg
        self.rank, self.world, self.device, self.train = rank, world, device, train
        self.transforms = [_torch_view(r, cfg) for r in recipes]
        self.set_epoch(epoch, skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        shard = _rank_shard(self.order_of(epoch), self.rank, self.world)
        if self.train:
            shard = shard[: len(shard) // self.batch * self.batch]
        self.skip = skip
        seed = _mix_seed(self.cfg["seed"], epoch, self.rank, int(self.train))
        self.dataset = _ViewDataset(self.split, shard, self.transforms, seed)
        self.steps = _steps(len(shard), self.batch, self.train)
        workers = self.cfg["workers"]
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=range(skip * self.batch, len(shard)),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.train,
            prefetch_factor=self.cfg["prefetch"] if workers else None,
        )

    def state(self) -> None:
        return None  # the augmentation depends on (seed, epoch, rank, position) only

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self):
        for *views, labels in self.loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)


def make_loader(
    cfg: dict,
    split: Split,
    *,
    train: bool,
    epoch: int,
    rank: int,
    world: int,
    device: torch.device,
    skip: int = 0,
    state: dict | None = None,
):
    """This rank's loader, set to training epoch `epoch` from step `skip` (train=True), or for evaluation.

    A training loader serves later epochs too: loader.set_epoch(e). `state` (from loader.state()
    of an earlier run) restores the DALI pipeline where it was.
    """
    batch = cfg["batch_size"] // world
    if train:

        def order_of(e: int) -> np.ndarray:
            return epoch_order(len(split), cfg["seed"], e, world, batch)

        recipes = view_recipes(cfg)
    else:

        def order_of(e: int) -> np.ndarray:
            return np.arange(len(split))

        recipes = ["center"]
    cls = DaliLoader if cfg["data_loader"] == "dali" else TorchLoader
    return cls(split, order_of, recipes, batch, cfg, rank, world, device, train, epoch, skip, state)
