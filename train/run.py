"""Setting up a run: the process group, the run folder and its guard, the checkpoint to resume, the data.

Everything here happens before a model exists. `Run` holds what every later part needs to know about
the process (rank, world size, device, run folder); `Data` the splits and their class counts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from acl_kernels.distributed import loss_group

from . import checkpoint
from . import config as config_mod
from .data_checks import check_images, describe_classes
from .datasets import Split, check_shards, class_counts, prepare

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # model weights of the epoch with the best validation top-1
RUN_FILES = ("config.yaml", "metrics.csv", CHECKPOINT, checkpoint.previous_path(Path(CHECKPOINT)).name, BEST)
# a rendezvous or collective that waits longer than this ends the worker with an error
DIST_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Run:
    """This process's place in the run: its config, rank, world size, device and run folder."""

    cfg: dict
    rank: int
    world: int
    device: torch.device
    out: Path

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def say(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.main:
            print(*args, **kwargs)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split | None
    num_classes: int
    counts: np.ndarray  # training images per class


def _process_group_store(world: int, rank: int):
    """The store of this round of workers, under a prefix of its own.

    Under torchrun, every round of workers after a restart talks to the elastic agent's store, which
    keeps the previous round's keys (a dead worker's addresses among them): a restarted round that
    reads them hangs or fails to connect. A prefix per restart (TORCHELASTIC_RESTART_COUNT) keeps the
    rounds apart. Without torchrun's variables: None (the environment's own rendezvous).
    """
    if "MASTER_ADDR" not in os.environ or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    # the agent serves the store it shares; otherwise (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0 does
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=host,
        timeout=DIST_TIMEOUT,
        use_libuv=True,
    )
    return dist.PrefixStore(f"acl-train/restart{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def setup_distributed(cfg: dict) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun's environment starts DDP: NCCL on GPU, gloo on CPU."""
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        store = _process_group_store(world, rank)
        kwargs = {"store": store, "rank": rank, "world_size": world} if store is not None else {}
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=DIST_TIMEOUT, **kwargs)
    if world > 1:
        loss_group()  # made here, at the same point on every rank
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close_distributed() -> None:
    """Tear the process group down on every rank together. A rank that closed its gloo sockets while
    another was still finishing once aborted ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def start(cfg: dict) -> Run:
    """The process group, torch's threads, and the run folder's guard (before anything is written)."""
    rank, world, device = setup_distributed(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["batch_size"] % world:
        raise config_mod.ConfigError(f"batch_size={cfg['batch_size']} must be divisible by the {world} ranks")
    run = Run(cfg, rank, world, device, config_mod.run_dir(cfg))
    if not cfg["resume"]:
        found = [name for name in RUN_FILES if (run.out / name).is_file()]
        if found:
            raise config_mod.ConfigError(
                f"the run folder {run.out} already holds a run ({', '.join(found)}): continue it with "
                f"--resume auto, or start a new one under another name with --name"
            )
    return run


def find_resume(run: Run) -> tuple[dict | None, Path | None]:
    """(checkpoint, its file) of --resume, checked against this config; (None, None) when starting anew."""
    resume = run.cfg["resume"]
    if resume == "auto":
        found = run.checkpoint.is_file() or checkpoint.previous_path(run.checkpoint).is_file()
        resume = str(run.checkpoint) if found else ""
    if not resume:
        return None, None
    ck, path = checkpoint.load(Path(resume), map_location=run.device, log=run.say)
    for line in checkpoint.config_changes(ck["config"], run.cfg):
        run.say(line)
    return ck, path


def _prepare(run: Run) -> tuple:
    splits = prepare(run.cfg)
    if run.cfg["check_images"]:
        for split in (s for s in splits[:3] if s is not None):  # train, val, test
            if check_images(split, run.cfg["cache_dir"], max(run.cfg["workers"], 1)):
                run.say(f"{split.path}: all {len(split)} images decode")
    return splits


def load_data(run: Run) -> Data:
    """The splits: rank 0 builds the cache (MNIST-LT / CIFAR-LT) and decodes every image first; every
    rank runs all checks (the image check then finds rank 0's stamp)."""
    if run.main:
        splits = _prepare(run)
    barrier()
    if not run.main:
        splits = _prepare(run)
    train, val, test, num_classes = splits
    run.say(describe_classes(train, num_classes, named=bool(run.cfg["num_classes"])))
    return Data(train, val, test, num_classes, class_counts(train, num_classes))


def steps_per_epoch(run: Run, data: Data) -> int:
    steps = check_shards(len(data.train), len(data.val), run.world, run.cfg["batch_size"] // run.world)
    return min(steps, run.cfg["max_steps"]) if run.cfg["max_steps"] else steps


def prepare_folder(run: Run) -> None:
    """Rank 0: the run folder, its config.yaml, no temporaries of an interrupted checkpoint write."""
    if not run.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    config_mod.save(run.cfg, run.out / "config.yaml")
    for tmp in checkpoint.remove_stale_temporaries(run.checkpoint):
        print(f"removed {tmp}, left by an interrupted checkpoint write")
