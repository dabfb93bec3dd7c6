"""The training loop, top-down: set up the run, build (or restore) its state, then per epoch the
steps, the checkpoint and the epoch's end (evaluation, logs, best weights); finally the test split.

Each part lives in a module of its own: train/run.py (process group, run folder, data),
train/state.py (model, optimizer, loaders, checkpoint contents), train/evaluation.py,
train/logs.py, train/timing.py, train/schedule.py, train/stop.py (SIGTERM, Ctrl-C, divergence).
The loop's parts share one `TrainState`, passed explicitly.
"""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, state
from .data import mix_seed
from .evaluation import broadcast_buffers, eval_loader, evaluate
from .logs import Logs, epoch_line, plot_curves
from .run import (
    BEST,
    Data,
    Run,
    barrier,
    close_distributed,
    find_resume,
    load_data,
    prepare_folder,
    start,
    steps_per_epoch,
)
from .schedule import lr_at, set_lr
from .state import TrainState
from .stop import _Stop, diverged
from .timing import EpochMeter


def train(cfg: dict) -> dict:
    """Run (or resume) a training run; returns the last evaluation report (rank 0's view)."""
    run = start(cfg)
    ck, ck_path = find_resume(run)
    data = load_data(run)
    st = state.build(run, data, steps_per_epoch(run, data))
    loader_state = state.restore(run, st, ck, ck_path, data.num_classes) if ck is not None else None
    prepare_folder(run)
    state.wrap(run, st)
    logs = Logs(run.out, cfg, data.num_classes, st.epoch, run.main, st.epoch * st.steps + st.step)
    state.keep_best(st, logs.best)
    stop = _Stop(cfg["stop_check_every"], st.steps)
    _announce(run, data, st)
    state.start_loader(run, st, data, loader_state)
    try:
        _finish_missed_evaluation(run, st, data, logs, ck)
        for epoch in range(st.epoch, cfg["epochs"]):
            meter, row = train_epoch(run, st, logs, stop, epoch)
            # the checkpoint before the evaluation: a crash there loses no training
            state.save(run, st, meter.loss_sum, epoch + 1, 0, row=row)
            finish_epoch(run, st, data, logs, epoch, row)
            st.epoch = epoch + 1
            if cfg["stop_at_epoch"] and st.epoch == cfg["stop_at_epoch"] and st.epoch < cfg["epochs"]:
                run.say(f"stop_at_epoch={st.epoch}: stopping; continue with --resume auto")
                break
    finally:
        stop.restore()
        logs.close()
    return finish_run(run, st, data)


def train_epoch(run: Run, st: TrainState, logs: Logs, stop: _Stop, epoch: int) -> tuple[EpochMeter, dict]:
    """The steps of `epoch` (from a mid-epoch checkpoint's step); returns its sums and training figures."""
    cfg = run.cfg
    skip, carried = st.step, st.partial  # a resumed epoch: the steps and sums before its checkpoint
    st.step, st.partial = 0, {}
    torch.manual_seed(mix_seed(cfg["seed"], epoch, run.rank))
    if st.loader.epoch != epoch:
        st.loader.set_epoch(epoch)
    st.net.train()
    meter = EpochMeter.start(carried, run.device)
    bar = _progress(run.main and cfg["progress"], st.steps - skip, f"epoch {epoch + 1}/{cfg['epochs']}")
    step = skip
    for views, labels in st.loader:
        if step >= st.steps:
            break
        lr = lr_at(cfg, epoch, step, st.steps)
        loss = train_step(run, st, views, labels, lr)
        step += 1
        meter.add(loss, labels.shape[0] * run.world)
        _log_step(run, logs, bar, meter, loss, lr, epoch, step, st.steps)
        if stop.requested(step):
            _stop_now(run, st, meter, bar, epoch, step, stop.signum)
    if bar is not None:
        bar.close()
    return meter, meter.row(epoch, lr_at(cfg, epoch, max(step - 1, 0), st.steps))


def train_step(run: Run, st: TrainState, views: list[torch.Tensor], labels: torch.Tensor, lr: float) -> torch.Tensor:
    """One optimizer step on a batch of V views; returns the (undetached) loss."""
    set_lr(st.optimizer, lr)
    if run.cfg["_channels_last"]:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    loss = st.objective(st.net, views, labels.to(run.device), st.autocast)
    st.optimizer.zero_grad(set_to_none=True)
    if st.scaler is not None:
        st.scaler.scale(loss).backward()
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        loss.backward()
        st.optimizer.step()
    return loss


