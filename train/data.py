"""Batches of V augmented views: what the two loaders share, and `make_loader`, which picks one.

The DALI pipeline is in train/dali_loader.py, the torchvision fallback in train/torch_loader.py;
the sample order, each rank's shard, the steps of an epoch and the skip of a resumed epoch are
computed here, once, for both (`Sharding`).

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

import numpy as np
import torch

from .datasets import Split

RANDAUG_BINS = 11  # timm's magnitude scale 0..10: m = 10 is full strength
CUTOUT = 16  # side of the Cutout square (cifar_strong)

RECIPES = ("simclr", "randaug", "randaug_stack", "cifar_strong", "cifar_simclr", "mnist", "center")
CROP_SCALE = {"simclr": 0.08, "randaug": 0.08, "randaug_stack": 0.08, "cifar_simclr": 0.2, "mnist": 0.5}


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


def mix_seed(*parts: int) -> int:
    """One 31-bit seed from several integers (seed, epoch, rank, ...), well mixed."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def fill_level(mean) -> int:
    """The grey level that fills pixels a geometric augmentation uncovers: the mean of `mean`, in 0-255."""
    return int(round(255 * sum(mean) / len(mean)))


class Sharding:
    """Which samples this rank reads in an epoch, in which order, in how many steps.

    Training: the epoch's global order (`epoch_order`), rank r's contiguous r-th share, full
    batches only. Evaluation: the split in file order, sharded the same way, the last batch
    partial. `max_steps` (0: none) ends every epoch early (smoke tests, max_eval_batches).
    """

    def __init__(self, n: int, seed: int, rank: int, world: int, batch: int, train: bool, max_steps: int = 0):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.batch, self.train, self.max_steps = batch, train, max_steps
        self._shards: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if self.train:
            return epoch_order(self.n, self.seed, epoch, self.world, self.batch)
        return np.arange(self.n)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of `epoch`, in order (the last epoch asked is kept)."""
        if epoch not in self._shards:
            order = self.order(epoch)
            n = len(order)
            self._shards = {epoch: order[n * self.rank // self.world : n * (self.rank + 1) // self.world]}
        return self._shards[epoch]

    def steps(self, epoch: int) -> int:
        """Batches of the epoch: full ones when training, the last one partial in evaluation."""
        n = len(self.shard(epoch))
        steps = n // self.batch if self.train else -(-n // self.batch)
        return min(steps, self.max_steps) if self.max_steps else steps

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.shard(epoch)[step * self.batch : (step + 1) * self.batch]

    def positions(self, epoch: int, skip: int) -> range:
        """Positions in the shard read from step `skip` to the epoch's end."""
        return range(skip * self.batch, min(len(self.shard(epoch)), self.steps(epoch) * self.batch))


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
    limit = cfg["max_steps"] if train else cfg["max_eval_batches"]
    sharding = Sharding(len(split), cfg["seed"], rank, world, batch, train, limit)
    recipes = view_recipes(cfg) if train else ["center"]
    if cfg["data_loader"] == "dali":
        from .dali_loader import DaliLoader as cls
    else:
        from .torch_loader import TorchLoader as cls
    return cls(split, sharding, recipes, cfg, device, epoch=epoch, skip=skip, state=state)
