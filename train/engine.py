"""The training loop: data checks, model, SGD with warm-up + cosine/step, AMP, DDP, checkpoints, evaluation."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from acl_kernels.distributed import loss_group

from . import checkpoint
from . import config as config_mod
from .data import _mix_seed, make_loader
from .data_checks import check_images, describe_classes
from .datasets import check_shards, class_counts, prepare
from .metrics import accuracy_report
from .models import Model, freeze
from .objective import PROJECTING, Objective, _unwrap

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # model weights of the epoch with the best validation top-1


# ----------------------------------------------------------------------------------- set-up


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
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if world > 1:
        loss_group()  # made here, at the same point on every rank
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def lr_at(cfg: dict, epoch: int, step: int, steps: int) -> float:
    """Linear warm-up per step over warmup_epochs, then cosine to 0 or x0.1 at each of lr_steps."""
    t = epoch + step / steps
    warm = cfg["warmup_epochs"]
    if t < warm:
        return cfg["lr"] * (epoch * steps + step + 1) / (warm * steps)
    if cfg["schedule"] == "step":
        return cfg["lr"] * 0.1 ** sum(epoch >= s for s in cfg["lr_steps"])
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(cfg["epochs"] - warm, 1e-8)))


def autocast_factory(cfg: dict, device: torch.device):
    mode = cfg["amp"]
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message says why and what was kept."""


def all_finite(loss_sum: torch.Tensor, model: nn.Module) -> bool:
    """The summed loss and every parameter are finite (one sync)."""
    total = loss_sum.detach().float() + torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    return bool(torch.isfinite(total))


