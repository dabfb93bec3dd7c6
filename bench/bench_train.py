"""Whole training steps of a config: images/s, views/s, and what a step is made of.

    python bench/bench_train.py --config imagenet_lt_r50 --synthetic
    python bench/bench_train.py --config imagenet_lt_r50 --synthetic --nproc 2        # 1 process, then 2
    torchrun --nproc_per_node 8 bench/bench_train.py --config imagenet_lt_r50 --data-root /data/ImageNet_LT

Sweeps (every combination): --loss, --n-views, --batch-size (per rank), --data-loader, --impl (the
loss's impl). Other options (e.g. --arch small_cnn --image-size 64 --workers 1) go to the config.
--synthetic: an ImageNet-like JPEG set (bench/synthetic.py) sized for the run, in /tmp; neither it
nor --data-root: the config's own data (e.g. the embedded MNIST-LT).

Two phases per combination, on every rank:
  throughput  `--steps` plain training steps after `--warmup`: images/s per rank (no extra syncs).
  breakdown   `--breakdown-steps` steps with a device sync at each boundary (so the parts add up, a
              little slower than the plain step): data wait (blocked on the loader), model forward
              (every call of the model and the PaCo key encoder), loss forward (the rest of the
              objective), loss backward (backward until the model outputs' gradients are ready),
              model backward (the rest, including DDP's gradient all-reduce waits), optimizer.
              The same steps again under DDP's no_sync(): the model-backward difference is the DDP
              communication that backward does not hide ("exposed comm").
Under torchrun (NCCL on GPUs, gloo on CPU) rank 0 prints per-rank and total images/s; with --nproc N
it runs 1 process first and reports the scaling efficiency total(N) / (N * one process) at the same
per-rank batch. Rows go to bench/results/train.csv (device, versions, git sha); plot them with
bench/plot_train.py.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CSV = HERE / "results" / "train.csv"
PARTS = ("data", "fwd", "loss_fwd", "loss_bwd", "bwd", "optim")
FIELDS = (
    "date", "git_sha", "device", "torch", "dali", "torchvision", "backend", "world", "config", "arch", "image_size",
    "loss", "impl", "n_views", "batch_per_rank", "data_loader", "workers", "images_per_s", "views_per_s",
    "per_rank_images_per_s", "scaling_efficiency", "step_ms", *(f"{p}_ms" for p in PARTS), "comm_ms",
)  # fmt: skip


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="imagenet_lt_r50", help="shipped config name or YAML file")
    p.add_argument("--synthetic", action="store_true", help="generate an ImageNet-like JPEG set in /tmp")
    p.add_argument("--data-root", default="", help="a dataset folder for the config's split files")
    p.add_argument("--loss", nargs="+", default=[None], help="losses to sweep (default: the config's)")
    p.add_argument("--n-views", nargs="+", type=int, default=[None])
    p.add_argument(
        "--batch-size", nargs="+", type=int, default=[None], help="per-rank batch (default: the config's batch_size)"
    )
    p.add_argument("--data-loader", nargs="+", default=[None], choices=["dali", "pytorch"])
    p.add_argument("--impl", nargs="+", default=[None], help="loss_impl values (default: the config's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--breakdown-steps", type=int, default=5)
    p.add_argument("--nproc", type=int, default=0, help="run 1 process, then N under torchrun; report scaling")
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--baseline-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--result-json", default="", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    for name in ("warmup", "steps", "breakdown_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    if args.synthetic and args.data_root:
        p.error("give --synthetic or --data-root, not both")
    return args, rest


# ----------------------------------------------------------------------------------- timing


class StepClock:
    """Marks inside one training step (hooks on the model) and the sums of its parts, in seconds.
    Off (the throughput phase) its hooks do nothing, so plain steps run without device syncs."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.on = False
        self.reset()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset(self):
        self.fwd, self.grad_ready, self._start = 0.0, 0.0, 0.0

    def attach(self, module, outputs_grad: bool):
        """Time every forward of `module`; with outputs_grad, note when its outputs' gradients arrive."""

        def pre(mod, inputs):
            if self.on:
                self._start = self.now()

        def post(mod, inputs, out):
            if not self.on:
                return
            self.fwd += self.now() - self._start
            if outputs_grad:
                for t in out if isinstance(out, tuple) else (out,):
                    if t is not None and t.requires_grad:
                        t.register_hook(self._grad_arrived)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _grad_arrived(self, grad):
        self.grad_ready = self.now()
        return grad


@dataclass
class Bench:
    """What one training step of the measured configuration uses."""

    net: object  # the model, DDP-wrapped on several ranks
    objective: object
    opt: object
    autocast: object
    scaler: object
    device: object
    memory_format: object  # torch.channels_last on CUDA, else None
    clock: StepClock


