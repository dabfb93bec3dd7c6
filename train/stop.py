"""Ending a run early: a SIGTERM (checkpoint, then exit 143), Ctrl-C (checkpoint, then exit 130; a
second Ctrl-C stops at once) and a diverged loss (TrainingError)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

# after a SIGTERM, the seconds the loop has to reach its next stop check and write the checkpoint;
# a worker still running then is blocked (a collective whose peer is gone) and exits with 143
STOP_GRACE_S = 60.0
# a Ctrl-C this long after the first stops at once; an earlier one is the same keypress reaching the
# process twice (the terminal signals every process of the job, and torchrun forwards it to its workers)
SECOND_CTRL_C_S = 1.0


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message says why and what was kept."""


def all_finite(loss_sum: torch.Tensor, model: nn.Module) -> bool:
    """The summed loss and every parameter are finite (one sync)."""
    total = loss_sum.detach().float() + torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    return bool(torch.isfinite(total))


def diverged(cfg: dict, last, epoch: int, step: int) -> TrainingError:
    """The error of a NaN/Inf loss or weight found at (epoch, step); `last`: the checkpoint kept."""
    kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written"
    return TrainingError(
        f"the training loss or a weight is NaN/Inf (epoch {epoch + 1}, by step {step}): training diverged; "
        f"{kept}; lower the learning rate (lr={cfg['lr']}) or check the data"
    )


class _Stop:
    """SIGTERM or a first Ctrl-C (SIGINT) sets a flag; the loop saves a checkpoint and stops at the
    next step that checks it. A second Ctrl-C (SECOND_CTRL_C_S after the first) raises KeyboardInterrupt.

    One process checks after every step (reading a flag). Under DDP every rank must stop at the
    same step, so ranks agree by an all-reduce of the flags every `every` steps and at an epoch's
    last step `steps`, on a gloo group of CPU tensors: the check never waits on the GPU, and costs
    one small CPU collective per `every` steps.

    Python runs a signal handler only between bytecodes, never while the main thread is blocked in
    a collective. A watchdog thread therefore learns of the SIGTERM through the signal's wake-up
    file descriptor, and ends a process that has not stopped STOP_GRACE_S seconds later (exit 143):
    torchrun's SIGTERM to the workers left after a worker died must end them, not leave them
    waiting on the dead one.
    """

    def __init__(self, every: int = 1, steps: int = 0):
        self.flag, self.signum, self.interrupted_at = False, signal.SIGTERM, 0.0
        self.every, self.steps = every, steps
        self.previous, self.previous_fd = {}, None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer, self._restored = writer, threading.Event()
        self.previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="sigterm-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                got = self._reader.recv(64)
            except OSError:
                return
            if not got:
                return
            if signal.SIGTERM in got:
                self.flag = True
                if not self._restored.wait(STOP_GRACE_S):  # restored: the loop stopped in time
                    os._exit(143)
                return

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted_at and time.monotonic() - self.interrupted_at > SECOND_CTRL_C_S:
                raise KeyboardInterrupt
            if not self.interrupted_at and (not dist.is_initialized() or dist.get_rank() == 0):
                print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again: at once)", file=sys.stderr)
            self.interrupted_at = self.interrupted_at or time.monotonic()
        self.flag, self.signum = True, signum

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.previous_fd is not None:
            signal.set_wakeup_fd(self.previous_fd)
            self._restored.set()
            self._writer.close()
            self._reader.close()

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (1-based steps of the epoch)."""
        if self.group is None:
            return self.flag
        if step % self.every and step != self.steps:
            return False
        t = torch.tensor([float(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)  # every rank stops at the same step
        return bool(t.item())
