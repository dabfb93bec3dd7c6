"""Training under faults: bad images and labels, divergence, interrupted / corrupt / incompatible
checkpoints, resumed logs, and the command line's checks (all on tiny MNIST-LT runs)."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import small_args, small_cfg, stop_at_check

from train import checkpoint, config, engine
from train import stop as stop_module
from train.__main__ import main
from train.data import make_loader
from train.data_checks import check_images, describe_classes
from train.datasets import DataError, Split, read_split
from train.objective import Objective

REPO = Path(__file__).resolve().parents[1]
FAST = ("--data-loader", "pytorch", "--workers", "0", "--max-steps", "3")


def _images(root, names, broken=()):
    root.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(root / name)
    for name in broken:
        (root / name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)


# ---------------------------------------------------------------------------------- bad data


def test_image_check_names_bad_files_and_stamps_good_ones(tmp_path):
    root = tmp_path / "data"
    _images(root, ["a.jpg", "b.png"], broken=["bad1.jpg", "bad2.jpg"])
    (root / "bad.txt").write_text("a.jpg 0\nbad1.jpg 1\nb.png 0\nbad2.jpg 1\n")
    with pytest.raises(DataError, match=r"2 of 4 images cannot be decoded: .*bad1.jpg.*bad2.jpg"):
        check_images(read_split(root / "bad.txt", root), tmp_path / "cache")
    (root / "good.txt").write_text("a.jpg 0\nb.png 1\n")
    good = read_split(root / "good.txt", root)
    assert check_images(good, tmp_path / "cache") is True  # decoded
    assert check_images(good, tmp_path / "cache") is False  # the stamp: nothing decoded
    _images(root, ["a.jpg"], broken=["b.png"])  # a file changed: the stamp no longer applies
    with pytest.raises(DataError, match="b.png"):
        check_images(good, tmp_path / "cache")


def _split_args(tmp_path, train_lines, val_lines="a.jpg 0\nb.jpg 1\n", *args):
    root = tmp_path / "data"
    _images(root, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], broken=["bad.jpg"])
    (root / "train.txt").write_text(train_lines)
    (root / "val.txt").write_text(val_lines)
    return small_args(
        tmp_path,
        *("--dataset", "split", "--data-root", str(root), "--train-split", "train.txt", "--val-split", "val.txt"),
        *("--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), *args),
    )


@pytest.mark.parametrize("loader", ["dali", "pytorch"])
def test_undecodable_validation_image_stops_before_training(tmp_path, capsys, loader):
    args = _split_args(tmp_path, "a.jpg 0\nb.jpg 1\n", "a.jpg 0\nbad.jpg 1\n", "--data-loader", loader)
    assert main(args) == 2  # not a segfault in the DALI decoder
    assert "val.txt: 1 of 2 images cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "mnist_lt_acl" / "checkpoint.pt").exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
@pytest.mark.parametrize("where", ["train", "val"])
def test_an_image_dali_cannot_decode_stops_the_run_naming_it(tmp_path, capsys, where, kind):
    """No image check (--check-images false): the pipeline's decode failure is a message, exit 2, and
    the checkpoint written before it stays as it was. A truncated JPEG would crash DALI's decoder."""
    good, bad = "a.jpg 0\nb.jpg 1\nc.jpg 0\nd.jpg 1\n", "a.jpg 0\nbad.jpg 1\nc.jpg 0\nd.jpg 1\n"
    train, val = (bad, good) if where == "train" else (good, bad)
    args = _split_args(tmp_path, train, val, "--data-loader", "dali", "--check-images", "false", "--batch-size", "4")
    jpeg = (tmp_path / "data" / "a.jpg").read_bytes()
    if kind == "truncated":
        (tmp_path / "data" / "bad.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    else:  # JPEG's start and end markers around garbage: DALI's decoder has to try it
        (tmp_path / "data" / "bad.jpg").write_bytes(jpeg[:4] + b"not a jpeg" * 8 + b"\xff\xd9")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"DALI cannot decode 1 {'training' if where == 'train' else 'evaluation'} image(s): " in err
    assert ("truncated" in err) == (kind == "truncated"), err
    assert str(tmp_path / "data" / "bad.jpg") in err and "Traceback" not in err
    run = tmp_path / "mnist_lt_acl"
    if where == "val":  # epoch 1 was trained: its checkpoint is intact
        state, path = checkpoint.load(run / "checkpoint.pt")
        assert state["epoch"] == 1 and path == run / "checkpoint.pt"
    else:
        assert not (run / "checkpoint.pt").exists()


def test_a_pipeline_failure_on_good_files_says_what_dali_reported(tmp_path):
    """Every file decodes, yet the pipeline fails (here: a centre crop larger than the resized image,
    which the config check refuses, forced past it): the error names DALI's operator and reason."""
    args = _split_args(tmp_path, "a.jpg 0\nb.jpg 1\n", "a.jpg 0\nb.jpg 1\n", "--data-loader", "dali")
    cfg = config.resolve([*args, "--image-size", "32", "--eval-resize", "32"])
    cfg["eval_resize"] = 20
    split = read_split(tmp_path / "data" / "val.txt", tmp_path / "data")
    with pytest.raises(RuntimeError, match=r"each of the 2 files .* decodes on its own: .*crop: Slice can't be placed"):
        next(iter(make_loader(cfg, split, train=False, epoch=0, rank=0, world=1, device=torch.device("cpu"))))


def test_classes_are_reported_and_a_named_count_is_enforced(tmp_path, capsys):
    split = Split(tmp_path / "t.txt", tmp_path, ["x"] * 4, np.array([0, 1, 1, 12]))
    line = describe_classes(split, 13, named=False)
    assert "13 classes inferred from the training labels (max label 12)" in line
    assert "10 have no training image: [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]" in line
    args = _split_args(tmp_path, "a.jpg 0\nb.jpg 1\nc.jpg 12\n", "a.jpg 0\n", "--num-classes", "10")
    assert main(args) == 2
    assert "labels outside [0, 10)" in capsys.readouterr().err


@pytest.mark.parametrize("line", ["../outside.jpg 0", "sub/../../outside.jpg 0", "/etc/passwd 0"])
def test_split_paths_cannot_leave_the_data_root(tmp_path, line):
    (tmp_path / "split.txt").write_text(f"a.jpg 0\n{line}\n")
    with pytest.raises(DataError, match="line 2: image path .* leaves the data root"):
        read_split(tmp_path / "split.txt", tmp_path)


def test_epoch_checkpoint_is_written_before_evaluation_and_a_resume_finishes_it(tmp_path, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    cfg = small_cfg(tmp_path, *FAST, "--epochs", "2", "--eval-every", "1")
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        engine.train(cfg)
    run = tmp_path / "mnist_lt_acl"
    state, _ = checkpoint.load(run / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    assert (run / "metrics.csv").read_text().splitlines()[1:] == []

    monkeypatch.setattr(engine, "evaluate", real)
    report = engine.train({**cfg, "resume": "auto"})
    assert "epoch 1's evaluation did not finish before the run stopped: running it now" in capsys.readouterr().out
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(r[3] for r in rows), "both epochs have a top-1"
    assert float(rows[0][2]) == pytest.approx(state["row"]["loss"], rel=1e-5), "epoch 1's training loss is kept"
    assert report["best_epoch"] in (1, 2) and (run / "result.json").is_file()


# ------------------------------------------------------------------------------ checkpoints


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((64,), float(v))}, "epoch": int(v), "config": {"lr": 0.1}}


def test_checkpoint_keeps_the_previous_one_and_falls_back_to_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(1), path)
    checkpoint.save(_state(2), path)
    assert checkpoint.previous_path(path).is_file()
    state, used = checkpoint.load(path)
    assert used == path and state["epoch"] == 2
    raw = bytearray(path.read_bytes())
    at = raw.find(np.float32(2.0).tobytes() * 4)  # inside the tensor data: the zip stays readable
    assert at > 0
    raw[at + 1] ^= 0x10
    path.write_bytes(bytes(raw))
    messages = []
    state, used = checkpoint.load(path, log=messages.append)
    assert used == checkpoint.previous_path(path) and state["epoch"] == 1
    assert "digest does not match" in messages[0] and "previous checkpoint" in messages[0]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    state, used = checkpoint.load(path, log=messages.append)
    assert state["epoch"] == 1 and "cannot be read" in messages[1]
    checkpoint.previous_path(path).write_bytes(b"")  # and the previous one too
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(path)


