"""Images/s and CPU-ms per image of the training loaders, side by side for several copies of the code.

    python bench/bench_loader.py --code . /tmp/base --loaders dali pytorch --n-views 2 4
    python bench/bench_loader.py --loaders dali --n-views 1 --views center     # other options: the config's

Each (code, loader, V) runs in its own process (so two copies of the `train` package never meet),
on the synthetic ImageNet-like JPEG set (bench/synthetic.py) or --data-root, with the augmentation
of --config (default: the ImageNet-LT recipe). Measured per run: loader construction time, images/s
after the first batch, and CPU time (this process, its threads and its reaped DataLoader workers)
per image. By default a run reads one whole epoch, so no prefetched batch is paid for and not
counted. Runs alternate between the copies, --repeats times; the median goes to the table and every
run to bench/results/loader.csv.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "loader.csv"
FIELDS = (
    "date", "device", "loader_device", "torch", "code", "code_sha", "loader", "n_views", "batch", "workers",
    "config", "repeat", "build_s", "images_per_s", "cpu_ms_per_image",
)  # fmt: skip


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_one(args, rest: list[str]) -> dict:
    """One loader of the `train` package found first on sys.path (the --code copy)."""
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    from train import config, datasets
    from train.data import make_loader

    torch.set_num_threads(1)
    import torchvision.transforms.v2  # noqa: F401  (imports are not part of the construction time)

    if args.loader == "dali":
        import nvidia.dali.plugin.pytorch  # noqa: F401
    root = Path(args.data_root)
    cfg = config.resolve(
        [
            *("--config", args.config, "--dataset", "split", "--data-root", str(root)),
            *("--train-split", "train.txt", "--val-split", "val.txt", "--num-classes", str(args.classes)),
            *("--data-loader", args.loader, "--n-views", str(args.v), "--batch-size", str(args.batch_size)),
            *("--workers", str(args.workers)),
            *rest,
        ]
    )
    split = datasets.read_split(root / "train.txt", root)
    t0, c0 = time.perf_counter(), _cpu_s()
    loader = make_loader(cfg, split, train=True, epoch=0, rank=0, world=1, device=torch.device(args.device))
    build_s = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), _cpu_s()
    n = n_after_first = 0
    t_first = None
    for i, (_views, labels) in enumerate(loader):
        n += labels.shape[0]
        if i == 0:
            t_first = time.perf_counter()
        else:
            n_after_first += labels.shape[0]
        if i + 1 == args.batches:  # 0: the whole epoch, so nothing is prefetched beyond what is counted
            break
    if args.device == "cuda":
        torch.cuda.synchronize()
    del loader  # DataLoader workers exit and are reaped: their CPU time counts
    t2 = time.perf_counter()
    cpu = _cpu_s() - c1
    return {
        "build_s": build_s,
        "images_per_s": n_after_first / (t2 - t_first),
        "cpu_ms_per_image": 1e3 * cpu / n,
        "first_batch_s": t_first - t1,
        "images": n,
        "cpu_s_build": _cpu_s() - c0 - cpu,
    }


def _device(kind: str) -> str:
    import torch

    if kind == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _git_sha(path: Path) -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", nargs="+", default=["."], help="repository copies whose train/ to measure")
    p.add_argument("--labels", nargs="+", default=None, help="a name per --code copy (default: the paths)")
    p.add_argument("--loaders", nargs="+", default=["dali", "pytorch"], choices=["dali", "pytorch"])
    p.add_argument("--n-views", nargs="+", type=int, default=[2, 4])
    p.add_argument("--config", default="imagenet_lt_r50")
    p.add_argument("--data-root", default="", help="a folder with train.txt; default: a synthetic set")
    p.add_argument("--images", type=int, default=384, help="size of the synthetic set")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=0, help="batches per run, 0: one epoch (the first is not timed)")
    p.add_argument("--workers", type=int, default=1, help="DALI threads / DataLoader workers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: DALI decodes and augments on GPU")
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code-one", dest="code_one", help=argparse.SUPPRESS)
    p.add_argument("--loader", help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = _parser()
    args, rest = p.parse_known_args()
    if args.one:
        args.code = args.code_one
        print(json.dumps(measure_one(args, rest)))
        return
    if args.labels and len(args.labels) != len(args.code):
        p.error(f"--labels: expected {len(args.code)} names (one per --code), got {len(args.labels)}")
    labels = args.labels or args.code
    if not args.data_root:
        sys.path.insert(0, str(HERE))
        from synthetic import make_set

        args.data_root = str(make_set(Path("/tmp") / f"acl_synthetic_{args.images}", args.images, args.classes))
    runs = _run_all(args, rest, labels)
    _append_csv(args, runs, labels)
    _print_medians(args, runs, labels)


def _run_all(args, rest: list[str], labels: list[str]) -> dict[tuple, list[dict]]:
    """Each (repeat, V, loader, code copy) measured in a fresh process; results per (V, loader, label)."""
    runs: dict[tuple, list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rep, v, loader, (code, label) in itertools.product(
        range(args.repeats), args.n_views, args.loaders, zip(args.code, labels)
    ):
        cmd = [sys.executable, __file__, "--one", "--code-one", code, "--loader", loader, "--v", str(v)]
        cmd += ["--config", args.config, "--data-root", args.data_root, "--classes", str(args.classes)]
        cmd += ["--batch-size", str(args.batch_size), "--batches", str(args.batches)]
        cmd += ["--workers", str(args.workers), "--device", args.device, *rest]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"{label} {loader} V={v} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        runs.setdefault((v, loader, label), []).append(r)
        print(
            f"repeat {rep}: V={v} {loader:8s} {label:20s} {r['images_per_s']:7.1f} img/s "
            f"{r['cpu_ms_per_image']:6.1f} CPU-ms/img, build {r['build_s']:.2f} s",
            flush=True,
        )
    return runs


def _append_csv(args, runs: dict[tuple, list[dict]], labels: list[str]) -> None:
    import torch

    new = not args.csv.exists()
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for (v, loader, label), rs in runs.items():
            code = Path(args.code[labels.index(label)])
            sha = _git_sha(code) if (code / ".git").exists() else label
            for i, r in enumerate(rs):
                w.writerow(
                    {
                        "date": time.strftime("%Y-%m-%d"),
                        "device": _device(args.device),
                        "loader_device": args.device,
                        "torch": torch.__version__,
                        "code": label,
                        "code_sha": sha,
                        "loader": loader,
                        "n_views": v,
                        "batch": args.batch_size,
                        "workers": args.workers,
                        "config": args.config,
                        "repeat": i,
                        "build_s": f"{r['build_s']:.3f}",
                        "images_per_s": f"{r['images_per_s']:.2f}",
                        "cpu_ms_per_image": f"{r['cpu_ms_per_image']:.2f}",
                    }
                )


def _print_medians(args, runs: dict[tuple, list[dict]], labels: list[str]) -> None:
    print(f"\nmedian of {args.repeats} (batch {args.batch_size}, {args.workers} worker(s), config {args.config})")
    print(f"{'V':>2} {'loader':8s} {'code':20s} {'img/s':>8} {'CPU-ms/img':>11} {'build s':>8} {'vs first':>9}")
    for v in args.n_views:
        for loader in args.loaders:
            base = None
            for label in labels:
                rs = runs[(v, loader, label)]
                ips = statistics.median(r["images_per_s"] for r in rs)
                base = base or ips
                print(
                    f"{v:>2} {loader:8s} {label:20s} {ips:8.1f} "
                    f"{statistics.median(r['cpu_ms_per_image'] for r in rs):11.1f} "
                    f"{statistics.median(r['build_s'] for r in rs):8.2f} {ips / base:8.2f}x"
                )


if __name__ == "__main__":
    main()
