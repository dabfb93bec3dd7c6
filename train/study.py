"""The MNIST-LT study: every loss, V = 2 / 4 / 8 views, several seeds, selection on the validation split.

    python -m train.study [--epochs 8] [--seeds 0,1,2] [--views 2,4,8] [--jobs 3]
    python -m train.study --report-only        # table and plot from what study.csv holds

1. Search: for every loss the same number of candidate settings (SEARCH), trained at V = 2 with
   seed 0; the candidate with the best validation top-1 (of its selected epoch) wins.
2. Grid: the winner of every loss at each V and seed (the search run of the winner is reused).
3. For every loss, the V with the best mean validation top-1 is written as the config
   train/configs/mnist_lt_<loss>.yaml (ACL's is the default config that `make demo` runs).

Every run selects its epoch on the balanced validation split and reports the test split at that
epoch. Each finished run is appended to train/results/study.csv at once (a restarted study skips
the runs already there); study.md (mean +- std per loss and V) and study.png (test top-1 and Few
against V, error bars = std over seeds) are rewritten after every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

from . import config as config_mod

RESULTS = Path(__file__).resolve().parent / "results"
BASE_CONFIG = "mnist_lt"  # train/configs/mnist_lt.yaml: data, model and schedule every study run starts from
LOSSES = ("ce", "la", "supcon", "paco", "gpaco", "acl")

# the settings every study run shares, on top of the shipped MNIST-LT config
BASE = {
    "epochs": 8,
    "batch_size": 32,
    "lr": 0.1,
    "warmup_epochs": 1,
    "queue_size": 0,
    # the study's runs last 216 steps: with the ImageNet momentum 0.999 PaCo's key encoder would stay
    # 81% its random initialisation, so the keys follow the model faster
    "moco_momentum": 0.9,
    "data_loader": "dali",
    "workers": 1,
    "threads": 1,
    "progress": False,
    "tensorboard": False,
    "plot": False,
}
HEAD = {"paco": "mlp_bn"}  # the official PaCo head; the others keep GPaCo's mlp3

# the candidates of the search, the same number (3) for every loss. Every loss tries a halved
# learning rate; the centre-based losses try the official alpha / temperature at two learning rates,
# and a smaller alpha.
_CENTRE = [
    {"alpha": 0.05, "temperature": 0.2, "lr": 0.05},
    {"alpha": 0.05, "temperature": 0.2, "lr": 0.1},
    {"alpha": 0.01, "temperature": 0.2, "lr": 0.1},
]
SEARCH: dict[str, list[dict]] = {
    "ce": [{"lr": 0.05}, {"lr": 0.1}, {"lr": 0.2}],
    "la": [{"la_tau": 1.0, "lr": 0.05}, {"la_tau": 1.0, "lr": 0.1}, {"la_tau": 1.5, "lr": 0.1}],
    "supcon": [{"temperature": 0.2, "lr": 0.05}, {"temperature": 0.2, "lr": 0.1}, {"temperature": 0.5, "lr": 0.1}],
    "paco": _CENTRE,
    "gpaco": _CENTRE,
    "acl": _CENTRE,
}
METRICS = ("top1", "many", "medium", "few")
FIELDS = (
    "phase",
    "loss",
    "n_views",
    "seed",
    "settings",
    "epochs",
    "best_epoch",
    *(f"val_{m}" for m in METRICS),
    *(f"test_{m}" for m in METRICS),
    "seconds",
)


def run_config(loss: str, settings: dict, n_views: int, seed: int, epochs: int, out: Path, cache: str) -> dict:
    """The resolved training config of one study run."""
    args = ["--config", BASE_CONFIG, "--cache-dir", cache, "--output", str(out)]
    options = {**BASE, "loss": loss, "head": HEAD.get(loss, "mlp3"), **settings}
    options.update(n_views=n_views, seed=seed, epochs=epochs, name=f"{loss}_v{n_views}_s{seed}_{_tag(settings)}")
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
    report = train(cfg)
    rundir = config_mod.run_dir(cfg)
    with open(rundir / "metrics.csv", newline="") as f:
        val = next(r for r in csv.DictReader(f) if int(r["epoch"]) == report["best_epoch"])
    row = {
        "phase": job["phase"],
        "loss": cfg["loss"],
        "n_views": cfg["n_views"],
        "seed": cfg["seed"],
        "settings": json.dumps(job["run"]["settings"], sort_keys=True),
        "epochs": cfg["epochs"],
        "best_epoch": report["best_epoch"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    row.update({f"val_{m}": round(float(val[m]), 2) for m in METRICS})
    row.update({f"test_{m}": round(report["test"][m], 2) for m in METRICS})
    return row


def _key(row: dict) -> tuple:
    return (row["phase"], row["loss"], int(row["n_views"]), int(row["seed"]), row["settings"], int(row["epochs"]))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def run_jobs(jobs: list[dict], rows: list[dict], csv_path: Path, n_jobs: int) -> None:
    """Run the jobs not yet in study.csv, appending each row (and rewriting the report) as it finishes."""
    done = {_key(r) for r in rows}
    todo = []
    for job in jobs:
        r = job["run"]
        key = (job["phase"], r["loss"], r["n_views"], r["seed"], json.dumps(r["settings"], sort_keys=True), r["epochs"])
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
            append_row(csv_path, row)
            rows.append(row)
            print(
                f"{row['phase']} {row['loss']} V={row['n_views']} seed {row['seed']} {row['settings']}: "
                f"val {row['val_top1']} | test {row['test_top1']} (Few {row['test_few']}) in {row['seconds']} s",
                flush=True,
            )
            write_report(rows, csv_path.parent)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def chosen_settings(rows: list[dict], loss: str, epochs: int, phases=("search",), n_needed: int = 0) -> dict | None:
    """The candidate of `loss` run in `phases` with the best validation top-1 (None until n_needed ran)."""
    cands = [r for r in rows if r["loss"] == loss and r["phase"] in phases and int(r["epochs"]) == epochs]
    if not cands or len(cands) < n_needed:
        return None
    best = max(cands, key=lambda r: float(r["val_top1"]))
    return json.loads(best["settings"])


def _stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def grid_phases(rows: list[dict]) -> list[str]:
    """ "grid" (the equal-budget study) first, then the grids of extra searches (--extra NAME)."""
    names = {r["phase"] for r in rows if not r["phase"].endswith("search")}
    return sorted(names, key=lambda n: (n != "grid", n))


def grid_cells(rows: list[dict], phase: str = "grid") -> dict[tuple[str, int], list[dict]]:
    """(loss, V) -> the runs of that cell of a grid phase (the chosen settings at every seed)."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["phase"] == phase:
            cells.setdefault((r["loss"], int(r["n_views"])), []).append(r)
    return cells