def test_checkpoint_is_data_not_code(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": Split(path, tmp_path, [], np.zeros(0)), "sha256": ""}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read .*weights_only|WeightsUnpickler"):
        checkpoint.load(path)


def test_stale_temporaries_are_removed_and_a_full_disk_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    dead = tmp_path / ".checkpoint.pt.tmp999999999"  # no such process
    dead.write_bytes(b"x" * 1000)
    checkpoint.save(_state(1), path)
    assert not dead.exists() and path.is_file()
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match="disk is full.*already saved .* are kept"):
        checkpoint.save(_state(2), path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".checkpoint.pt.tmp*"))


def test_incompatible_resume_is_refused_before_writing(tmp_path, capsys):
    assert main(small_args(tmp_path, *FAST)) == 0
    run = tmp_path / "mnist_lt_acl"
    saved = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    before = config.resolve(small_args(tmp_path, *FAST))
    proj = before["proj_dim"] // 2
    changes = ("--epochs", "2", "--arch", "resnet32", "--proj-dim", str(proj))
    args = small_args(tmp_path, *FAST, "--resume", "auto", *changes)
    assert main(args) == 2
    err = capsys.readouterr().err
    refused = err.split("(")[1].split(")")[0]
    assert f"arch: '{before['arch']}' -> 'resnet32'" in refused
    assert f"proj_dim: {before['proj_dim']} -> {proj}" in refused
    assert "epochs" not in refused
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == saved  # config.yaml untouched
    assert main(small_args(tmp_path, *FAST, "--resume", "auto", "--epochs", "2")) == 0
    assert "resume: epochs changed from 1 to 2 (allowed)" in capsys.readouterr().out


