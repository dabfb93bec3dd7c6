"""The MNIST-LT study's report: study.csv rows -> study.md (tables with 95 % confidence intervals),
the plots (accuracy against V, learning curves, ablation) and the chosen configs.

Statistics. A cell (loss, V) holds one run per seed; its mean comes with a 95 % t-interval over the
seeds. A comparison of two cells pairs their runs by seed (same data order, augmentation draws and
initialisation) and reports the mean of the per-seed differences with its 95 % t-interval.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from . import config as config_mod

METRICS = ("top1", "many", "medium", "few")
FIELDS = (
    "phase",
    "variant",
    "loss",
    "n_views",
    "seed",
    "settings",
    "epochs",
    "best_epoch",
    *(f"val_{m}" for m in METRICS),
    *(f"test_{m}" for m in METRICS),
    "seconds",
    "val_curve",
)
LOSS_NAMES = {"ce": "CE", "la": "logit-adjusted CE", "supcon": "SupCon + CE", "paco": "PaCo", "gpaco": "GPaCo"}
LOSS_NAMES["acl"] = "ACL"
CELL_HEADER = "| loss | V | seeds | settings | val top-1 | All | Many | Medium | Few |"
NOT_SAVED = ("progress", "tensorboard", "plot", "threads", "resume")  # of the regime, in a chosen config


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


# ---------------------------------------------------------------- statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan with fewer than two values)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    from scipy.stats import t

    return m, float(t.ppf(0.975, n - 1)) * mean_sd(values)[1] / math.sqrt(n)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan with one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired(a: list[dict], b: list[dict], metric: str) -> tuple[float, float, int]:
    """Mean paired difference a - b over the seeds both hold, its CI half-width, the number of pairs."""
    bs = {r["seed"]: float(r[metric]) for r in b}
    diffs = [float(r[metric]) - bs[r["seed"]] for r in a if r["seed"] in bs]
    if not diffs:
        return float("nan"), float("nan"), 0
    return (*mean_ci(diffs), len(diffs))


def fmt(m: float, h: float, signed: bool = False) -> str:
    s = f"{m:+.1f}" if signed else f"{m:.1f}"
    return s if math.isnan(h) else f"{s} ± {h:.1f}"


def fmt_interval(m: float, h: float) -> str:
    return "n/a" if math.isnan(h) else f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]"


# ---------------------------------------------------------------- cells and choices


def cells(rows: list[dict], phase: str = "grid") -> dict[tuple[str, int], list[dict]]:
    """(loss or variant, V) -> the runs of that cell (one per seed)."""
    out: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["phase"] == phase:
            out.setdefault((r["variant"] or r["loss"], int(r["n_views"])), []).append(r)
    return out


def chosen_cell(rows: list[dict], loss: str) -> tuple[int, list[dict]] | None:
    """(V, runs) of `loss` with the best mean validation top-1 over seeds (cells with every seed only)."""
    grid = cells(rows)
    n_seeds = max((len(rs) for rs in grid.values()), default=0)
    options = [(v, rs) for (lo, v), rs in grid.items() if lo == loss and len(rs) == n_seeds]
    if not options:
        return None
    return max(options, key=lambda o: mean_ci([float(r["val_top1"]) for r in o[1]])[0])


def recommended_acl(rows: list[dict]) -> tuple[str, int, list[dict]] | None:
    """(name, V, runs) of the ACL with the best mean validation top-1 among the grid's ACL at every V
    and the ablation's variants (cells with every seed only): the ACL the package recommends. It had
    more candidates than the other losses (the ablation's on top of the search), which the report
    says wherever it appears."""
    options = [("acl", v, rs) for (lo, v), rs in cells(rows).items() if lo == "acl"]
    options += [(name, v, rs) for (name, v), rs in cells(rows, "ablation").items()]
    n_seeds = max((len(rs) for _, _, rs in options), default=0)
    options = [o for o in options if len(o[2]) == n_seeds]
    if not options or chosen_cell(rows, "acl") is None:
        return None
    return max(options, key=lambda o: mean_ci([float(r["val_top1"]) for r in o[2]])[0])


def converged_fraction(rows: list[dict]) -> tuple[int, int]:
    """(runs whose best validation epoch lies in the first 80 % of their epochs, runs) of the grid and ablation."""
    final = [r for r in rows if r["phase"] in ("grid", "ablation")]
    early = sum(int(r["best_epoch"]) <= 0.8 * int(r["epochs"]) for r in final)
    return early, len(final)


def late_gain(row: dict) -> float:
    """How much the best validation top-1 exceeds the best of the first 80 % of epochs (0 if not at all)."""
    curve = [float(x) for x in row["val_curve"].split()]
    cut = max(1, int(0.8 * len(curve)))
    return max(curve) - max(curve[:cut])


# ---------------------------------------------------------------- study.md


def write_report(rows: list[dict], out: Path) -> None:
    """study.md and the three plots."""
    lines = ["# MNIST-LT study", "", *_intro(rows), *_chosen_table(rows), *_paired_table(rows)]
    lines += [*_ablation_table(rows), *_grid_table(rows), *_search_table(rows)]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    from . import study_plots

    study_plots.plot_views(rows, cells, out / "study_views.png")
    study_plots.plot_curves(rows, chosen_cell, out / "study_curves.png")
    study_plots.plot_ablation(rows, ablation_cells(rows), out / "study_ablation.png")


def _intro(rows: list[dict]) -> list[str]:
    early, total = converged_fraction(rows)
    final = [r for r in rows if r["phase"] in ("grid", "ablation")]
    gains = sorted(late_gain(r) for r in final) or [float("nan")]
    epochs = sorted({r["epochs"] for r in rows})
    counts = {p: sum(r["phase"] == p for r in rows) for p in ("search", "grid", "ablation")}
    return [
        "Written by `python -m train.study` from `study.csv`. Every run selects its epoch on the balanced",
        "validation split (50 digits per class) and is scored once on the test split (100 per class) at",
        "that epoch. ± is the half-width of a 95 % t-interval over seeds; paired differences pair runs by",
        "seed (same data order, augmentation draws and initialisation).",
        "",
        f"Runs: {len(rows)} ({', '.join(f'{p} {counts[p]}' for p in _phases(rows))}); "
        f"epochs per run: {', '.join(epochs)}.",
        f"Convergence: {early} of {total} grid and ablation runs ({100 * early / max(total, 1):.0f} %) score their "
        f"best validation top-1 in the first 80 % of their epochs; over all of them, the best of the last 20 % "
        f"exceeds the best before by a median {gains[len(gains) // 2]:.1f} and at most {gains[-1]:.1f} points.",
        "",
    ]


def _phases(rows: list[dict]) -> list[str]:
    return [p for p in ("search", "grid", "ablation") if any(r["phase"] == p for r in rows)]


def _chosen_table(rows: list[dict]) -> list[str]:
    lines = ["## Each loss at its validated setting and number of views V", ""]
    lines += [
        "| loss | V | seeds | settings | val top-1 | All | Many | Medium | Few |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in LOSS_NAMES:
        chosen = chosen_cell(rows, loss)
        if chosen:
            v, rs = chosen
            lines.append(f"| {LOSS_NAMES[loss]} | {v} | {len(rs)} | `{rs[0]['settings']}` | {_cols(rs)} |")
    return lines + [""]


def _cols(rs: list[dict]) -> str:
    return " | ".join(fmt(*mean_ci([float(r[m]) for r in rs])) for m in ("val_top1", *(f"test_{x}" for x in METRICS)))


def _paired_table(rows: list[dict]) -> list[str]:
    acl, best = chosen_cell(rows, "acl"), recommended_acl(rows)
    lines = ["## ACL minus each other loss, paired by seed (test split; mean [95 % CI])", ""]
    if not acl:
        return lines + ["(the ACL grid is not complete yet)", ""]
    lines += [
        "`ACL` is the search's winner (the same 8-candidate budget as every other loss). `recommended ACL`",
        "is the best mean validation top-1 over that winner at every V and the ablation's variants: more",
        "candidates than the other losses had, chosen on validation all the same.",
        "",
        "| comparison | V (ACL, other) | pairs | All | Few |",
        "|---|---|---|---|---|",
    ]
    contenders = [("ACL", acl[0], acl[1])]
    if best and best[0] != "acl":
        contenders.append((f"recommended ACL ({best[0]})", best[1], best[2]))
    for name, v, runs in contenders:
        for loss in ("la", "paco", "gpaco", "supcon", "ce"):
            other = chosen_cell(rows, loss)
            if other:
                a, f = (paired(runs, other[1], f"test_{m}") for m in ("top1", "few"))
                lines.append(
                    f"| {name} − {LOSS_NAMES[loss]} | {v}, {other[0]} | {a[2]} | {fmt_interval(*a[:2])} | "
                    f"{fmt_interval(*f[:2])} |"
                )
    return lines + [""]


def ablation_cells(rows: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
    """(variant, its runs, the chosen ACL's runs at the same V) for every ablation cell that has its base."""
    base = cells(rows)
    out = []
    for (variant, v), rs in sorted(cells(rows, "ablation").items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if ("acl", v) in base:
            out.append((f"{variant}, V = {v}", rs, base[("acl", v)]))
    return out


def _ablation_table(rows: list[dict]) -> list[str]:
    lines = ["## Ablation: the chosen ACL with one part changed (paired with the chosen ACL at the same V)", ""]
    lines += ["| variant | settings | All | Few | All − chosen | Few − chosen |", "|---|---|---|---|---|---|"]
    for name, rs, base in ablation_cells(rows):
        a, f = (paired(rs, base, f"test_{m}") for m in ("top1", "few"))
        lines.append(
            f"| {name} | `{rs[0]['settings']}` | {fmt(*mean_ci([float(r['test_top1']) for r in rs]))} | "
            f"{fmt(*mean_ci([float(r['test_few']) for r in rs]))} | {fmt_interval(*a[:2])} | {fmt_interval(*f[:2])} |"
        )
    return lines + [""]


def _grid_table(rows: list[dict]) -> list[str]:
    lines = ["## Every loss at every V (grid; ablation variants at several V)", ""]
    lines += [
        "| loss | V | seeds | settings | val top-1 | All | Many | Medium | Few |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("grid", "ablation"):
        for (name, v), rs in sorted(cells(rows, phase).items()):
            lines.append(f"| {LOSS_NAMES.get(name, name)} | {v} | {len(rs)} | `{rs[0]['settings']}` | {_cols(rs)} |")
    return lines + [""]


def _search_table(rows: list[dict]) -> list[str]:
    search = [r for r in rows if r["phase"] == "search"]
    lines = ["## Search (V = 2, seed 0): validation top-1 of every candidate", ""]
    lines += ["| loss | settings | val top-1 | val Few | best epoch |", "|---|---|---|---|---|"]
    for r in sorted(search, key=lambda r: (list(LOSS_NAMES).index(r["loss"]), -float(r["val_top1"]))):
        lines.append(
            f"| {LOSS_NAMES[r['loss']]} | `{r['settings']}` | {r['val_top1']} | {r['val_few']} | "
            f"{r['best_epoch']}/{r['epochs']} |"
        )
    return lines + [""]


# ---------------------------------------------------------------- README

README_BEGIN, README_END = "<!-- study table: written by python -m train.study -->", "<!-- end of study table -->"


def readme_table(rows: list[dict]) -> list[str]:
    """The README's table: every loss at its validated config, and ACL's paired differences."""
    best = recommended_acl(rows)
    head = "recommended ACL − loss" if best else "ACL − loss"
    lines = [f"| loss (V) | seeds | All | Many | Medium | Few | {head}, All | {head}, Few |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    table = [
        (LOSS_NAMES[lo], *c, best is not None and (lo, c[0]) == best[:2])
        for lo in LOSS_NAMES
        if (c := chosen_cell(rows, lo))
    ]
    if best and best[0] != "acl":
        table.append((f"recommended ACL: {best[0]}", best[1], best[2], True))
    for name, v, rs, is_best in table:
        cols = [fmt(*mean_ci([float(r[f"test_{m}"]) for r in rs])) for m in METRICS]
        diffs = ["", ""]
        if best and not is_best:
            diffs = [fmt_interval(*paired(best[2], rs, f"test_{m}")[:2]) for m in ("top1", "few")]
        lines.append(f"| {name} ({v}) | {len(rs)} | {' | '.join(cols)} | {' | '.join(diffs)} |")
    if len(lines) == 2:
        done = sum(r["phase"] == "search" for r in rows)
        lines = [f"(The study is under way: {done} search runs so far, no complete grid column yet.)"]
    return lines


def update_readme(path: Path, rows: list[dict]) -> None:
    """Rewrite the README's study table between its markers (nothing when the markers are absent)."""
    if not path.is_file():
        return
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    path.write_text(head + README_BEGIN + "\n" + "\n".join(readme_table(rows)) + "\n" + README_END + tail)


# ---------------------------------------------------------------- configs


def save_configs(rows: list[dict], folder: Path) -> None:
    """For every loss whose grid column is complete (every V, every seed), its validated setting and V
    as mnist_lt_<loss>.yaml; ACL's is the recommended ACL (`recommended_acl`)."""
    from .study import BASE_CONFIG, HEAD, REGIME, SEEDS, VIEWS

    folder.mkdir(parents=True, exist_ok=True)
    grid = cells(rows)
    for loss in LOSS_NAMES:
        chosen = chosen_cell(rows, loss)
        if chosen is None or any(len(grid.get((loss, v), [])) < len(SEEDS) for v in VIEWS):
            continue  # V is chosen once every V has every seed
        v, rs = chosen
        how = f"search at V = 2; then V = {v} had the best mean validation top-1 of V = 2, 4, 8"
        if loss == "acl" and (best := recommended_acl(rows)) and best[0] != "acl":
            name, v, rs = best
            how = (
                f"the ablation's '{name}' at V = {v} had the best mean validation top-1 of the search winner"
                f"\n# at every V and the ablation's variants, more candidates than the other losses had"
            )
        data = config_mod.load_yaml(config_mod.find_config(BASE_CONFIG))
        data.update({k: x for k, x in REGIME.items() if k not in NOT_SAVED})
        data.update(loss=loss, head=HEAD.get(loss, "mlp3"), n_views=v, **json.loads(rs[0]["settings"]))
        val = mean_ci([float(r["val_top1"]) for r in rs])[0]
        test = [mean_ci([float(r[f"test_{m}"]) for r in rs]) for m in ("top1", "few")]
        header = (
            f"# MNIST-LT, {LOSS_NAMES[loss]}: the setting chosen by `python -m train.study` on the validation split\n"
            f"# ({how}: {val:.1f} over seeds {','.join(sorted(r['seed'] for r in rs))}).\n"
            f"# study: test top-1 {fmt(*test[0])}, Few {fmt(*test[1])} (mean ± 95 % CI); train/results/study.md.\n"
        )
        (folder / f"mnist_lt_{loss}.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