def _log_step(run: Run, logs: Logs, bar, meter: EpochMeter, loss, lr: float, epoch: int, step: int, steps: int):
    """Progress bar, and every 10 steps: the divergence check and TensorBoard's per-step scalars."""
    if bar is not None:
        bar.update(1)
    if step % 10 and step != steps:
        return
    rate, value = meter.rate(), loss.item()
    if not math.isfinite(value):
        raise diverged(run.cfg, run.checkpoint, epoch, step)
    if bar is not None:
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
    logs.scalar("train/loss", value, epoch * steps + step)
    logs.scalar("train/images_per_s", rate, epoch * steps + step)


def _stop_now(run: Run, st: TrainState, meter: EpochMeter, bar, epoch: int, step: int, signum: int):
    """A SIGTERM or Ctrl-C: the mid-epoch checkpoint (with the epoch's sums so far), then exit 128 + signal."""
    if bar is not None:
        bar.close()
    state.save(run, st, meter.loss_sum, epoch, step, partial=meter.sums())
    what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    run.say(f"{what}: checkpoint saved at epoch {epoch}, step {step} in {run.checkpoint}; continue with --resume auto")
    raise SystemExit(128 + signum)


def finish_epoch(run: Run, st: TrainState, data: Data, logs: Logs, epoch: int, row: dict) -> None:
    """Evaluate the ended epoch (when due), keep the best weights, log its row."""
    report = None
    if (epoch + 1) % run.cfg["eval_every"] == 0 or epoch + 1 == run.cfg["epochs"]:
        broadcast_buffers(st.model)
        if st.val_loader is None:
            st.val_loader = eval_loader(run, data.val)
        report = st.report = evaluate(st.net, run, data, st.val_loader, st.autocast)
        row.update({k: report[k] for k in ("top1", "many", "medium", "few")})
        if report["top1"] > st.best[0]:  # selection on the validation split; its weights kept for the test
            st.best = (report["top1"], epoch + 1)
            if run.main:
                checkpoint.save({"model": st.model.state_dict()}, run.out / BEST, keep_previous=False)
    logs.epoch(row, report["per_class"] if report else None, (epoch + 1) * st.steps)
    run.say(epoch_line(epoch, run.cfg["epochs"], row, report), flush=True)


def _finish_missed_evaluation(run: Run, st: TrainState, data: Data, logs: Logs, ck: dict | None) -> None:
    """A run stopped during an epoch-end evaluation: the checkpoint holds that epoch's training
    figures and metrics.csv has no row for it, so it is evaluated (and logged) now."""
    missed = ck is not None and st.step == 0 and ck.get("row") is not None and st.epoch not in logs.logged
    if run.world > 1:
        flag = [missed]
        dist.broadcast_object_list(flag, src=0)  # rank 0 read metrics.csv
        missed = flag[0]
    if missed:
        run.say(f"epoch {st.epoch}'s evaluation did not finish before the run stopped: running it now")
        finish_epoch(run, st, data, logs, st.epoch - 1, ck["row"])


def finish_run(run: Run, st: TrainState, data: Data) -> dict:
    """Curves, then (all epochs done) the selected weights on the test split, once; result.json."""
    cfg, report = run.cfg, st.report
    if run.main and cfg["plot"]:
        plot_curves(run.out)
    if report:
        report["best_top1"], report["best_epoch"] = st.best
        if data.test is not None and st.epoch == cfg["epochs"]:
            barrier()
            best = checkpoint.load(run.out / BEST, map_location=run.device, log=run.say)[0]
            st.model.load_state_dict(best["model"])
            test = evaluate(st.net, run, data, eval_loader(run, data.test), st.autocast)
            report["test"] = {k: test[k] for k in ("top1", "many", "medium", "few")}
            if run.main:
                result = {"best_epoch": st.best[1], "val_top1": st.best[0], "test": report["test"]}
                (run.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    close_distributed()
    return report


def _announce(run: Run, data: Data, st: TrainState) -> None:
    cfg, counts = run.cfg, data.counts
    groups = np.bincount(np.where(counts > 100, 0, np.where(counts >= 20, 1, 2)), minlength=3)
    run.say(
        f"{cfg['name']}: {len(data.train)} training images, {data.num_classes} classes "
        f"(Many/Medium/Few = {groups[0]}/{groups[1]}/{groups[2]}), {len(data.val)} for evaluation; "
        f"{run.world} rank(s) on {run.device.type}, {st.steps} steps of {cfg['batch_size']} per epoch, "
        f"loss={cfg['loss']}, data_loader={cfg['data_loader']}, output {run.out}"
    )


def _progress(active: bool, total: int, desc: str):
    if not active:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="step")
