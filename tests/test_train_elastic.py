"""A worker lost under torchrun: the elastic agent restarts both workers, the run continues from its
last checkpoint and finishes every epoch (two gloo processes on CPU, one SIGKILLed after epoch 1)."""

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


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["acl-train", "torchrun"])
def test_lost_worker_restarts_and_finishes(tmp_path, launch):
    args = [
        *("--config", "mnist_lt_acl", "--epochs", str(EPOCHS), "--threads", "1", "--resume", "auto"),
        *("--check-images", "false", "--output", str(tmp_path), "--name", "ddp", "--cache-dir", str(CACHE)),
        *("--max-steps", "12", "--max-eval-batches", "4", "--progress", "false", "--tensorboard", "false"),
        *("--plot", "false", "--stop-check-every", "2", "--n-views", "2"),
    ]
    if launch == "acl-train":  # the launcher: python -m train --nproc-per-node
        cmd = [sys.executable, "-m", "train", "--nproc-per-node", "2", "--max-restarts", "1", *args]
    else:  # a plain torchrun command, without the launcher's environment
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
        cmd += ["-m", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "ddp" / "metrics.csv"
    try:
        deadline = time.monotonic() + 240
        while _rows(metrics) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        victims = _workers(tmp_path)
        assert _rows(metrics) == 1 and len(victims) == 2, "no two workers in epoch 2"
        os.kill(victims[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and f"epoch {EPOCHS}/{EPOCHS}" in out, out[-4000:]
    assert [r.split(",")[0] for r in metrics.read_text().splitlines()[1:]] == [str(e) for e in range(1, EPOCHS + 1)]
