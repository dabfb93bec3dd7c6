"""A synthetic ImageNet-like JPEG set: photo-sized images with structure (smooth gradients, shapes,
texture, edges), so decoding and augmentation cost what they cost on real photos, not on noise.

    python bench/synthetic.py OUT_DIR --images 512 --classes 100

writes OUT_DIR/<i>.jpg and OUT_DIR/train.txt / val.txt ("<file> <label>" lines, long-tailed labels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# ImageNet training images are mostly about 500 x 375 (either orientation) or 500 x 333
_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480))


def synthetic_image(rng: np.random.Generator):
    """One PIL RGB image: a colour gradient, 6-20 filled shapes, fine texture, a slight blur."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = _SIZES[rng.integers(len(_SIZES))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 0.5
    base = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    base += rng.normal(0, 24, (h, w, 3)) + 12 * np.sin(xx / rng.uniform(2, 9) + yy / rng.uniform(3, 11))[..., None]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 21)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill, outline=(0, 0, 0))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 0.4)))


def make_set(out: Path, images: int, classes: int, seed: int = 0) -> Path:
    """Write the set (if OUT/train.txt is not there yet) and return OUT."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "train.txt").is_file() and len(list(out.glob("*.jpg"))) == images:
        return out
    rng = np.random.default_rng(seed)
    weights = np.exp(-np.arange(classes) / max(classes / 4.6, 1))  # about 100 : 1 head to tail
    labels = rng.choice(classes, size=images, p=weights / weights.sum())
    for i in range(images):
        synthetic_image(rng).save(out / f"{i}.jpg", quality=90)
    lines = "".join(f"{i}.jpg {labels[i]}\n" for i in range(images))
    (out / "train.txt").write_text(lines)
    (out / "val.txt").write_text(lines)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    make_set(args.out, args.images, args.classes)
    sizes = [p.stat().st_size for p in args.out.glob("*.jpg")]
    print(f"{len(sizes)} images in {args.out}, median {np.median(sizes) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
