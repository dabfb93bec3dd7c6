"""Stacked bars of the training-step breakdown in bench/results/train.csv (bench/bench_train.py).

    python bench/plot_train.py [--csv bench/results/train.csv] [--device H100] [--last 12] [--out PNG]

One bar per row: data wait, model forward, loss forward, loss backward, model backward without
the exposed DDP communication, and that communication (it is part of the measured model backward).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = (
    ("data_ms", "data wait"),
    ("fwd_ms", "model forward"),
    ("loss_fwd_ms", "loss forward"),
    ("loss_bwd_ms", "loss backward"),
    ("bwd_compute", "model backward"),
    ("comm_ms", "exposed DDP comm"),
    ("optim_ms", "optimizer"),
)


def load(path: Path, device: str, last: int) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if device.lower() in r["device"].lower()]
    if not rows:
        raise SystemExit(f"{path}: no rows" + (f" on a device matching {device!r}" if device else ""))
    rows = rows[-last:]
    for r in rows:
        r["bwd_compute"] = max(0.0, float(r["bwd_ms"]) - float(r["comm_ms"]))
    return rows


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['loss']}/{r['impl']} V={r['n_views']}\nb={r['batch_per_rank']}/rank {r['data_loader']} "
        f"x{r['world']}\n{float(r['images_per_s']):.0f} img/s" + (
            f", eff {float(r['scaling_efficiency']):.2f}" if r["scaling_efficiency"] else "")
        for r in rows
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 5))
    bottom = [0.0] * len(rows)
    for key, name in PARTS:
        h = [float(r[key]) for r in rows]
        ax.bar(range(len(rows)), h, bottom=bottom, label=name)
        bottom = [b + x for b, x in zip(bottom, h)]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    where = "; ".join(sorted({f"{r['arch']} {r['image_size']} px on {r['device']}" for r in rows}))
    ax.set(ylabel="ms per step (median, per rank)", title="training step breakdown: " + where)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, default=HERE / "results" / "train.csv")
    p.add_argument("--device", default="", help="only rows whose device contains this text")
    p.add_argument("--last", type=int, default=12, help="the last N matching rows")
    p.add_argument("--out", type=Path, default=None, help="default: train_breakdown.png beside the CSV")
    args = p.parse_args()
    out = plot(load(args.csv, args.device, args.last), args.out or args.csv.with_name("train_breakdown.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
