"""What a run writes as it goes: metrics.csv, per_class.csv, TensorBoard, the console line of an epoch, curves.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def first_best(scored: tuple[float, int]) -> tuple[float, int]:
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
                self.best = max([b for b in top1 if not math.isnan(b[0])], key=first_best, default=self.best)
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


def epoch_line(epoch: int, epochs: int, row: dict, report: dict | None) -> str:
    """The console line of an ended epoch: training loss and speed, and its evaluation if one ran."""
    acc = ""
    if report is not None:
        acc = (
            f" | top-1 {report['top1']:.2f} (Many {report['many']:.2f}, Medium {report['medium']:.2f}, "
            f"Few {report['few']:.2f})"
        )
    return f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, {row['images_per_s']:.0f} img/s{acc}"