def best_cell(rows: list[dict], loss: str) -> tuple[int, list[dict]] | None:
    """Over every grid phase, the (V, runs) of `loss` with the best mean validation top-1."""
    options = [c for c in (chosen_cell(grid_cells(rows, ph), loss) for ph in grid_phases(rows)) if c]
    if not options:
        return None
    return max(options, key=lambda o: _stats([float(r["val_top1"]) for r in o[1]])[0])


def chosen_cell(cells: dict, loss: str) -> tuple[int, list[dict]] | None:
    """(V, runs) of `loss` with the best mean validation top-1 over its seeds (None without grid runs)."""
    options = [(v, rs) for (lo, v), rs in cells.items() if lo == loss]
    if not options:
        return None
    return max(options, key=lambda o: _stats([float(r["val_top1"]) for r in o[1]])[0])


def _cell_columns(rs: list[dict]) -> str:
    cols = []
    for m in ("val_top1", *(f"test_{x}" for x in METRICS)):
        mean, sd = _stats([float(r[m]) for r in rs])
        cols.append(f"{mean:.1f} ± {sd:.1f}" if not math.isnan(sd) else f"{mean:.1f}")
    return " | ".join(cols)


def write_report(rows: list[dict], out: Path) -> None:
    """study.md (mean +- std over seeds of the test numbers at the val-selected epoch) and study.png."""
    cells = grid_cells(rows)
    lines = [
        "# MNIST-LT study: test top-1 at the validation-selected epoch (mean ± std over seeds)",
        "",
        "Written by `python -m train.study` from `study.csv`; every run selects its epoch on the balanced",
        "validation split (50 digits per class) and is scored once on the test split (100 per class).",
        "",
        "| loss | V | seeds | settings | val top-1 | All | Many | Medium | Few |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        for v in sorted({k[1] for k in cells if k[0] == loss}):
            rs = cells[(loss, v)]
            seeds = ",".join(sorted({r["seed"] for r in rs}))
            lines.append(f"| {loss} | {v} | {seeds} | `{rs[0]['settings']}` | {_cell_columns(rs)} |")
    lines += [
        "",
        "## Each loss at its validated number of views (the configs `train/configs/mnist_lt_<loss>.yaml`)",
        "",
        "| loss | V | seeds | grid, settings | val top-1 | All | Many | Medium | Few |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        chosen = best_cell(rows, loss)
        if chosen:
            v, rs = chosen
            seeds = ",".join(sorted(r["seed"] for r in rs))
            lines.append(f"| {loss} | {v} | {seeds} | {rs[0]['phase']} `{rs[0]['settings']}` | {_cell_columns(rs)} |")
    for phase in grid_phases(rows)[1:]:
        lines += ["", f"## Extra search `{phase}` (not equal-budget): its grid", "", *lines[5:7]]
        extra = grid_cells(rows, phase)
        for (loss, v), rs in sorted(extra.items()):
            seeds = ",".join(sorted({r["seed"] for r in rs}))
            lines.append(f"| {loss} | {v} | {seeds} | `{rs[0]['settings']}` | {_cell_columns(rs)} |")
    search = [r for r in rows if r["phase"].endswith("search")]
    if search:
        lines += ["", "## Searches (V = 2, seed 0): validation top-1 of every candidate", ""]
        lines += ["| phase | loss | settings | val top-1 | val Few |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['phase']} | {r['loss']} | `{r['settings']}` | {r['val_top1']} | {r['val_few']} |" for r in search
        ]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "study.png")


def plot(rows: list[dict], path: Path) -> None:
    """Test top-1 (All, Few) against V, one line per loss; extra searches' grids dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, title in ((axes[0], "test_top1", "All"), (axes[1], "test_few", "Few")):
        for phase in grid_phases(rows):
            cells = grid_cells(rows, phase)
            for loss in LOSSES:
                vs = sorted(v for (lo, v) in cells if lo == loss)
                if not vs:
                    continue
                stats = [_stats([float(r[metric]) for r in cells[(loss, v)]]) for v in vs]
                ax.errorbar(
                    vs,
                    [s[0] for s in stats],
                    yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
                    marker="o",
                    capsize=3,
                    linestyle="-" if phase == "grid" else "--",
                    label=loss if phase == "grid" else f"{loss} ({phase}: {cells[(loss, vs[0])][0]['settings']})",
                )
        ax.set(xlabel="views V", ylabel=f"test top-1, {title} (%)", title=f"MNIST-LT, {title}", xticks=[2, 4, 8])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_configs(rows: list[dict], folder: Path) -> None:
    """For every loss with a full column of grid runs, the V with the best mean validation top-1 as a config."""
    folder.mkdir(parents=True, exist_ok=True)
    for loss in LOSSES:
        chosen = best_cell(rows, loss)
        if chosen is None:
            continue
        v, rs = chosen
        settings = json.loads(rs[0]["settings"])
        data = config_mod.load_yaml(config_mod.find_config(BASE_CONFIG))
        data.update({k: x for k, x in BASE.items() if k not in ("progress", "tensorboard", "plot", "threads")})
        data.update(loss=loss, head=HEAD.get(loss, "mlp3"), n_views=v, epochs=int(rs[0]["epochs"]), **settings)
        val = _stats([float(r["val_top1"]) for r in rs])[0]
        header = (
            f"# MNIST-LT, {loss}: the setting chosen by `python -m train.study` on the validation split\n"
            f"# (search at V = 2, grid `{rs[0]['phase']}`; then V = {v} had the best mean validation top-1, "
            f"{val:.1f}, over seeds {','.join(sorted(r['seed'] for r in rs))}). Results: train/results/study.md.\n"
        )
        (folder / f"mnist_lt_{loss}.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=BASE["epochs"], help="epochs of every run")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the grid")
    p.add_argument("--views", default="2,4,8", help="numbers of views of the grid")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"losses, a subset of {','.join(LOSSES)}")
    p.add_argument("--jobs", type=int, default=3, help="runs trained at once (one thread each)")
    p.add_argument("--results", default=str(RESULTS), help="folder of study.csv / study.md / study.png")
    p.add_argument("--runs", default="runs/study", help="folder of the runs' checkpoints and logs")
    p.add_argument("--configs", default=str(config_mod.CONFIG_DIR), help="folder of the chosen mnist_lt_<loss>.yaml")
    p.add_argument("--cache-dir", default=config_mod.DEFAULTS["cache_dir"], help="MNIST-LT cache")
    p.add_argument(
        "--extra",
        default="",
        help="name of an extra search beyond the equal-budget one (with --candidates): its runs are the phases "
        "NAME-search and NAME, reported apart; the best of all candidates of a loss goes on to the grid",
    )
    p.add_argument("--candidates", default="", help="JSON file {loss: [settings, ...]} of the extra search")
    p.add_argument("--report-only", action="store_true", help="only rewrite study.md / study.png and the configs")
    args = p.parse_args(argv)
    losses = [x for x in args.losses.split(",") if x]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        p.error(f"--losses: unknown {unknown}; expected a subset of {LOSSES}")
    seeds = [int(s) for s in args.seeds.split(",")]
    views = [int(v) for v in args.views.split(",")]
    if min(views) < 2:
        p.error("--views: every number of views must be >= 2 (PaCo, GPaCo and SupCon need two)")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "study.csv"
    rows = read_rows(csv_path)
    if not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")

        def job(phase, loss, settings, n_views, seed):
            run = dict(
                loss=loss,
                settings=settings,
                n_views=n_views,
                seed=seed,
                epochs=args.epochs,
                out=Path(args.runs),
                cache=args.cache_dir,
            )
            return {"phase": phase, "run": run}

        if bool(args.extra) != bool(args.candidates):
            p.error("--extra and --candidates go together")
        search_phase, grid_phase = (f"{args.extra}-search", args.extra) if args.extra else ("search", "grid")
        candidates = json.loads(Path(args.candidates).read_text()) if args.candidates else SEARCH
        pool = ("search", search_phase)  # an extra search competes with the equal-budget candidates

        def chosen(loss):
            return chosen_settings(rows, loss, args.epochs, pool, len(candidates.get(loss, [])))

        run_jobs(
            [job(search_phase, lo, s, 2, seeds[0]) for lo in losses for s in candidates.get(lo, [])],
            rows,
            csv_path,
            args.jobs,
        )
        for r in rows:  # the winning search run is the grid's (V = 2, first seed) run
            if r["phase"] in pool and r["loss"] in losses and chosen(r["loss"]) == json.loads(r["settings"]):
                if not any(_key(g) == _key({**r, "phase": grid_phase}) for g in rows):
                    grid_row = {**r, "phase": grid_phase}
                    append_row(csv_path, grid_row)
                    rows.append(grid_row)
        grid = [
            job(grid_phase, lo, chosen(lo), v, s)
            for s in seeds
            for v in views
            for lo in losses
            if chosen(lo) is not None
        ]
        run_jobs(grid, rows, csv_path, args.jobs)
        rows = read_rows(csv_path)
    write_report(rows, results)
    save_configs(rows, Path(args.configs))
    print(f"wrote {results / 'study.md'}, {results / 'study.png'} and the chosen configs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