class _Stop:
    """SIGTERM sets a flag; the loop saves a checkpoint and stops at the next step that checks it.

    One process checks after every step (reading a flag). Under DDP every rank must stop at the
    same step, so ranks agree by an all-reduce of the flags every `every` steps and at an epoch's
    last step `steps`, on a gloo group of CPU tensors: the check never waits on the GPU, and costs
    one small CPU collective per `every` steps.
    """

    def __init__(self, every: int = 1, steps: int = 0):
        self.flag = False
        self.every, self.steps = every, steps
        self.previous = None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (1-based steps of the epoch)."""
        if self.group is None:
            return self.flag
        if step % self.every and step != self.steps:
            return False
        t = torch.tensor([float(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)  # every rank stops at the same step
        return bool(t.item())


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


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP sends them before each
    forward: evaluation on every rank then uses the statistics of the checkpoint rank 0 saves."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


# ------------------------------------------------------------------------------------ logs


def _first_best(scored: tuple[float, int]) -> tuple[float, int]:
    """Sort key of (top-1, epoch): the highest top-1, the earliest epoch among equals (as selection)."""
    return scored[0], -scored[1]


class Logs:
    """metrics.csv (one row per epoch), per_class.csv (per-class top-1 per epoch), TensorBoard (rank 0)."""

    FIELDS = ("epoch", "lr", "loss", "top1", "many", "medium", "few", "images_per_s", "epoch_s")

    def __init__(self, out: Path, cfg: dict, num_classes: int, start_epoch: int, active: bool, resume_step: int):
        self.active = active
        self.out = out
        self.tb = None
        self.best = (-1.0, 0)  # (top-1, epoch) of the best epoch kept from before a resume
        self.logged: set[int] = set()  # epochs with a row in metrics.csv
        if not active:
            return
        self.metrics = out / "metrics.csv"
        self.per_class = out / "per_class.csv"
        # resuming: drop rows of epochs that will run again
        for path, header in (
            (self.metrics, list(self.FIELDS)),
            (self.per_class, ["epoch"] + [f"class_{c}" for c in range(num_classes)]),
        ):
            rows = []
            if start_epoch > 0 and path.is_file():
                with open(path, newline="") as f:
                    rows = [r for r in csv.reader(f)][1:]
                rows = [r for r in rows if r and int(r[0]) <= start_epoch]
            if path == self.metrics:
                self.logged = {int(r[0]) for r in rows}
                top1 = [(float(r[self.FIELDS.index("top1")] or "nan"), int(r[0])) for r in rows]
                self.best = max([b for b in top1 if not math.isnan(b[0])], key=_first_best, default=self.best)
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([header] + rows)
        if cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # one axis, the optimizer step: points after the checkpoint (a run that died later) go
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard logs")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def epoch(self, row: dict, per_class: np.ndarray | None, step: int) -> None:
        """Append the epoch's row; TensorBoard gets its scalars at `step`, the optimizer step ending it."""
        if not self.active:
            return
        with open(self.metrics, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.FIELDS])
        if per_class is not None:
            with open(self.per_class, "a", newline="") as f:
                csv.writer(f).writerow([row["epoch"]] + [_fmt(a) for a in per_class])
        for k in self.FIELDS[1:]:
            if isinstance(row.get(k), float) and not math.isnan(row[k]):
                self.scalar(f"epoch/{k}", row[k], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_curves(out: Path) -> Path | None:
    """curves.png from metrics.csv: training loss, and top-1 overall / Many / Medium / Few per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def col(k):
        return [float(r[k]) if r[k] not in ("", "nan") else float("nan") for r in rows]

    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, col("loss"))
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    for k in ("top1", "many", "medium", "few"):
        b.plot(ep, col(k), label=k)
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="evaluation")
    b.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- loop


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: dict,
    val,
    num_classes: int,
    train_counts,
    rank: int,
    world: int,
    device: torch.device,
    autocast,
    loader=None,
) -> dict:
    """Top-1 of the raw classifier (no logit compensation) on this rank's shard, summed over ranks.

    `loader`: an evaluation loader of an earlier call, to run again (DALI: no pipeline rebuild)."""
    net = _unwrap(model)
    net.eval()
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    loader = loader or make_loader(cfg, val, train=False, epoch=0, rank=rank, world=world, device=device)
    for i, (views, labels) in enumerate(loader):
        if cfg["max_eval_batches"] and i >= cfg["max_eval_batches"]:
            break
        x = views[0].to(device)
        if cfg["_channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, _ = net(x, project=False)
        labels = labels.to(device)
        hit = (logits.argmax(1) == labels).double()
        correct += torch.bincount(labels, weights=hit, minlength=num_classes)
        total += torch.bincount(labels, minlength=num_classes).double()
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    net.train()
    return accuracy_report(correct.cpu().numpy(), total.cpu().numpy(), train_counts)


def train(cfg: dict) -> dict:
    """Run (or resume) a training run; returns the last evaluation report (rank 0's view)."""
    rank, world, device = setup_distributed(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["batch_size"] % world:
        raise config_mod.ConfigError(f"batch_size={cfg['batch_size']} must be divisible by the {world} ranks")
    out = config_mod.run_dir(cfg)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)

    # a resume is checked against this config before anything is written
    resume = cfg["resume"]
    if resume == "auto":
        found = (out / CHECKPOINT).is_file() or checkpoint.previous_path(out / CHECKPOINT).is_file()
        resume = str(out / CHECKPOINT) if found else ""
    ck = None
    if resume:
        ck, resume = checkpoint.load(Path(resume), map_location=device, log=say)
        for line in checkpoint.config_changes(ck["config"], cfg):
            say(line)

    # data: rank 0 builds the cache (MNIST-LT / CIFAR-LT) and decodes every image first; every rank
    # runs all checks (the image check then finds rank 0's stamp)
    def data():
        splits = prepare(cfg)
        if cfg["check_images"]:
            for split in (s for s in splits[:3] if s is not None):  # train, val, test
                if check_images(split, cfg["cache_dir"], max(cfg["workers"], 1)):
                    say(f"{split.path}: all {len(split)} images decode")
        return splits

    if main:
        train_split, val_split, test_split, num_classes = data()
    barrier()
    if not main:
        train_split, val_split, test_split, num_classes = data()
    say(describe_classes(train_split, num_classes, named=bool(cfg["num_classes"])))
    if ck is not None and ck["num_classes"] != num_classes:
        raise checkpoint.CheckpointError(
            f"cannot resume from {resume}: it has {ck['num_classes']} classes, this data {num_classes}"
        )
    counts = class_counts(train_split, num_classes)
    batch = cfg["batch_size"] // world
    steps = check_shards(len(train_split), len(val_split), world, batch)
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])

    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = Model(
        cfg["arch"], num_classes, cfg["head"], cfg["proj_dim"] if cfg["loss"] in PROJECTING else 0, cfg["pretrained"]
    ).to(device)
    if cfg["freeze"]:
        freeze(model.backbone, cfg["freeze"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    channels_last = cfg["channels_last"] in (True, "true") or (cfg["channels_last"] == "auto" and device.type == "cuda")
    cfg["_channels_last"] = channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"] and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    objective = Objective(cfg, model, counts, num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    autocast, scaler = autocast_factory(cfg, device)

    start_epoch, start_step, best, best_epoch, partial, loader_state = 0, 0, -1.0, 0, {}, None
    if ck is not None:
        try:
            model.load_state_dict(ck["model"])
            objective.load_state_dict(ck["objective"])
            optimizer.load_state_dict(ck["optimizer"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {resume} does not fit this model: {e}") from e
        start_epoch, start_step, best = ck["epoch"], ck["step"], ck["best_top1"]  # best: see Logs.best
        best_epoch = ck.get("best_epoch", 0)
        partial = ck.get("partial") or {}
        if start_step:
            _check_mid_epoch_resume(ck, world, cfg["batch_size"], resume)
        states = ck.get("loader") or []
        if len(states) == world and ck["config"]["data_loader"] == cfg["data_loader"]:
            loader_state = states[rank]
        say(f"resumed from {resume}: epoch {start_epoch}, step {start_step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.yaml")
        for tmp in checkpoint.remove_stale_temporaries(out / CHECKPOINT):
            print(f"removed {tmp}, left by an interrupted checkpoint write")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        net = torch.compile(net)

    logs = Logs(out, cfg, num_classes, start_epoch, main, start_epoch * steps + start_step)
    # the checkpoint is written before its epoch's evaluation: that evaluation is in metrics.csv only
    best, best_epoch = max((best, best_epoch), logs.best, key=_first_best)
    stop = _Stop(cfg["stop_check_every"], steps)

    def diverged(epoch: int, step: int):
        last = out / CHECKPOINT
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written"
        raise TrainingError(
            f"the training loss or a weight is NaN/Inf (epoch {epoch + 1}, by step {step}): training diverged; "
            f"{kept}; lower the learning rate (lr={cfg['lr']}) or check the data"
        )

    def save(epoch: int, step: int, partial: dict | None = None, row: dict | None = None) -> None:
        """Write the checkpoint of (epoch, step); refuse to if the loss or a weight is NaN/Inf.
        `row`: an ended epoch's training figures, for its metrics.csv row if its evaluation is cut off."""
        if not all_finite(loss_sum, model):
            diverged(epoch - (step == 0), step or steps)
        state = loader.state()  # every rank's loader (DALI: the pipeline's random state and position)
        states = [state] * world
        if world > 1 and state is not None:
            dist.all_gather_object(states, state)
        if main:
            checkpoint.save(
                {
                    "model": model.state_dict(),
                    "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "epoch": epoch,
                    "step": step,
                    "best_top1": best,
                    "best_epoch": best_epoch,
                    "num_classes": num_classes,
                    "world": world,
                    "loader": states if state is not None else None,
                    "config": {k: cfg[k] for k in config_mod.DEFAULTS},
                    "partial": partial,  # mid-epoch: the epoch's sums so far
                    "row": row,  # epoch end: the epoch's training figures, its evaluation not yet run
                },
                out / CHECKPOINT,
            )
        barrier()

    if main:
        groups = np.bincount(np.where(counts > 100, 0, np.where(counts >= 20, 1, 2)), minlength=3)
        print(
            f"{cfg['name']}: {len(train_split)} training images, {num_classes} classes "
            f"(Many/Medium/Few = {groups[0]}/{groups[1]}/{groups[2]}), {len(val_split)} for evaluation; "
            f"{world} rank(s) on {device.type}, {steps} steps of {cfg['batch_size']} per epoch, "
            f"loss={cfg['loss']}, data_loader={cfg['data_loader']}, output {out}"
        )
    report: dict = {}
    done = start_epoch  # epochs completed
    val_loader = None

    def finish_epoch(epoch: int, row: dict) -> None:
        """Evaluate the ended epoch (when due), keep the best weights, log its row."""
        nonlocal report, best, best_epoch, val_loader
        per_class = None
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            broadcast_buffers(model)
            if val_loader is None:
                val_loader = make_loader(cfg, val_split, train=False, epoch=0, rank=rank, world=world, device=device)
            report = evaluate(
                net, cfg, val_split, num_classes, counts, rank, world, device, autocast, loader=val_loader
            )
            row.update({k: report[k] for k in ("top1", "many", "medium", "few")})
            per_class = report["per_class"]
            if report["top1"] > best:  # selection on the validation split; its weights kept for the test
                best, best_epoch = report["top1"], epoch + 1
                if main:
                    checkpoint.save({"model": model.state_dict()}, out / BEST, keep_previous=False)
        logs.epoch(row, per_class, (epoch + 1) * steps)
        if main:
            acc = (
                (
                    f" | top-1 {report['top1']:.2f} (Many {report['many']:.2f}, Medium {report['medium']:.2f}, "
                    f"Few {report['few']:.2f})"
                )
                if per_class is not None
                else ""
            )
            print(
                f"epoch {epoch + 1}/{cfg['epochs']}: loss {row['loss']:.4f}, {row['images_per_s']:.0f} img/s{acc}",
                flush=True,
            )

    loader = make_loader(
        cfg,
        train_split,
        train=True,
        epoch=start_epoch,
        rank=rank,
        world=world,
        device=device,
        skip=start_step,
        state=loader_state,
    )  # one loader for the whole run (and one for evaluation): DALI's pipelines are built once
    try:
        # a run stopped during an epoch-end evaluation: the checkpoint holds that epoch's training
        # figures and metrics.csv has no row for it, so it is evaluated (and logged) now
        missed = ck is not None and start_step == 0 and ck.get("row") is not None and start_epoch not in logs.logged
        if world > 1:
            flag = [missed]
            dist.broadcast_object_list(flag, src=0)  # rank 0 read metrics.csv
            missed = flag[0]
        if missed:
            say(f"epoch {start_epoch}'s evaluation did not finish before the run stopped: running it now")
            finish_epoch(start_epoch - 1, ck["row"])
        for epoch in range(start_epoch, cfg["epochs"]):
            skip = start_step if epoch == start_epoch else 0
            torch.manual_seed(_mix_seed(cfg["seed"], epoch, rank))
            if epoch > start_epoch:
                loader.set_epoch(epoch)
            net.train()
            carried = partial if epoch == start_epoch else {}  # sums of the steps before a mid-epoch resume
            t0 = time.perf_counter() - carried.get("elapsed", 0.0)
            seen, n_loss = carried.get("seen", 0), carried.get("n_loss", 0)
            loss_sum = torch.tensor(carried.get("loss_sum", 0.0), device=device)
            bar = _progress(main and cfg["progress"], steps - skip, f"epoch {epoch + 1}/{cfg['epochs']}")
            step = skip
            for views, labels in loader:
                if step >= steps:
                    break
                lr = lr_at(cfg, epoch, step, steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                loss = objective(net, views, labels.to(device), autocast)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step += 1
                loss_sum += loss.detach()
                n_loss += 1
                seen += labels.shape[0] * world
                if bar is not None:
                    bar.update(1)
                if step % 10 == 0 or step == steps:
                    rate, value = seen / (time.perf_counter() - t0), loss.item()
                    if not math.isfinite(value):
                        diverged(epoch, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                    logs.scalar("train/loss", value, epoch * steps + step)
                    logs.scalar("train/images_per_s", rate, epoch * steps + step)
                if stop.requested(step):
                    if bar is not None:
                        bar.close()
                    sums = {"loss_sum": float(loss_sum), "n_loss": n_loss, "seen": seen}
                    save(epoch, step, {**sums, "elapsed": time.perf_counter() - t0})
                    if main:
                        print(
                            f"SIGTERM: checkpoint saved at epoch {epoch}, step {step} in {out / CHECKPOINT}; "
                            f"continue with --resume auto"
                        )
                    raise SystemExit(143)
            if bar is not None:
                bar.close()
            elapsed = time.perf_counter() - t0
            row = {
                "epoch": epoch + 1,
                "lr": lr_at(cfg, epoch, max(step - 1, 0), steps),
                "loss": float(loss_sum) / max(n_loss, 1),
                "images_per_s": seen / elapsed,
                "epoch_s": elapsed,
            }
            save(epoch + 1, 0, row=row)  # before the evaluation: a crash there loses no training
            finish_epoch(epoch, row)
            done = epoch + 1
            if cfg["stop_at_epoch"] and epoch + 1 == cfg["stop_at_epoch"] and epoch + 1 < cfg["epochs"]:
                if main:
                    print(f"stop_at_epoch={epoch + 1}: stopping; continue with --resume auto")
                break
    finally:
        stop.restore()
        logs.close()
    if main and cfg["plot"]:
        plot_curves(out)
    if report:
        report["best_top1"], report["best_epoch"] = best, best_epoch
        if test_split is not None and done == cfg["epochs"]:  # the selected weights on the test split, once
            barrier()
            model.load_state_dict(checkpoint.load(out / BEST, map_location=device, log=say)[0]["model"])
            test = evaluate(net, cfg, test_split, num_classes, counts, rank, world, device, autocast)
            report["test"] = {k: test[k] for k in ("top1", "many", "medium", "few")}
            if main:
                result = {"best_epoch": best_epoch, "val_top1": best, "test": report["test"]}
                (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


def _progress(active: bool, total: int, desc: str):
    if not active:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="step")
