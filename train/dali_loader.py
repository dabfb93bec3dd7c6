"""The DALI loader: one pipeline per rank, decoding and augmenting every view (train/data.py: order,
shards, recipes).

The pipeline is built once and reset at each epoch (building costs seconds). Its external source
hands it the encoded files of the epoch's order batch by batch, read ahead by a thread pool, so
the order can change per epoch without a rebuild. A file DALI cannot decode stops the run with a
`DataError` naming it: the files of the batches in flight are decoded again one by one.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .dali_views import dali_view
from .data import Sharding, mix_seed
from .datasets import DataError, Split


def _dali_pipeline(source, recipes, decode_device, opts, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def pipe():
        jpegs, y = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        views = [dali_view(images, r, **opts) for r in recipes]
        return (*views, y.gpu() if decode_device == "mixed" else y)  # on the GPU: no blocking copy per step

    return pipe(**pipe_kwargs)


TRUNCATED = "truncated: the file has no end-of-image marker"


def truncated(data: np.ndarray) -> bool:
    """Whether an encoded JPEG or PNG lacks its end (JPEG's EOI marker, PNG's IEND chunk) in its last
    4 KiB. DALI's CPU decoder crashes the whole process on some truncated JPEGs instead of raising,
    so such a file never reaches it."""
    head, tail = data[:8].tobytes(), data[-4096:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    return False


def undecodable(paths: list[Path], decode_device: str, device_id) -> list[tuple[Path, str]]:
    """(file, reason) for each of `paths` that is truncated or that DALI's image decoder refuses,
    decoding them one by one."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def one():
        return fn.decoders.image(fn.external_source(name="file"), device=decode_device, output_type=types.RGB)

    bad, pipe = [], None
    for path in paths:
        data = np.fromfile(path, np.uint8)
        if truncated(data):
            bad.append((path, TRUNCATED))
            continue
        if pipe is None:  # a failed run leaves the pipeline unusable: a new one after each failure
            pipe = one()
            pipe.build()
        try:
            pipe.feed_input("file", [data])
            pipe.run()
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines()]
            bad.append((path, next((x for x in lines if "failure" in x.lower()), "DALI's decoder refuses it")))
            pipe = None
    return bad


def dali_reason(error: Exception) -> str:
    """The failing operator and the first line of its report, out of DALI's multi-line error text."""
    text = str(error)
    op = re.search(r"Error in \w+ operator `([^`]+)`", text)
    report = text.split("encountered:", 1)[-1]
    lines = [x.strip() for x in report.splitlines() if x.strip() and not x.strip().startswith("C++ context")]
    what = lines[0] if lines else "no reason given"
    return f"{op.group(1)}: {what}" if op else what


def _weak_source(loader: DaliLoader) -> Callable:
    """loader._source through a weak reference. A bound method would make loader -> pipeline ->
    source -> loader a cycle, freed only by the cyclic garbage collector, which may then run in a
    forked DataLoader worker, where destroying the DALI pipeline (its threads gone) hangs."""
    ref = weakref.ref(loader)

    def source(info):
        return ref()._source(info)

    return source