def test_resume_after_two_epochs_reads_the_latest_checkpoint(tmp_path, capsys):
    """From epoch 2 on a checkpoint holds the best top-1 so far: still plain data (weights_only)."""
    assert main(small_args(tmp_path, *FAST, "--epochs", "2")) == 0
    run = tmp_path / "mnist_lt_acl"
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and type(ck["best_top1"]) is float and ck["best_top1"] >= 0
    capsys.readouterr()
    assert main(small_args(tmp_path, *FAST, "--epochs", "3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint.pt'}: epoch 2, step 0" in out and "warning" not in out
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_a_checkpoint_refuses_values_weights_only_cannot_read(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"state\['best'\] is a numpy.float64"):
        checkpoint.save({"best": np.float64(1.0)}, tmp_path / "checkpoint.pt")
    assert not list(tmp_path.iterdir())


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    assert main(small_args(tmp_path, *FAST)) == 0
    run = tmp_path / "mnist_lt_acl"
    saved = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(small_args(tmp_path, *FAST)) == 2
    err = capsys.readouterr().err
    assert f"the run folder {run} already holds a run" in err and "--resume auto" in err and "--name" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == saved
    # another loss than the config's: a run folder of its own, named for it
    assert main(small_args(tmp_path, *FAST, "--loss", "ce")) == 0
    assert "final (mnist_lt_acl-ce)" in capsys.readouterr().out and (tmp_path / "mnist_lt_acl-ce").is_dir()


# ------------------------------------------------------------------------------- divergence


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    forward = Objective.forward
    calls = {"n": 0}

    def nan_in_epoch_two(self, *args):
        calls["n"] += 1
        loss = forward(self, *args)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(Objective, "forward", nan_in_epoch_two)
    assert main(small_args(tmp_path, *FAST, "--epochs", "2", "--loss", "ce")) == 3
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and "training diverged" in err and "last good checkpoint" in err
    state, _ = checkpoint.load(tmp_path / "mnist_lt_acl-ce" / "checkpoint.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    # the kept checkpoint holds the weights of a clean run stopped after the same steps, not any finite ones
    monkeypatch.undo()
    stop_at_check(monkeypatch, 3)  # after epoch 1
    with pytest.raises(SystemExit):
        main(small_args(tmp_path, *FAST, "--epochs", "2", "--loss", "ce", "--name", "clean"))
    clean, _ = checkpoint.load(tmp_path / "clean" / "checkpoint.pt")  # saved after epoch 1's 3 steps
    _assert_same_weights(state["model"], clean["model"])


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -------------------------------------------------------------------- resumed logs and sums


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_sigterm_on_the_last_step_then_resume_logs_every_step_once(tmp_path, monkeypatch):
    args = (*FAST, "--epochs", "2", "--tensorboard", "true", "--progress", "false")
    engine.train(small_cfg(tmp_path, *args, "--name", "straight"))
    stop_at_check(monkeypatch, 3)  # the last step of epoch 1
    with pytest.raises(SystemExit):
        engine.train(small_cfg(tmp_path, *args, "--name", "split"))
    monkeypatch.undo()
    engine.train(small_cfg(tmp_path, *args, "--name", "split", "--resume", "auto"))
    straight, split = _events(tmp_path / "straight"), _events(tmp_path / "split")
    assert straight == split and straight["train/loss"] == [3, 6] and straight["epoch/loss"] == [3, 6]
    rows = [(tmp_path / n / "metrics.csv").read_text().splitlines() for n in ("straight", "split")]
    losses = [[r.split(",")[2] for r in rs[1:]] for rs in rows]
    assert losses[0] == losses[1]  # the resumed epoch's loss covers its steps before the SIGTERM
    assert all(float(r.split(",")[7]) > 0 for r in rows[1][1:])  # images/s
    weights = [checkpoint.load(tmp_path / n / "checkpoint.pt")[0]["model"] for n in ("straight", "split")]
    _assert_same_weights(*weights)  # the resumed run ends where the uninterrupted one does


# ------------------------------------------------------------------------------ command line


def test_every_option_has_help_with_its_default():
    parser = config.build_parser(config.DEFAULTS)
    missing = [a.dest for a in parser._actions if a.dest in config.DEFAULTS and not a.help]
    assert not missing
    text = parser.format_help()
    assert "(default: 0.2)" in text and text.count("(default:") >= len(config.DEFAULTS)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--views", "foo"], "unknown augmentation recipe"),
        (["--lr", "0"], "lr must be > 0"),
        (["--temperature", "inf"], "temperature must be"),
        (["--alpha", "-1"], "alpha must be >= 0"),
        (["--momentum", "1.5"], "momentum must be"),
        (["--std", "0,1,1"], "std > 0"),
        (["--image-size", "32"], "eval_resize must be >= image_size"),
        (["--name", "../elsewhere"], "name must be a folder name under output"),  # the config's eval_resize is 28
    ],
)
def test_invalid_values_are_refused_when_the_config_is_read(args, match):
    with pytest.raises(config.ConfigError, match=match):
        config.resolve(args)


@contextlib.contextmanager
def _sigint(handler):
    """SIGINT handled by `handler` inside the block, as before it after."""
    outer = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, outer)


