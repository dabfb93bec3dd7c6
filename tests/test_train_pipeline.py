"""Loader lifetime and DDP step hygiene: one DALI pipeline across epochs, its state restored exactly,
PIL's blur in the fallback, the stop check every k steps on its own group, the loss's own group,
rank 0's BatchNorm statistics before evaluation, and a refused mid-epoch resume on another split."""

import csv
import gc
import os
import socket
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageFilter
from train_common import CACHE, small_cfg, stop_at_check

from train import checkpoint, config, datasets, engine
from train.data import epoch_order, make_loader
from train.torch_loader import _PilGaussianBlur

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist():
    return datasets.build_mnist_lt(CACHE, 100)


def _labels(batches):
    return [labels.tolist() for _, labels in batches]


def test_dali_pipeline_lives_across_epochs_and_restores(mnist, tmp_path):
    cfg = small_cfg(tmp_path, "--data-loader", "dali", "--max-steps", "3", "--batch-size", "16")
    tr = datasets.read_split(mnist / "train.txt", mnist)
    loader = make_loader(cfg, tr, train=True, epoch=0, rank=0, world=1, device=CPU)
    pipe = loader.pipe
    first = list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(1)]
    state = loader.state()  # mid-epoch 1, after one batch
    rest = list(it)
    assert loader.pipe is pipe and len(first) == 3 and len(head) + len(rest) == 3
    for e, batches in ((0, first), (1, head + rest)):
        order = epoch_order(len(tr), cfg["seed"], e, 1, 16)
        assert _labels(batches) == [tr.labels[order[i * 16 : (i + 1) * 16]].tolist() for i in range(3)]
    # a new loader from the state continues with the same pixels, then the next epoch follows
    again = make_loader(cfg, tr, train=True, epoch=1, rank=0, world=1, device=CPU, state=state)
    resumed = list(again)
    assert len(resumed) == 2
    for (va, la), (vb, lb) in zip(rest, resumed):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
    # freed as soon as it is dropped, not by the cyclic collector (which may run in a forked worker)
    gc.disable()
    try:
        ref = weakref.ref(again.pipe)
        del again
        assert ref() is None, "the loader and its DALI pipeline must not form a reference cycle"
    finally:
        gc.enable()


def test_fallback_blur_is_pils_with_uniform_sigma(monkeypatch):
    img = Image.effect_noise((64, 48), 60).convert("RGB")
    blur = _PilGaussianBlur(0.1, 2.0)
    torch.manual_seed(3)
    sigma = 0.1 + 1.9 * float(torch.rand(()))
    torch.manual_seed(3)
    assert blur(img).tobytes() == img.filter(ImageFilter.GaussianBlur(radius=sigma)).tobytes()
    # the radii the class itself draws (PIL's filter records them), not a formula of the test's own
    drawn = []
    real = ImageFilter.GaussianBlur
    monkeypatch.setattr(ImageFilter, "GaussianBlur", lambda radius: drawn.append(radius) or real(radius))
    torch.manual_seed(0)
    tiny = Image.new("RGB", (2, 2))
    for _ in range(2000):
        blur(tiny)
    sigmas = torch.tensor(drawn)
    assert len(drawn) == 2000 and 0.1 <= sigmas.min() and sigmas.max() <= 2.0
    # U(0.1, 2.0): mean 1.05, a quarter of the draws in each quarter of the range (4 sigma bounds)
    assert abs(sigmas.mean().item() - 1.05) < 0.05
    quarters = torch.histc(sigmas, bins=4, min=0.1, max=2.0) / 2000
    assert bool(((quarters - 0.25).abs() < 0.04).all()), quarters


def test_mid_epoch_resume_with_other_world_or_batch_is_refused(tmp_path, monkeypatch):
    common = ["--data-loader", "pytorch", "--workers", "0", "--epochs", "2", "--max-steps", "3", "--name", "run"]
    stop_at_check(monkeypatch, 2)
    with pytest.raises(SystemExit):
        engine.train(small_cfg(tmp_path, *common))
    path = tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=False)
    assert (ck["epoch"], ck["step"], ck["world"]) == (0, 2, 1)
    # another batch size is refused by the config comparison of every resume (train/checkpoint.py)
    with pytest.raises(checkpoint.CheckpointError, match=r"batch_size: 32 -> 16"):
        engine.train(small_cfg(tmp_path, *common, "--resume", "auto", "--batch-size", "16"))
    ck["world"] = 2
    checkpoint.save({k: v for k, v in ck.items() if k != checkpoint.DIGEST}, path)
    with pytest.raises(config.ConfigError, match=r"by 2 rank\(s\) .* the same world size and batch size"):
        engine.train(small_cfg(tmp_path, *common, "--resume", "auto"))


def _ranks(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from acl_kernels.distributed import loss_group

        group = loss_group()
        same = loss_group() is group and group is not dist.group.WORLD and dist.get_world_size(group) == 2
        stop = engine._Stop(every=3, steps=5)
        stop.flag = rank == 1  # a SIGTERM reached rank 1 only
        checks = [stop.requested(s) for s in (1, 2, 3, 4, 5)]
        stop.restore()
        bn = torch.nn.BatchNorm1d(4)
        bn.running_mean.fill_(float(rank + 1))
        engine.broadcast_buffers(bn)
        out.put((rank, same, checks, bn.running_mean.tolist()))
    finally:
        dist.destroy_process_group()


def test_ddp_groups_stop_check_and_buffers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ranks, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(out.get() for _ in procs)
    for rank, same, checks, mean in results:
        assert same, "loss_group() must be one cached group of both ranks, not the default group"
        assert checks == [False, False, True, False, True], f"rank {rank}: steps 3 and 5 (the last) check, got {checks}"
        assert mean == [1.0] * 4, f"rank {rank}: rank 0's running mean expected, got {mean}"


def test_bench_train_row(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_train

    out = tmp_path / "train.csv"
    args = ["--config", "mnist_lt_acl", "--cache-dir", str(CACHE), "--arch", "small_cnn", "--threads", "1"]
    args += ["--data-loader", "pytorch", "--workers", "0", "--batch-size", "8", "--n-views", "2", "--queue-size", "0"]
    assert bench_train.main([*args, "--warmup", "0", "--steps", "1", "--breakdown-steps", "1", "--csv", str(out)]) == 0
    (row,) = list(csv.DictReader(open(out)))
    assert row["world"] == "1" and row["batch_per_rank"] == "8" and float(row["images_per_s"]) > 0
    parts = [float(row[f"{p}_ms"]) for p in bench_train.PARTS]
    assert all(p >= 0 for p in parts) and parts[1] > 0 and float(row["step_ms"]) == pytest.approx(sum(parts), abs=0.5)