class DaliLoader:
    """This rank's shard of every epoch (or of the evaluation set) through one DALI pipeline.

    DALI prefetches `prefetch` batches ahead. state() is a DALI checkpoint (random generators and
    position): a new loader restored from it continues exactly, mid-epoch too.
    """

    def __init__(
        self,
        split: Split,
        sharding: Sharding,
        recipes: list[str],
        cfg: dict,
        device: torch.device,
        epoch: int = 0,
        skip: int = 0,
        state: dict | None = None,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.split, self.sharding = split, sharding
        self.first_epoch = state["first_epoch"] if state else epoch
        self.read_ahead = cfg["prefetch"]
        self._pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="read-ahead")
        self._reads: dict[tuple[int, int], Future] = {}
        self._handed: list[tuple[int, int]] = []  # (epoch, step) of the batches given to DALI, not yet out
        gpu = device.type == "cuda"
        self.decode_device, self.device_id = ("mixed" if gpu else "cpu"), (device.index or 0 if gpu else None)
        opts = {k: cfg[k] for k in ("image_size", "mean", "std", "randaug_n", "randaug_m", "eval_resize")}
        self.pipe = _dali_pipeline(
            _weak_source(self),
            recipes,
            self.decode_device,
            opts,
            batch_size=sharding.batch,
            num_threads=max(1, cfg["workers"]),
            device_id=self.device_id,
            seed=mix_seed(cfg["seed"], epoch, sharding.rank, int(sharding.train)),
            prefetch_queue_depth=cfg["prefetch"],
            checkpoint=state["dali"] if state else None,
        )
        self.pipe.build()
        self.n_views = len(recipes)
        try:  # the iterator runs the pipeline's first batches already
            self.iterator = DALIGenericIterator(self.pipe, [f"v{i}" for i in range(len(recipes))] + ["label"])
        except RuntimeError as e:
            raise self._decode_error(e) from e
        self.epoch, self.skip, self.at_end = epoch, skip, False
        self.replay = 0 if state else skip  # restored: the pipeline is already at step `skip`

    def _read(self, epoch: int, step: int):
        idx = self.sharding.batch_indices(epoch, step)
        files = [np.fromfile(self.split.full_path(int(i)), np.uint8) for i in idx]
        bad = [(self.split.full_path(int(i)), TRUNCATED) for i, f in zip(idx, files) if truncated(f)]
        if bad:
            raise self._unreadable(bad)
        return files, [np.array([self.split.labels[i]], np.int64) for i in idx]

    def _source(self, info):
        """The encoded files and labels of batch `info.iteration` of the pipeline's epoch `info.epoch_idx`.

        DALI calls this on the training loop's thread; the files of this and the next `prefetch`
        batches are read by a thread pool, so the loop does not wait on storage.
        """
        epoch = self.first_epoch + info.epoch_idx
        steps = self.sharding.steps(epoch)
        if info.iteration >= steps:
            raise StopIteration
        for step in range(info.iteration, min(steps, info.iteration + 1 + self.read_ahead)):
            if (epoch, step) not in self._reads:
                self._reads[(epoch, step)] = self._pool.submit(self._read, epoch, step)
        self._handed.append((epoch, info.iteration))
        return self._reads.pop((epoch, info.iteration)).result()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` next, from its step `skip`; epochs follow one another (the pipeline's own count)."""
        following = self.epoch + 1 if self.at_end else self.epoch
        if epoch != following:
            raise ValueError(f"set_epoch({epoch}): this DALI pipeline continues with epoch {following}")
        self.epoch, self.skip, self.replay = epoch, skip, skip

    def state(self) -> dict:
        return {"first_epoch": self.first_epoch, "dali": self.iterator.checkpoints()[0]}

    def __len__(self) -> int:
        return self.sharding.steps(self.epoch) - self.skip

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if self.at_end:
            self.iterator.reset()
            self.at_end = False
        step = 0
        it = iter(self.iterator)
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                self.at_end = True
                return
            except RuntimeError as e:
                raise self._decode_error(e) from e
            if self._handed:
                self._handed.pop(0)
            step += 1
            if step <= self.replay:  # a resume without the pipeline's state: replay the skipped batches
                continue
            yield [out[f"v{i}"] for i in range(self.n_views)], out["label"].reshape(-1).long()

    def _decode_error(self, error: RuntimeError) -> Exception:
        """The error of a failed pipeline run: the undecodable files of the batches in flight, named;
        if they all decode, what DALI reported."""
        paths = [self.split.full_path(int(i)) for e, s in self._handed for i in self.sharding.batch_indices(e, s)]
        bad = undecodable(paths, self.decode_device, self.device_id)
        if not bad:
            return RuntimeError(
                f"the DALI pipeline failed, and each of the {len(paths)} files of its batches in flight decodes "
                f"on its own: {dali_reason(error)}"
            )
        return self._unreadable(bad)

    def _unreadable(self, bad: list[tuple[Path, str]]) -> DataError:
        what = "training" if self.sharding.train else "evaluation"
        names = "; ".join(f"{p} ({why})" for p, why in bad)
        return DataError(
            f"DALI cannot decode {len(bad)} {what} image(s): {names}. Replace them or remove their lines from the "
            f"split file (--check-images true, the default, lists before training the files PIL cannot decode)"
        )
