"""Shared set-up of the training tests: the MNIST-LT cache (built once, reused) and small configs."""

from pathlib import Path

from train import config

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "acl-train-tests"


def small_args(tmp_path, *args: str) -> list[str]:
    """Command-line arguments of the embedded MNIST-LT default made tiny: a few steps, a few
    evaluation batches, 1 thread, no logs or plots (later arguments override earlier ones)."""
    return [
        *("--cache-dir", str(CACHE), "--output", str(tmp_path), "--epochs", "1", "--max-steps", "2"),
        *("--batch-size", "32", "--n-views", "2", "--max-eval-batches", "2", "--workers", "1"),
        *("--threads", "1", "--progress", "false", "--tensorboard", "false", "--plot", "false"),
        *args,
    ]


def small_cfg(tmp_path, *args: str) -> dict:
    """The resolved config of `small_args`."""
    return config.resolve(small_args(tmp_path, *args))


def stop_at_check(monkeypatch, n: int) -> None:
    """Make the training loop's n-th stop check report a stop, as a SIGTERM arriving then would."""
    from train import engine

    calls = {"n": 0}

    def requested(self, *args):
        calls["n"] += 1
        return calls["n"] == n

    monkeypatch.setattr(engine._Stop, "requested", requested)
