"""The MNIST-LT study: does ACL help? Every loss with an equal search budget, trained to convergence.

    python -m train.study [--jobs 2]          # resumes: runs already in study.csv are not re-run
    python -m train.study --report-only       # tables, plots and configs from what study.csv holds

The plan (every run: the regime `REGIME`, which trains until the validation curves plateau):
1. search   every loss tries the same number of candidates (the product of its declared axes in
            `SPACES`, 8 each) at V = 2, seed 0; the best validation top-1 wins.
2. grid     the winner of every loss at V = 2, 4, 8 and seeds 1..5 (paired: a seed fixes the data
            order, the augmentation draws and the initialisation for every loss). Each loss's V is the
            one with the best mean validation top-1.
3. ablation the chosen ACL with one part changed at a time (`ABLATION`), seeds 1..5, at V = 2; the
            shared-denominator variant also at V = 4 and 8 (the multi-view claim).

The test split is read once per run, at the epoch its validation top-1 selected; nothing is tuned on
it. Every finished run is appended to train/results/study.csv at once; the report (study.md and
the plots, `train/study_report.py`) is rewritten after every run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from . import config as config_mod
from . import study_report as report

RESULTS = Path(__file__).resolve().parent / "results"
BASE_CONFIG = "mnist_lt"  # train/configs/mnist_lt.yaml: data and model every study run starts from
LOSSES = ("ce", "la", "supcon", "paco", "gpaco", "acl")
SEEDS = (1, 2, 3, 4, 5)  # the grid's and the ablation's; the search uses seed 0
VIEWS = (2, 4, 8)

# The regime: 40 epochs of 27 steps (1080 SGD steps), cosine after 2 warm-up epochs. Probe runs of
# ACL and LA at V = 2 gained < 1 point of validation top-1 over their last 30 % of epochs.
REGIME = {
    "epochs": 40,
    "batch_size": 32,
    "warmup_epochs": 2,
    "queue_size": 0,
    # 1080 steps: with the ImageNet momentum 0.999 PaCo's key encoder would still be a third its
    # random initialisation at the end; 0.99 follows the model within about 100 steps
    "moco_momentum": 0.99,
    "data_loader": "dali",
    "workers": 1,
    "threads": 1,
    "resume": "auto",  # a study killed mid-run continues that run from its last checkpoint
    "progress": False,
    "tensorboard": False,
    "plot": False,
}
HEAD = {"paco": "mlp_bn"}  # the official PaCo head; the others keep GPaCo's mlp3

# The search space of every loss: three axes, 8 candidates each. Learning rate is an axis of every
# loss; the other axes are each loss's own main knobs. (A first space with lr 0.05 / 0.1 was
# replaced after CE's first candidates: its best was at the top of the range, lr 0.2.)
LR = [0.1, 0.2]
SPACES: dict[str, dict[str, list]] = {
    "ce": {"lr": [0.05, 0.1, 0.2, 0.4], "weight_decay": [1e-4, 5e-4]},
    "la": {"lr": LR, "la_tau": [0.5, 1.0, 1.5, 2.0]},
    "supcon": {"lr": LR, "temperature": [0.1, 0.2], "supcon_weight": [0.5, 1.0]},
    "paco": {"lr": LR, "alpha": [0.01, 0.05], "temperature": [0.1, 0.2]},
    "gpaco": {"lr": LR, "alpha": [0.01, 0.05], "temperature": [0.1, 0.2]},
    "acl": {"lr": LR, "alpha": [0.01, 0.05], "gamma": [0.0, 1.0]},
}

# The ablation: each variant changes one part of the chosen ACL (V comes from the grid).
ABLATION: dict[str, dict] = {
    "shared denominator (softmax mode)": {"acl_mode": "softmax"},
    "gamma 0": {"gamma": 0.0},
    "gamma 0.1": {"gamma": 0.1},
    "gamma 1": {"gamma": 1.0},
    "negatives unweighted": {"negative_weight": "none"},
    "negatives by batch count": {"negative_weight": "batch"},
    "negatives by prior": {"negative_weight": "prior"},
    "no class centres (+ LA-CE head)": {"acl_centres": False},
}
# also trained at every V: the shared denominator (the multi-view claim is about it) and gamma 0.1
# (added when it led the V = 2 ablation on validation: how the leading ACL behaves with more views)
MULTI_VIEW_VARIANTS = ("shared denominator (softmax mode)", "gamma 0.1")


def candidates(loss: str) -> list[dict]:
    """The search candidates of `loss`: every combination of its axes, in a fixed order."""
    axes = SPACES[loss]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def run_config(loss: str, settings: dict, n_views: int, seed: int, epochs: int, out: Path, cache: str) -> dict:
    """The resolved training config of one study run."""
    args = ["--config", BASE_CONFIG, "--cache-dir", cache, "--output", str(out)]
    options = {**REGIME, "loss": loss, "head": HEAD.get(loss, "mlp3"), **settings}
    name = f"{loss}_v{n_views}_s{seed}_e{epochs}_{_tag(settings)}"
    options.update(n_views=n_views, seed=seed, epochs=epochs, name=name)
    for key, value in options.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return config_mod.resolve(args)


def _tag(settings: dict) -> str:
    return "_".join(f"{k}{v:g}" if isinstance(v, float | int) else f"{k}{v}" for k, v in sorted(settings.items()))


def one_run(job: dict) -> dict:
    """Train one run (in a worker process) and return its study.csv row."""
    import torch

    from .engine import train

    torch.set_num_threads(1)
    cfg = run_config(**job["run"])
    t0 = time.perf_counter()
    result = train(cfg)
    rundir = config_mod.run_dir(cfg)
    with open(rundir / "metrics.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    if "test" not in result:  # the run had finished before (resumed after its last epoch)
        result = json.loads((rundir / "result.json").read_text())
    val = next(r for r in epochs if int(r["epoch"]) == result["best_epoch"])
    row = {
        "phase": job["phase"],
        "variant": job.get("variant", ""),
        "loss": cfg["loss"],
        "n_views": cfg["n_views"],
        "seed": cfg["seed"],
        "settings": json.dumps(job["run"]["settings"], sort_keys=True),
        "epochs": cfg["epochs"],
        "best_epoch": result["best_epoch"],
        "seconds": round(time.perf_counter() - t0, 1),
        "val_curve": " ".join(f"{float(r['top1']):g}" for r in epochs),
    }
    row.update({f"val_{m}": round(float(val[m]), 2) for m in report.METRICS})
    row.update({f"test_{m}": round(result["test"][m], 2) for m in report.METRICS})
    return row


def job_key(phase: str, loss: str, n_views: int, seed: int, epochs: int, settings: dict) -> tuple:
    return (phase, loss, int(n_views), int(seed), int(epochs), json.dumps(settings, sort_keys=True))


def row_key(row: dict) -> tuple:
    return job_key(*(row[k] for k in ("phase", "loss", "n_views", "seed", "epochs")), json.loads(row["settings"]))


def run_jobs(jobs: list[dict], rows: list[dict], csv_path: Path, n_jobs: int) -> None:
    """Run the jobs not yet in study.csv, appending each row (and rewriting the report) as it finishes."""
    done = {row_key(r) for r in rows}
    todo = []
    for job in jobs:
        key = job_key(job["phase"], **{k: job["run"][k] for k in ("loss", "n_views", "seed", "epochs", "settings")})
        if key not in done:
            todo.append(job)
            done.add(key)
    if not todo:
        return
    print(f"{len(todo)} runs to do", flush=True)
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=_spawn()) as pool:
        futures = {pool.submit(one_run, job): job for job in todo}
        for fut in as_completed(futures):
            try:
                row = {k: str(v) for k, v in fut.result().items()}  # as read back from study.csv
            except Exception as e:  # one failed run is reported, the study goes on
                print(f"run failed: {futures[fut]['run']}: {e!r}", flush=True)
                continue
            report.append_row(csv_path, row)
            rows.append(row)
            print(
                f"{row['phase']} {row['variant'] or row['loss']} V={row['n_views']} seed {row['seed']} "
                f"{row['settings']}: val {row['val_top1']} | test {row['test_top1']} (Few {row['test_few']}), "
                f"best epoch {row['best_epoch']}/{row['epochs']}, {row['seconds']} s",
                flush=True,
            )
            report.write_report(rows, csv_path.parent)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def chosen_settings(rows: list[dict], loss: str) -> dict | None:
    """The search candidate of `loss` with the best validation top-1, once all its candidates ran."""
    space = [json.dumps(c, sort_keys=True) for c in candidates(loss)]
    runs = [r for r in rows if r["phase"] == "search" and r["loss"] == loss and r["settings"] in space]
    if len({r["epochs"] for r in runs}) > 1:
        raise SystemExit(f"study.csv mixes runs of different lengths for {loss}; use one --results folder per regime")
    if len(runs) < len(candidates(loss)):
        return None
    return json.loads(max(runs, key=lambda r: float(r["val_top1"]))["settings"])


def _unchanged(settings: dict, change: dict) -> bool:
    """Whether `change` leaves the run of `settings` as it is (a key it lacks takes the base config's value)."""
    base = {**config_mod.DEFAULTS, **config_mod.load_yaml(config_mod.find_config(BASE_CONFIG)), **REGIME}
    return all(settings.get(k, base[k]) == v for k, v in change.items())


def plan(rows: list[dict], losses: list[str], args) -> list[list[dict]]:
    """The study's stages in the order they run; a stage that needs a choice not yet made is empty."""

    def job(phase, loss, settings, n_views, seed, variant=""):
        run = dict(loss=loss, settings=settings, n_views=n_views, seed=seed, epochs=args.epochs, out=Path(args.runs))
        run["cache"] = args.cache
        return {"phase": phase, "variant": variant, "run": run}

    search = [job("search", lo, s, 2, 0) for lo in losses for s in candidates(lo)]
    chosen = {lo: chosen_settings(rows, lo) for lo in losses}
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = {v: [job("grid", lo, chosen[lo], v, s) for s in seeds for lo in losses if chosen[lo]] for v in VIEWS}
    ablation = []
    if chosen.get("acl"):
        for name, change in ABLATION.items():
            settings = {**chosen["acl"], **change}
            if not _unchanged(chosen["acl"], change):  # the unchanged part is the grid's own ACL
                views = VIEWS if name in MULTI_VIEW_VARIANTS else (2,)
                ablation += [job("ablation", "acl", settings, v, s, name) for v in views for s in seeds]
    by_v = sorted(ablation, key=lambda j: j["run"]["n_views"])
    at_2 = [j for j in by_v if j["run"]["n_views"] == 2]
    return [search, grid[2], at_2, grid[4], grid[8], [j for j in by_v if j["run"]["n_views"] > 2]]


def summary(config: str, rows: list[dict]) -> str:
    """The study's numbers for a chosen config: mean ± std over the grid seeds of its (loss, V, settings)."""
    cfg = config_mod.load_yaml(config_mod.find_config(config))
    loss, v = cfg.get("loss"), cfg.get("n_views")
    settings = {k: cfg[k] for k in SPACES.get(loss, {}) if k in cfg}
    runs = [r for r in rows if r["phase"] == "grid" and (r["loss"], int(r["n_views"])) == (loss, v)]
    runs = [r for r in runs if int(r["epochs"]) == cfg.get("epochs")]
    runs = [r for r in runs if all(json.loads(r["settings"]).get(k) == x for k, x in settings.items())]
    if not runs:
        return f"the study has no grid runs of {config} ({loss}, V = {v}, {settings}) yet"
    stats = [report.mean_sd([float(r[f"test_{m}"]) for r in runs]) for m in report.METRICS]
    cols = " | ".join(f"{m} {s[0]:.1f} ± {s[1]:.1f}" for m, s in zip(("top-1", "Many", "Medium", "Few"), stats))
    return f"study, {len(runs)} seeds of {config} (mean ± std, test at the validation-selected epoch): {cols}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", default=",".join(LOSSES), help=f"losses, a subset of {','.join(LOSSES)}")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    p.add_argument("--epochs", type=int, default=REGIME["epochs"], help="epochs of every run (smaller: a smoke test)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds of the grid and the ablation")
    p.add_argument("--results", default=str(RESULTS), help="folder of study.csv, study.md and the plots")
    p.add_argument("--runs", default="runs/study", help="folder of the runs' checkpoints and logs")
    p.add_argument("--configs", default=str(config_mod.CONFIG_DIR), help="folder of the chosen mnist_lt_<loss>.yaml")
    p.add_argument("--cache", "--cache-dir", default=config_mod.DEFAULTS["cache_dir"], help="MNIST-LT cache")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report and the configs")
    p.add_argument("--summary", metavar="CONFIG", help="print the study's numbers for a chosen config and stop")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary, report.read_rows(Path(args.results) / "study.csv")))
        return 0
    losses = [x for x in args.losses.split(",") if x]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        p.error(f"--losses: unknown {unknown}; expected a subset of {LOSSES}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "study.csv"
    rows = report.read_rows(csv_path)
    if not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for stage in range(6):  # each stage's plan depends on the choices of the stages before it
            run_jobs(plan(rows, losses, args)[stage], rows, csv_path, args.jobs)
    report.write_report(rows, results)
    report.save_configs(rows, Path(args.configs))
    print(f"wrote {results / 'study.md'}, the plots and the chosen configs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
