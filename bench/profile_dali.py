"""CPU-ms per image of a DALI CPU pipeline cut after each stage of one `randaug_stack` view.

    python bench/profile_dali.py [--data-root /tmp/acl_synthetic_384] [--images 256]

Stages, each pipeline adding one to the previous: decode; random resized crop to 224 + normalise;
colour jitter (p = 0.8); grayscale (p = 0.2) + Gaussian blur (p = 0.5, sigma ~ U(0.1, 2)); RandAugment
(2, 10). One DALI thread, batch 32, CPU time of the whole process over one pass of the files.
"""

from __future__ import annotations

import argparse
import resource
import sys
import warnings
from pathlib import Path

import numpy as np

STAGES = ("decode", "crop", "jitter", "blur", "randaugment")


def cpu_ms_per_image(files: list[Path], stage: str, batch: int = 32) -> float:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    depth = STAGES.index(stage)

    def source(info):
        if info.iteration * batch >= len(files):
            raise StopIteration
        return [np.fromfile(f, np.uint8) for f in files[info.iteration * batch : (info.iteration + 1) * batch]]

    def coin(p):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    @pipeline_def(enable_conditionals=True)
    def pipe():
        x = fn.decoders.image(fn.external_source(source=source, batch=True, batch_info=True), output_type=types.RGB)
        if depth == 0:
            return fn.crop(x, crop=(8, 8))
        x = fn.random_resized_crop(x, size=(224, 224), random_area=[0.08, 1.0])
        if depth >= 2:
            jitter = {k: fn.random.uniform(range=[0.6, 1.4]) for k in ("brightness", "contrast", "saturation")}
            if coin(0.8):
                x = fn.color_twist(x, **jitter)
        if depth >= 3:
            if coin(0.2):
                x = fn.color_twist(x, saturation=0.0)
            if coin(0.5):
                x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[0.1, 2.0]))
        if depth >= 4:
            x = rand_augment.rand_augment(x, n=2, m=10, shape=(224, 224))
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3, std=[255.0] * 3)

    p = pipe(batch_size=batch, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=2)
    p.build()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = usage.ru_utime + usage.ru_stime
    n = sum(out[0]["x"].shape[0] for out in DALIGenericIterator(p, ["x"]))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return 1e3 * (usage.ru_utime + usage.ru_stime - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/acl_synthetic_384"))
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not (args.data_root / "train.txt").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic import make_set

        make_set(args.data_root, max(args.images, 256), 100)
    files = sorted(args.data_root.glob("*.jpg"))[: args.images]
    before = 0.0
    for stage in STAGES:
        total = cpu_ms_per_image(files, stage)
        print(f"{stage:12s} {total:6.2f} CPU-ms/image in all, {total - before:+6.2f} for this stage", flush=True)
        before = total


if __name__ == "__main__":
    main()
