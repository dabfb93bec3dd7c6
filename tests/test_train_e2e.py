"""End to end on the embedded MNIST-LT: smoke runs through both loaders, every loss, exact resume, DDP."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_common import small_args, small_cfg, stop_at_check

from train import engine, state
from train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loader", ["dali", "pytorch"])
def test_smoke_cli(tmp_path, capsys, loader):
    args = small_args(
        tmp_path,
        "--max-steps",
        "3",
        "--max-eval-batches",
        "3",
        "--data-loader",
        loader,
        "--tensorboard",
        "true",
        "--plot",
        "true",
        "--n-views",
        "4",
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final (mnist_lt_acl): top-1" in out and "Many" in out and "Few" in out
    assert "test at epoch 1 (mnist_lt_acl): top-1" in out  # the test split, scored once at the val-selected epoch
    run = tmp_path / "mnist_lt_acl"
    for f in ("config.yaml", "checkpoint.pt", "best.pt", "result.json", "metrics.csv", "per_class.csv", "curves.png"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    header, row = (run / "metrics.csv").read_text().splitlines()
    assert header.startswith("epoch,lr,loss,top1,many,medium,few") and row.startswith("1,")
    assert len((run / "per_class.csv").read_text().splitlines()[1].split(",")) == 11
    assert not list(run.glob(".*tmp*"))  # no temporary checkpoint left behind


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("acl", ["--queue-size", "48", "--n-views", "3"]),
        ("acl", ["--queue-size", "48", "--amp", "bf16"]),  # the AMP path (CPU autocast)
        ("paco", ["--queue-size", "48", "--amp", "bf16"]),
        ("paco", ["--queue-size", "48", "--head", "mlp_bn"]),
        ("gpaco", ["--queue-size", "48", "--smooth", "0.1"]),
        ("supcon", []),
        ("ce", []),
        ("la", []),
    ],
)
def test_every_loss_trains(tmp_path, monkeypatch, loss, extra):
    """A finite training loss, every trainable weight of the classifier moved, the queue filled."""
    initial = {}

    def model(*args, **kwargs):  # the freshly initialised model, before the first step
        m = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in m.named_parameters()})
        return m

    build = state.Model
    monkeypatch.setattr(state, "Model", model)
    cfg = small_cfg(tmp_path, "--data-loader", "pytorch", "--workers", "0", "--loss", loss, "--max-steps", "3", *extra)
    engine.train(cfg)
    run = tmp_path / cfg["name"]
    header, row = (run / "metrics.csv").read_text().splitlines()[:2]
    train_loss = float(dict(zip(header.split(","), row.split(",")))["loss"])
    assert torch.isfinite(torch.tensor(train_loss)), train_loss
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and initial
    moved = [k for k, v in initial.items() if not torch.equal(ck["model"][k].cpu(), v.cpu())]
    assert len(moved) > len(initial) // 2, f"only {moved} of {list(initial)} changed"
    if "--queue-size" in extra:
        assert int(ck["objective"]["queue_ptr"][1]) == 48  # the queue filled (and wrapped)


def _weights(tmp_path, name):
    ck = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
    return ck["model"], ck["objective"], ck["optimizer"]["state"]


def _assert_identical(a, b):
    for part_a, part_b in zip(a, b):
        flat_a = {k: v for k, v in part_a.items()}
        flat_b = {k: v for k, v in part_b.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            va, vb = flat_a[k], flat_b[k]
            if isinstance(va, dict):
                for kk in va:
                    assert torch.equal(va[kk], vb[kk]), f"{k}.{kk}"
            else:
                assert torch.equal(va, vb), k


@pytest.mark.parametrize("loader", ["pytorch", "dali"])
def test_resume_is_exact(tmp_path, loader):
    """2 epochs straight == 1 epoch, stop, resume, 1 epoch: bit-identical weights, queue and momenta."""
    common = [
        "--data-loader",
        loader,
        "--epochs",
        "2",
        "--max-steps",
        "3",
        "--queue-size",
        "40",
        "--warmup-epochs",
        "1",
        "--workers",
        "0" if loader == "pytorch" else "1",
    ]
    engine.train(small_cfg(tmp_path, *common, "--name", "straight"))
    engine.train(small_cfg(tmp_path, *common, "--name", "split", "--stop-at-epoch", "1"))
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    engine.train(small_cfg(tmp_path, *common, "--name", "split", "--resume", "auto"))
    _assert_identical(_weights(tmp_path, "straight"), _weights(tmp_path, "split"))
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    common = [
        "--data-loader",
        "pytorch",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--max-steps",
        "3",
        "--loss",
        "paco",
        "--queue-size",
        "40",
        "--head",
        "mlp_bn",
    ]
    engine.train(small_cfg(tmp_path, *common, "--name", "straight"))
    # a real SIGTERM sets the flag
    stop = engine._Stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.flag
    stop.restore()
    # stop after the 5th step (epoch 2, step 2), as a SIGTERM arriving there would
    stop_at_check(monkeypatch, 5)
    with pytest.raises(SystemExit) as e:
        engine.train(small_cfg(tmp_path, *common, "--name", "split"))
    assert e.value.code == 143
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    engine.train(small_cfg(tmp_path, *common, "--name", "split", "--resume", "auto"))
    _assert_identical(_weights(tmp_path, "straight"), _weights(tmp_path, "split"))


def test_ddp_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        *small_args(tmp_path, "--queue-size", "512", "--n-views", "4"),
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 rank(s) on cpu" in res.stdout and res.stdout.count("final (mnist_lt_acl)") == 1
    ck = torch.load(tmp_path / "mnist_lt_acl" / "checkpoint.pt", weights_only=False)
    # ACL queues every view: 2 steps x 4 views x 16 rows per rank = 128 keys per rank, 256 with the
    # all-gather (128 if each rank queued only its own); the queue of 512 never wraps
    queue, ptr = ck["objective"]["queue"], ck["objective"]["queue_ptr"]
    assert ck["epoch"] == 1 and (int(ptr[0]), int(ptr[1])) == (256, 256), ptr
    norms = queue.norm(dim=1)
    assert bool((norms[:256] > 0.5).all()) and bool((norms[256:] == 0).all()), norms
