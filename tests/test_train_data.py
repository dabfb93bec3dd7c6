"""Datasets and loaders: MNIST-LT / CIFAR-LT construction, the same batches from DALI and torchvision,
and the clear errors raised before training (or naming the image that cannot be decoded)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import CACHE, small_cfg

from train import datasets
from train.data import epoch_order, make_loader
from train.datasets import DataError
from train.engine import train


@pytest.fixture(scope="module")
def mnist():
    return datasets.build_mnist_lt(CACHE, 100)


def test_mnist_lt_profile(mnist):
    tr = datasets.read_split(mnist / "train.txt", mnist)
    va = datasets.read_split(mnist / "val.txt", mnist)
    te = datasets.read_split(mnist / "test.txt", mnist)
    assert datasets.class_counts(tr, 10).tolist() == [350, 209, 125, 75, 45, 27, 16, 9, 5, 3]
    assert datasets.class_counts(va, 10).tolist() == [50] * 10  # balanced, selects the epoch
    assert datasets.class_counts(te, 10).tolist() == [100] * 10
    # the same digit never in two splits (the JPEG bytes of a digit are identical wherever it is written)
    digests = [{(s.root / f).read_bytes() for f in s.files} for s in (tr, va, te)]
    assert not (digests[0] & digests[1] or digests[0] & digests[2] or digests[1] & digests[2])
    datasets.check_split(tr, 10)
    with Image.open(tr.full_path(0)) as im:
        assert im.size == (28, 28) and im.format == "JPEG"


def test_cifar_lt_from_local_copy(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):  # 10 images per class per batch: n_max = 50
        labels = np.repeat(np.arange(10), 10)
        data = rng.integers(0, 256, (100, 3072), dtype=np.uint8)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": data, b"labels": labels.tolist()}))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2})
    )
    out = datasets.build_cifar_lt(tmp_path / "cifar", tmp_path / "cache", 10, 10)
    tr = datasets.read_split(out / "train.txt", out)
    assert datasets.class_counts(tr, 10).tolist() == datasets.lt_counts(50, 10, 10)
    assert datasets.lt_counts(50, 10, 10)[0] == 50 and datasets.lt_counts(50, 10, 10)[-1] == 5
    img = np.asarray(Image.open(tr.full_path(0)))
    assert img.shape == (32, 32, 3)
    assert len(datasets.read_split(out / "test.txt", out)) == 20


def test_epoch_order_equal_shards():
    order = epoch_order(103, seed=1, epoch=2, world=3, batch_per_rank=5)
    assert len(order) == 90 and len(set(order.tolist())) == 90
    assert (order == epoch_order(103, 1, 2, 3, 5)).all() and not (order == epoch_order(103, 1, 3, 3, 5)).all()


@pytest.mark.parametrize("loader", ["dali", "pytorch"])
def test_loader_batches(mnist, tmp_path, loader):
    cfg = small_cfg(tmp_path, "--data-loader", loader, "--n-views", "3", "--views", "mnist,center")
    tr = datasets.read_split(mnist / "train.txt", mnist)
    it = iter(make_loader(cfg, tr, train=True, epoch=0, rank=1, world=2, device=torch.device("cpu")))
    views, labels = next(it)
    assert len(views) == 3 and labels.dtype == torch.int64 and labels.shape == (16,)
    for v in views:
        assert v.shape == (16, 3, 28, 28) and v.dtype == torch.float32
    order = epoch_order(len(tr), cfg["seed"], 0, 2, 16)
    assert labels.tolist() == tr.labels[order[len(order) // 2 :][:16]].tolist()  # rank 1's shard, in order
    # view 1 is the centre crop: the same pixels from both loaders up to JPEG decoder rounding
    x = torch.from_numpy(np.asarray(Image.open(tr.full_path(order[len(order) // 2])).convert("RGB"), np.float32))
    expect = (x.permute(2, 0, 1) / 255 - 0.13) / 0.31
    assert (views[1][0] - expect).abs().max() < 0.1


def _tiny_set(tmp_path, lines, n_img=4):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    for i in range(n_img):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(root / f"{i}.jpg")
    (root / "train.txt").write_text(lines)
    (root / "val.txt").write_text("0.jpg 0\n1.jpg 1\n")
    return root


def _split_cfg(tmp_path, root, *args):
    return small_cfg(
        tmp_path,
        "--dataset",
        "split",
        "--data-root",
        str(root),
        "--train-split",
        "train.txt",
        "--val-split",
        "val.txt",
        "--batch-size",
        "2",
        "--num-classes",
        "2",
        *args,
    )


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "does not exist"),
        ("0.jpg 0\n1.jpg\n", "line 2: expected '<relative/path> <integer label>'"),
        ("0.jpg 0\n1.jpg 7\n", "labels outside \\[0, 2\\)"),
        ("0.jpg 0\nmissing.jpg 1\n", "1 of 2 images missing"),
        ("\n\n", "lists no images"),
        ("0.jpg 0\n1.jpg 1\n", "empty training shard"),
    ],
)
def test_clear_errors_before_training(tmp_path, lines, message):
    root = _tiny_set(tmp_path, lines or "")
    if lines is None:
        (root / "train.txt").unlink()
    args = ("--batch-size", "4") if message == "empty training shard" else ()
    with pytest.raises(DataError, match=message):
        train(_split_cfg(tmp_path, root, *args))
    assert not (tmp_path / "mnist_lt_acl" / "checkpoint.pt").exists()


def test_unreadable_split_file(tmp_path):
    root = _tiny_set(tmp_path, "")
    (root / "train.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read split file"):
        train(_split_cfg(tmp_path, root))


@pytest.mark.parametrize("loader", ["dali", "pytorch"])
def test_corrupt_image_is_named(tmp_path, loader):
    root = _tiny_set(tmp_path, "0.jpg 0\n1.jpg 1\n2.jpg 0\nbroken.jpg 1\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)
    with pytest.raises(DataError, match="broken.jpg"):
        train(_split_cfg(tmp_path, root, "--data-loader", loader, "--workers", "0" if loader == "pytorch" else "1"))


@pytest.mark.parametrize("loader", ["dali", "pytorch"])
def test_every_recipe_builds(mnist, tmp_path, loader):
    recipes = "simclr,randaug,randaug_stack,cifar_strong,cifar_simclr,mnist,center"
    cfg = small_cfg(
        tmp_path,
        "--data-loader",
        loader,
        "--n-views",
        "7",
        "--views",
        recipes,
        "--image-size",
        "32",
        "--eval-resize",
        "36",
        "--randaug-n",
        "3",
    )
    tr = datasets.read_split(mnist / "train.txt", mnist)
    views, labels = next(iter(make_loader(cfg, tr, train=True, epoch=0, rank=0, world=1, device=torch.device("cpu"))))
    assert len(views) == 7 and labels.shape == (32,)
    for v in views:
        assert v.shape == (32, 3, 32, 32) and torch.isfinite(v).all()