def build(cfg: dict, rank: int, world: int, device):
    """The configuration's model, objective (a full queue), optimizer and training loader."""
    import torch
    from torch import nn

    from train.data import make_loader
    from train.datasets import class_counts, prepare
    from train.models import Model
    from train.objective import PROJECTING, Objective
    from train.state import autocast_factory

    train_split, _, _, num_classes = prepare(cfg)
    torch.manual_seed(cfg["seed"])
    proj = cfg["proj_dim"] if cfg["loss"] in PROJECTING else 0
    model = Model(cfg["arch"], num_classes, cfg["head"], proj).to(device)
    cfg["_channels_last"] = device.type == "cuda"
    memory_format = torch.channels_last if cfg["_channels_last"] else None
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    objective = Objective(cfg, model, class_counts(train_split, num_classes), num_classes).to(device)
    k = objective.queue.shape[0]
    if k:  # the steady state: a full queue of keys (training fills it in the first K / batch steps)
        objective.queue.copy_(torch.nn.functional.normalize(torch.randn_like(objective.queue), dim=1))
        objective.queue_labels.copy_(torch.randint(num_classes, (k,), device=device))
        objective.queue_ptr[1] = k
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    clock = StepClock(device)
    clock.attach(net, outputs_grad=True)
    if objective.key_encoder is not None:
        clock.attach(objective.key_encoder, outputs_grad=False)
    bench = Bench(net, objective, opt, *autocast_factory(cfg, device), device, memory_format, clock)
    return bench, make_loader(cfg, train_split, train=True, epoch=0, rank=rank, world=world, device=device)


def train_step(b: Bench, views, labels) -> dict:
    """One training step; with the clock on, a device sync at each boundary and the step's parts (s)."""
    clock = b.clock
    mark = clock.now if clock.on else (lambda: 0.0)
    clock.reset()
    t0 = mark()
    if b.memory_format is not None:
        views = [v.contiguous(memory_format=b.memory_format) for v in views]
    loss = b.objective(b.net, views, labels.to(b.device), b.autocast)
    t1 = mark()
    b.opt.zero_grad(set_to_none=True)
    (b.scaler.scale(loss) if b.scaler else loss).backward()
    t2 = mark()
    if b.scaler:
        b.scaler.step(b.opt)
        b.scaler.update()
    else:
        b.opt.step()
    t3 = mark()
    ready = clock.grad_ready or t1
    fwd = clock.fwd
    return {"fwd": fwd, "loss_fwd": t1 - t0 - fwd, "loss_bwd": ready - t1, "bwd": t2 - ready, "optim": t3 - t2}


def _median_parts(b: Bench, batches, steps: int) -> dict:
    """The median of each part over `steps` timed steps (data: seconds blocked on the loader)."""
    rows = []
    for _ in range(steps):
        (views, labels), wait = next(batches)
        rows.append({"data": wait, **train_step(b, views, labels)})
    return {k: statistics.median(r[k] for r in rows) for k in PARTS}


def measure(cfg: dict, args, rank: int, world: int, device) -> dict:
    """Throughput and step breakdown of one configuration on this rank."""
    b, loader = build(cfg, rank, world, device)
    batches = _endless(loader)
    for _ in range(args.warmup):
        train_step(b, *next(batches)[0])
    b.clock.sync()
    _barrier(world)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(b, *next(batches)[0])
    b.clock.sync()
    elapsed = time.perf_counter() - t0
    b.clock.on = True
    parts = _median_parts(b, batches, args.breakdown_steps)
    comm = 0.0
    if world > 1:  # the same steps without DDP's all-reduce: what backward does not hide
        with b.net.no_sync():
            quiet = _median_parts(b, batches, args.breakdown_steps)
        comm = max(0.0, parts["bwd"] - quiet["bwd"])
    n = cfg["batch_size"] // world
    return {"images_per_s": n * args.steps / elapsed, "parts": parts, "comm": comm}


