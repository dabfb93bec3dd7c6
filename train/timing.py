"""An epoch's running sums: loss, images seen, wall time; carried over a mid-epoch checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class EpochMeter:
    """Sums of the steps of one epoch so far (rank-local loss, global images)."""

    loss_sum: torch.Tensor  # on the device: adding a step's loss does not sync
    n_loss: int = 0
    seen: int = 0
    t0: float = 0.0  # perf_counter at the epoch's start (moved back by a resumed epoch's elapsed time)

    @classmethod
    def start(cls, carried: dict, device: torch.device) -> EpochMeter:
        """A new epoch's meter, or a resumed one's from the checkpoint's sums (`carried`)."""
        return cls(
            torch.tensor(carried.get("loss_sum", 0.0), device=device),
            carried.get("n_loss", 0),
            carried.get("seen", 0),
            time.perf_counter() - carried.get("elapsed", 0.0),
        )

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.n_loss += 1
        self.seen += images

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        return self.seen / self.elapsed()

    def sums(self) -> dict:
        """Plain values for a mid-epoch checkpoint."""
        return {"loss_sum": float(self.loss_sum), "n_loss": self.n_loss, "seen": self.seen, "elapsed": self.elapsed()}

    def row(self, epoch: int, lr: float) -> dict:
        """The epoch's training figures (its metrics.csv row before evaluation)."""
        elapsed = self.elapsed()
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": float(self.loss_sum) / max(self.n_loss, 1),
            "images_per_s": self.seen / elapsed,
            "epoch_s": elapsed,
        }
