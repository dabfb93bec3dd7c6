"""Checkpoints that are never half-written, never code, and never silently corrupt.

`save` writes `<name>.tmp<pid>` in the run folder, fsyncs it, moves the current checkpoint to
`<stem>.prev.pt` and renames the new one into place (then fsyncs the folder). Temporary files of
dead writers (a run killed mid-write) are deleted first. A full disk raises `CheckpointError`
saying so, with the checkpoints already on disk untouched.

`load` reads with `torch.load(weights_only=True)` (tensors and plain containers only: a checkpoint
is data) and checks the SHA-256 digest stored in it, computed over every value of the state; a
truncated, unreadable or bit-flipped latest checkpoint falls back to the previous one, with a
message. The file stays an ordinary `torch.save` dict, readable by `torch.load`.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import torch

DIGEST = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used; the message says which and why."""


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def digest(state: dict) -> str:
    """SHA-256 over every value of `state` (key paths, tensor dtypes / shapes / bytes, other values'
    repr), in a fixed order; the stored digest itself is left out."""
    h = hashlib.sha256()

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=repr):
                if not (prefix == "" and k == DIGEST):
                    walk(f"{prefix}/{k!r}", value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"{prefix}:{type(value).__name__}{len(value)}".encode())
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{prefix}={value!r}".encode())

    walk("", state)
    return h.hexdigest()


def _writer_alive(tmp: Path) -> bool:
    pid = tmp.name.rsplit(".tmp", 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files left by writers that no longer run; returns them."""
    stale = [t for t in path.parent.glob(f".{path.name}.tmp*") if not _writer_alive(t)]
    for t in stale:
        t.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# the exact types a checkpoint may hold besides tensors, dicts, lists and tuples: what
# torch.load(weights_only=True) reads back (numpy scalars, float subclasses among them, are refused)
PLAIN = (bool, int, float, str, bytes, type(None))


def check_plain(value, where: str = "state") -> None:
    """Raise CheckpointError naming the first value of `value` that is not a tensor or plain Python."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_plain(k, f"{where} key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, torch.Tensor) and type(value) not in PLAIN:
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}: a checkpoint holds only tensors and "
            f"plain Python values, so that torch.load(weights_only=True) reads it back"
        )


def save(state: dict, path: Path, keep_previous: bool = True) -> None:
    """Atomically replace `path` by `state` (plus its digest), keeping the old file as the previous one."""
    path = Path(path)
    check_plain(state)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    state = {**state, DIGEST: digest(state)}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        full = full or "No space left" in str(e)
        why = "the disk is full" if full else str(e)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {why}; the checkpoints already saved in {path.parent} are kept"
        ) from e
    if path.is_file() and keep_previous:
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read(path: Path, map_location) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused (not plain data), I/O error
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or DIGEST not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this trainer (no {DIGEST} digest)")
    if digest(state) != state[DIGEST]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 digest does not match its contents")
    return state


def load(path: Path, map_location=None, log=print) -> tuple[dict, Path]:
    """(state, the file it came from): `path`, or the previous checkpoint if `path` is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return _read(path, map_location), path
    except CheckpointError as latest:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        state = _read(prev, map_location)
        log(f"warning: {latest}; resuming from the previous checkpoint {prev} instead")
        return state, prev


# Options a resumed run may change: they do not change the state or the maths of the steps to come,
# except `epochs`, which stretches the schedule of the remaining epochs (allowed, and reported).
SAFE_TO_CHANGE = (
    *("epochs", "resume", "stop_at_epoch", "output", "name", "device", "threads", "workers", "cache_dir"),
    *("progress", "tensorboard", "plot", "eval_every", "max_eval_batches", "check_images", "compile"),
)


def config_changes(saved: dict, cfg: dict) -> list[str]:
    """Compare the checkpoint's config with this run's: raise CheckpointError listing every change
    outside SAFE_TO_CHANGE; return one line per safe change (to print)."""
    changed = [k for k in saved if k in cfg and saved[k] != cfg[k]]
    refused = [f"{k}: {saved[k]!r} -> {cfg[k]!r}" for k in changed if k not in SAFE_TO_CHANGE]
    if refused:
        raise CheckpointError(
            "cannot resume: the checkpoint was trained with another configuration ("
            + "; ".join(refused)
            + "). Resume with the checkpoint's values (its config.yaml) or start a new run (--name); "
            f"these options may change on resume: {', '.join(SAFE_TO_CHANGE)}"
        )
    return [f"resume: {k} changed from {saved[k]!r} to {cfg[k]!r} (allowed)" for k in changed]