def _endless(loader):
    """(batch, seconds blocked waiting for it), over as many epochs as it takes."""
    epoch = 0
    while True:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            yield batch, time.perf_counter() - t
        epoch += 1
        loader.set_epoch(epoch)


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------- runs


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__, "dali": "", "torchvision": ""}
    for key, mod in (("dali", "nvidia.dali"), ("torchvision", "torchvision")):
        try:
            out[key] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return out


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _git_sha() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    return (res.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def _synthetic_root(args, world: int) -> Path:
    sys.path.insert(0, str(HERE))
    from synthetic import make_set

    biggest = max(b or 128 for b in args.batch_size)
    images = max(256, biggest * world * (args.warmup + args.steps + 2 * args.breakdown_steps) // 2)
    return make_set(Path(tempfile.gettempdir()) / f"acl_synthetic_{images}", images, 100)


def run(args, rest) -> list[dict]:
    """Every combination on this rank; rank 0 returns the rows (others an empty list)."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from train import config
    from train.run import close_distributed, setup_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ["--config", args.config, "--progress", "false", "--tensorboard", "false", "--plot", "false"]
    if args.data_root:
        base += ["--data-root", args.data_root]
    cfg0 = config.resolve(base + rest)
    rank, world, device = setup_distributed(cfg0)
    if args.synthetic:
        root = None
        if rank == 0:
            root = str(_synthetic_root(args, world))
        if world > 1:
            box = [root]
            dist.broadcast_object_list(box, 0)
            root = box[0]
        base += ["--dataset", "split", "--data-root", root, "--train-split", "train.txt", "--val-split", "val.txt"]
        base += ["--test-split", "val.txt"]  # the config's own test split is not in the synthetic set
        base += ["--num-classes", "100"]
    if cfg0["threads"]:
        torch.set_num_threads(cfg0["threads"])
    baseline = json.loads(Path(args.baseline_json).read_text()) if args.baseline_json else {}
    rows = []
    for loss, views, batch, loader, impl in itertools.product(
        args.loss, args.n_views, args.batch_size, args.data_loader, args.impl
    ):
        sweep = []
        for flag, value in (("--loss", loss), ("--n-views", views), ("--data-loader", loader), ("--loss-impl", impl)):
            if value is not None:
                sweep += [flag, str(value)]
        cfg = config.resolve(base + rest + sweep)
        cfg["batch_size"] = (batch or cfg["batch_size"]) * world  # the same per-rank batch at any world size
        result = measure(cfg, args, rank, world, device)
        every = [result] * world
        if world > 1:
            dist.all_gather_object(every, result)
        if rank:
            continue
        rows.append(_report(cfg, every, world, device, baseline))
    if rank == 0 and args.result_json:
        Path(args.result_json).write_text(json.dumps(baseline))
    close_distributed()
    return rows


def _report(cfg: dict, every: list[dict], world: int, device, baseline: dict) -> dict:
    """The CSV row of one configuration from every rank's result, printed; a 1-process run records its
    throughput in `baseline`, a multi-process run reports its scaling efficiency against it."""
    import torch.distributed as dist

    per_rank = [r["images_per_s"] for r in every]
    total = sum(per_rank)
    key = f"{cfg['loss']}|{cfg['loss_impl']}|{cfg['n_views']}|{cfg['batch_size'] // world}|{cfg['data_loader']}"
    if world == 1:
        baseline[key] = total
    eff = total / (world * baseline[key]) if key in baseline else ""
    parts = {k: statistics.mean(r["parts"][k] for r in every) for k in PARTS}
    comm = statistics.mean(r["comm"] for r in every)
    row = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "git_sha": _git_sha(),
        "device": _device_name(device),
        **_versions(),
        "backend": dist.get_backend() if dist.is_initialized() else "none",
        "world": world,
        "config": Path(cfg["config"]).stem,
        "arch": cfg["arch"],
        "image_size": cfg["image_size"],
        "loss": cfg["loss"],
        "impl": cfg["loss_impl"],
        "n_views": cfg["n_views"],
        "batch_per_rank": cfg["batch_size"] // world,
        "data_loader": cfg["data_loader"],
        "workers": cfg["workers"],
        "images_per_s": f"{total:.2f}",
        "views_per_s": f"{total * cfg['n_views']:.2f}",
        "per_rank_images_per_s": ";".join(f"{r:.2f}" for r in per_rank),
        "scaling_efficiency": f"{eff:.3f}" if eff != "" else "",
        "step_ms": f"{1e3 * sum(parts.values()):.1f}",
        **{f"{k}_ms": f"{1e3 * v:.1f}" for k, v in parts.items()},
        "comm_ms": f"{1e3 * comm:.1f}",
    }
    print(
        f"{row['loss']}/{row['impl']} V={row['n_views']} batch {row['batch_per_rank']}/rank {row['data_loader']} "
        f"x{world}: {total:.1f} img/s ({row['views_per_s']} views/s; per rank {row['per_rank_images_per_s']})"
        + (f", scaling efficiency {eff:.2f}" if eff != "" else "")
        + "\n  step (ms): "
        + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in parts.items())
        + f", exposed comm {1e3 * comm:.1f}",
        flush=True,
    )
    return row


def append_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} row(s) appended to {path}")


def launch(args, argv: list[str]) -> int:
    """--nproc N: this script in 1 process, then under torchrun with N; the second reports scaling."""
    strip = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.json"
        cmd = [sys.executable, __file__, *strip, "--result-json", str(one)]
        if subprocess.run(cmd).returncode:
            return 1
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        return subprocess.run([*torchrun, __file__, *strip, "--baseline-json", str(one)]).returncode


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # DALI's renamed operators
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse(argv)
    if args.nproc:
        return launch(args, argv)
    append_rows(args.csv, run(args, rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