def test_ctrl_c_stops_with_a_checkpoint_and_a_second_one_at_once():
    """The first SIGINT asks for a stop (as SIGTERM does); one right after it is the same keypress; a
    later one raises KeyboardInterrupt at once. (Python's own SIGINT handler first: a job started in
    the background by a shell has SIGINT ignored, and then the run leaves it so.)"""
    with _sigint(signal.default_int_handler):
        stop = engine._Stop()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.flag and stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # at once: the same keypress, forwarded by torchrun
            time.sleep(stop_module.SECOND_CTRL_C_S + 0.1)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    with _sigint(signal.SIG_IGN):
        stop = engine._Stop()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert not stop.flag
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_ctrl_c_mid_run_saves_a_checkpoint_and_exits_130(tmp_path):
    """A run interrupted by Ctrl-C: the message, exit 130, a loadable mid-epoch checkpoint (resuming from
    one is test_sigterm_on_the_last_step_then_resume_logs_every_step_once)."""
    args = small_args(tmp_path, *FAST, "--max-steps", "0", "--epochs", "30", "--max-eval-batches", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's `&` would ignore it
    )  # fmt: skip
    ck = tmp_path / "mnist_lt_acl" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ck.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Ctrl-C: checkpoint saved at epoch" in out and "Traceback" not in out, out[-3000:]
    state, path = checkpoint.load(ck)
    assert path == ck and state["step"] > 0 and state["epoch"] < 30


def test_a_sigterm_ends_a_process_that_cannot_reach_its_stop_check(tmp_path):
    """A worker blocked (here: sleeping; under DDP: a collective whose peer is gone) when torchrun's
    SIGTERM arrives exits with 143 once the grace period is over, rather than waiting on."""
    code = (
        "import os, signal, time\n"
        "from train import stop\n"
        "stop.STOP_GRACE_S = 1.0\n"
        "s = stop._Stop()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=60)
    assert res.returncode == 143 and time.monotonic() - t0 < 30
