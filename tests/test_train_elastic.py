"""A worker lost under torchrun: the elastic agent restarts both workers, the run continues from its
last checkpoint and finishes every epoch (two gloo processes on CPU, one SIGKILLed in epoch 2's
training, or during epoch 1's evaluation)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_common import CACHE

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _workers(out: Path) -> list[int]:
    """PIDs of the training workers of the run writing to `out` (children of torchrun)."""
    found = subprocess.run(["pgrep", "-f", "--", f"-u -m train .*{out}"], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _rows(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0


def _wait(ready, proc, seconds=240.0):
    deadline = time.monotonic() + seconds
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_one(run: Path, out: Path, proc, when: str) -> None:
    """SIGKILL one worker after epoch 1's row (training epoch 2), or between epoch 1's checkpoint and
    its row (evaluation): both workers are paused first, so the row count read is the one killed in."""
    if when == "training":
        _wait(lambda: _rows(run / "metrics.csv") >= 1, proc)
    else:
        _wait(lambda: (run / "checkpoint.pt").is_file(), proc)
    victims = _workers(out)
    assert len(victims) == 2, "no two workers"
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    rows = _rows(run / "metrics.csv")
    os.kill(victims[0], signal.SIGKILL)
    os.kill(victims[1], signal.SIGCONT)
    assert rows == (1 if when == "training" else 0), f"worker not killed during {when}: {rows} rows"


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch, when", [("acl-train", "training"), ("torchrun", "training"), ("torchrun", "evaluation")]
)
def test_lost_worker_restarts_and_finishes(tmp_path, launch, when):
    args = [
        *("--config", "mnist_lt_acl", "--epochs", str(EPOCHS), "--threads", "1", "--resume", "auto"),
        *("--check-images", "false", "--output", str(tmp_path), "--name", "ddp", "--cache-dir", str(CACHE)),
        *("--max-steps", "12", "--progress", "false", "--tensorboard", "false"),
        *("--plot", "false", "--stop-check-every", "2", "--n-views", "2"),
    ]
    if when == "training":  # a short evaluation; the whole validation split gives a window to kill in
        args += ["--max-eval-batches", "4"]
    if launch == "acl-train":  # the launcher: python -m train --nproc-per-node
        cmd = [sys.executable, "-m", "train", "--nproc-per-node", "2", "--max-restarts", "1", *args]
    else:  # a plain torchrun command, without the launcher's environment
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
        cmd += ["-m", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "ddp"
    try:
        _kill_one(run, tmp_path, proc, when)
        out, _ = proc.communicate(timeout=300)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and f"epoch {EPOCHS}/{EPOCHS}" in out, out[-4000:]
    assert ("evaluation did not finish" in out) == (when == "evaluation"), out[-4000:]
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(e) for e in range(1, EPOCHS + 1)]
