"""Checks of the images and labels before training, so bad data stops the run with its file names.

DALI's decoder can crash the process (a segfault, exit 139) on an undecodable file, without naming
it. So every image of both splits is decoded once with PIL before training (JPEGs at reduced
scale: the whole compressed stream is still read), in `workers` threads. A clean pass writes a
stamp under `cache_dir/image_checks/`, keyed by the split file's contents, the data root and each
image's size and modification time: a second run with the same files skips the decoding (it only
stats the files). Any bad image stops the run with a `DataError` listing them; remove or replace
them (or set `check_images: false` to skip the check at your own risk).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .datasets import DataError, Split

SHOWN = 10  # bad files named in the message


def _decodes(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # PIL raises many kinds for damaged data
        return False


def stamp_key(split: Split) -> str:
    """Digest of what the check depends on: the split file, the root and every image's size and mtime."""
    h = hashlib.sha256()
    h.update(str(split.path.resolve()).encode() + b"\0" + split.path.read_bytes() + b"\0")
    h.update(str(split.root.resolve()).encode() + b"\0")
    for f in split.files:
        st = os.stat(split.root / f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def check_images(split: Split, cache_dir: str | os.PathLike, workers: int = 4) -> bool:
    """Raise DataError naming every image of `split` PIL cannot decode. Returns False when a stamp
    showed the same files passed before (nothing decoded), True after a full check."""
    stamp = Path(cache_dir) / "image_checks" / stamp_key(split)
    if stamp.is_file():
        return False
    paths = [split.root / f for f in split.files]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ok = list(pool.map(_decodes, paths, chunksize=64))
    bad = [str(p) for p, good in zip(paths, ok) if not good]
    if bad:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DataError(
            f"{split.path}: {len(bad)} of {len(split)} images cannot be decoded: {bad[:SHOWN]}{more}; "
            "replace them or remove their lines (set check_images false to skip this check)"
        )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{split.path}: {len(split)} images decoded\n")
    return True


def describe_classes(train: Split, num_classes: int, named: bool) -> str:
    """One line on the classes: inferred or named count, and classes without training images."""
    counts = np.bincount(train.labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    source = "set by num_classes" if named else f"inferred from the training labels (max label {num_classes - 1})"
    line = f"{num_classes} classes {source}"
    if empty:
        shown = empty[:SHOWN] + (["..."] if len(empty) > SHOWN else [])
        line += f"; {len(empty)} have no training image: {shown} (a typo in a label?)"
    return line
