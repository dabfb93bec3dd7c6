"""The training state: what the loop changes from step to step, built once and restored from a checkpoint.

`TrainState` is the only thing the loop's parts share; it is passed to them explicitly. `snapshot`
and `restore` are its two ends of a checkpoint: a checkpoint holds tensors and plain Python values
only, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from . import config as config_mod
from .data import make_loader
from .logs import first_best
from .models import Model, freeze
from .objective import PROJECTING, Objective
from .run import Data, Run, barrier
from .stop import all_finite, diverged


@dataclass
class TrainState:
    """Model, optimizer and loaders of a run, and where the run is: the loop's whole shared state."""

    model: nn.Module  # the bare model: checkpoints, evaluation
    net: nn.Module  # what a step calls: the model under DDP and / or torch.compile
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable  # () -> the step's autocast context
    steps: int  # optimizer steps per epoch
    epoch: int = 0  # epochs completed
    step: int = 0  # steps done of epoch `epoch` (a mid-epoch checkpoint)
    best: tuple[float, int] = (-1.0, 0)  # (validation top-1, epoch) of the best epoch so far
    partial: dict = field(default_factory=dict)  # a mid-epoch checkpoint's sums of the epoch so far
    loader: object = None  # the training loader, built once for the whole run
    val_loader: object = None  # built at the first evaluation, then reused
    report: dict = field(default_factory=dict)  # the last evaluation


def autocast_factory(cfg: dict, device: torch.device) -> tuple[Callable, torch.amp.GradScaler | None]:
    """(a function returning the step's autocast context, the fp16 gradient scaler or None)."""
    mode = cfg["amp"]
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _model(run: Run, data: Data) -> nn.Module:
    """The model, seeded alike on every rank, in the run's memory format, BatchNorm synced if asked."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    proj = cfg["proj_dim"] if cfg["loss"] in PROJECTING else 0
    model = Model(cfg["arch"], data.num_classes, cfg["head"], proj, cfg["pretrained"]).to(device)
    if cfg["freeze"]:
        freeze(model.backbone, cfg["freeze"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    channels_last = cfg["channels_last"] in (True, "true") or (cfg["channels_last"] == "auto" and device.type == "cuda")
    cfg["_channels_last"] = channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"] and run.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build(run: Run, data: Data, steps: int) -> TrainState:
    """A new run's state at epoch 0, without its loaders (`restore` may move it first)."""
    cfg = run.cfg
    model = _model(run, data)
    objective = Objective(cfg, model, data.counts, data.num_classes).to(run.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    autocast, scaler = autocast_factory(cfg, run.device)
    return TrainState(model, model, objective, optimizer, scaler, autocast, steps)


def wrap(run: Run, st: TrainState) -> None:
    """st.net: the model under DDP (several ranks) and torch.compile (when asked)."""
    net: nn.Module = st.model
    if run.world > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(st.model, device_ids=ids)
    st.net = torch.compile(net) if run.cfg["compile"] else net


def _check_mid_epoch_resume(ck: dict, world: int, batch_size: int, path) -> None:
    """A checkpoint saved mid-epoch continues that epoch's shards: only with the same ranks and batch.

    Each rank's shard of the epoch order, its position in it, and its augmentation seed all depend
    on the world size and the per-rank batch; another split would repeat some images and skip others.
    """
    saved_world, saved_batch = ck.get("world", 1), ck["config"]["batch_size"]
    if (saved_world, saved_batch) != (world, batch_size):
        raise config_mod.ConfigError(
            f"resume {path}: the checkpoint was saved mid-epoch (epoch {ck['epoch'] + 1}, step {ck['step']}) by "
            f"{saved_world} rank(s) with batch_size={saved_batch}; this run has {world} rank(s) with "
            f"batch_size={batch_size}. A mid-epoch resume needs the same world size and batch size "
            f"(epoch-end checkpoints resume with any)"
        )


def restore(run: Run, st: TrainState, ck: dict, path: Path, num_classes: int) -> dict | None:
    """Load checkpoint `ck` (read from `path`) into `st`; returns this rank's loader state, if any."""
    if ck["num_classes"] != num_classes:
        raise checkpoint.CheckpointError(
            f"cannot resume from {path}: it has {ck['num_classes']} classes, this data {num_classes}"
        )
    try:
        st.model.load_state_dict(ck["model"])
        st.objective.load_state_dict(ck["objective"])
        st.optimizer.load_state_dict(ck["optimizer"])
        if st.scaler is not None and ck.get("scaler"):
            st.scaler.load_state_dict(ck["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
    st.epoch, st.step = ck["epoch"], ck["step"]
    st.best = (ck["best_top1"], ck.get("best_epoch", 0))
    st.partial = ck.get("partial") or {}
    if st.step:
        _check_mid_epoch_resume(ck, run.world, run.cfg["batch_size"], path)
    run.say(f"resumed from {path}: epoch {st.epoch}, step {st.step}")
    states = ck.get("loader") or []
    if len(states) == run.world and ck["config"]["data_loader"] == run.cfg["data_loader"]:
        return states[run.rank]
    return None


def start_loader(run: Run, st: TrainState, data: Data, loader_state: dict | None) -> None:
    """One training loader for the whole run (DALI's pipelines are built once), at the resumed step."""
    st.loader = make_loader(
        run.cfg,
        data.train,
        train=True,
        epoch=st.epoch,
        rank=run.rank,
        world=run.world,
        device=run.device,
        skip=st.step,
        state=loader_state,
    )


def keep_best(st: TrainState, logged: tuple[float, int]) -> None:
    """The checkpoint is written before its epoch's evaluation: that evaluation is in metrics.csv only."""
    st.best = max(st.best, logged, key=first_best)


def snapshot(run: Run, st: TrainState, epoch: int, step: int, partial: dict | None, row: dict | None) -> dict:
    """The checkpoint of (epoch, step), with every rank's loader state (a collective: every rank calls it)."""
    state = st.loader.state()  # every rank's loader (DALI: the pipeline's random state and position)
    states = [state] * run.world
    if run.world > 1 and state is not None:
        dist.all_gather_object(states, state)
    return {
        "model": st.model.state_dict(),
        "objective": st.objective.state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler else None,
        "epoch": epoch,
        "step": step,
        "best_top1": float(st.best[0]),
        "best_epoch": int(st.best[1]),
        "num_classes": st.model.classifier.out_features,
        "world": run.world,
        "loader": states if state is not None else None,
        "config": {k: run.cfg[k] for k in config_mod.DEFAULTS},
        "partial": partial,  # mid-epoch: the epoch's sums so far
        "row": row,  # epoch end: the epoch's training figures, its evaluation not yet run
    }


def save(run: Run, st: TrainState, loss_sum: torch.Tensor, epoch: int, step: int, partial=None, row=None) -> None:
    """Write the checkpoint of (epoch, step); refuse to if the loss or a weight is NaN/Inf.
    `row`: an ended epoch's training figures, for its metrics.csv row if its evaluation is cut off."""
    if not all_finite(loss_sum, st.model):
        raise diverged(run.cfg, run.checkpoint, epoch - (step == 0), step or st.steps)
    ck = snapshot(run, st, epoch, step, partial, row)
    if run.main:
        checkpoint.save(ck, run.checkpoint)
    barrier()
