"""One augmented view in a DALI pipeline, per recipe (train/data.py lists them; train/torch_loader.py
makes the same views with torchvision). Every view of a pipeline is made by `dali_view`.

The operators are created in a fixed order per recipe: DALI seeds each random operator from the
pipeline's seed in creation order, so reordering them changes the augmentations of a seed.
"""

from __future__ import annotations

from .data import CROP_SCALE, CUTOUT, RANDAUG_BINS, fill_level


def _coin(p):
    from nvidia.dali import fn, types

    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _jitter(x, b, c, s, h, p):
    """Colour jitter of torchvision's factors (brightness, contrast, saturation, hue) with probability p."""
    from nvidia.dali import fn

    kw = {}
    for key, amount, lo in (
        ("brightness", b, 1.0),
        ("contrast", c, 1.0),
        ("saturation", s, 1.0),
        ("hue", h * 360.0, 0.0),
    ):  # hue in degrees: torchvision's hue factor h is a fraction of the full circle
        if amount:
            kw[key] = fn.random.uniform(range=[lo - amount, lo + amount])
    if _coin(p):
        x = fn.color_twist(x, **kw)
    return x


def _grayscale(x, p):
    from nvidia.dali import fn

    if _coin(p):
        x = fn.color_twist(x, saturation=0.0)
    return x


def _blur(x, p):
    from nvidia.dali import fn

    if _coin(p):
        # sigma ~ U(0.1, 2) as the official code (PIL); DALI sizes the window per sample: 2 ceil(3 sigma) + 1
        x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[0.1, 2.0]))
    return x


def _equalize(data, _):
    from nvidia.dali import fn

    return fn.equalize(data)


def _sharpness(data, kernel):
    from nvidia.dali import fn

    return fn.filter(data, kernel)


# DALI's augmentation library still calls these two operators by their deprecated `fn.experimental`
# names (a warning per pipeline); the same operators under their current names
_CURRENT = {"equalize": _equalize, "sharpness": _sharpness}


def _current(aug):
    """`aug` (a DALI auto_aug augmentation) calling its operator by the current name, same parameters."""
    from nvidia.dali.auto_aug.core import augmentation

    if aug.name not in _CURRENT:
        return aug
    params = ("mag_range", "randomly_negate", "mag_to_param", "param_device", "name")
    return augmentation(_CURRENT[aug.name], **{k: getattr(aug, k) for k in params})


def _current_policy(policy):
    from nvidia.dali.auto_aug.core import Policy

    subs = [[(_current(a), p, m) for a, p, m in sub] for sub in policy.sub_policies]
    return Policy(policy.name, policy.num_magnitude_bins, subs)


def _cifar_strong(images, size: int, fill: int):
    """Padded random crop, flip, AutoAugment (CIFAR policy), Cutout."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import auto_augment

    anchor = fn.random.uniform(range=[-4, 5], dtype=types.INT32, shape=2)
    images = fn.slice(images, anchor, (size, size), axis_names="WH", out_of_bounds_policy="pad", fill_values=0)
    images = fn.flip(images, horizontal=fn.random.coin_flip())
    # the CIFAR policy's translate range, as torchvision's
    policy = auto_augment.get_reduced_cifar10_policy(use_shape=True, max_translate_rel=150 / 331)
    images = auto_augment.apply_auto_augment(
        _current_policy(policy), images, shape=(size, size), fill_value=fill, interp_type=types.INTERP_LINEAR
    )
    centre = fn.random.uniform(range=[0, size], shape=2, dtype=types.INT32)  # as _Cutout: clipped square
    anchor = fn.cast(centre, dtype=types.FLOAT) - CUTOUT // 2
    return fn.erase(images, anchor=anchor, shape=(CUTOUT, CUTOUT), axis_names="HW", fill_value=0)


def _randaugment_suite():
    """timm's 15 RandAugment operations at timm's magnitudes (bin RANDAUG_BINS - 1 = full strength)."""
    from nvidia.dali.auto_aug import augmentations, rand_augment

    suite = rand_augment.get_rand_augment_non_monotonic_suite(use_shape=True, max_translate_rel=0.45)
    suite = [_current(a) for a in suite if a.name != "identity"]
    return suite + [augmentations.invert, augmentations.solarize_add]


def _randaug(images, recipe: str, size: int, fill: int, n: int, m: int):
    """Flip, colour jitter (grayscale and blur for randaug_stack), then n RandAugment layers, each p = 0.5."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    images = fn.flip(images, horizontal=fn.random.coin_flip())
    images = _jitter(images, 0.4, 0.4, 0.4, 0.0, 1.0)
    if recipe == "randaug_stack":
        images = _blur(_grayscale(images, 0.2), 0.5)
    suite = _randaugment_suite()
    for _ in range(n):  # timm applies each of the n chosen operations with p = 0.5
        if _coin(0.5):
            images = rand_augment.apply_rand_augment(
                suite,
                images,
                n=1,
                m=m,
                num_magnitude_bins=RANDAUG_BINS,
                shape=(size, size),
                fill_value=fill,
                interp_type=types.INTERP_LINEAR,
            )
    return images


def _cropped(images, recipe: str, size: int, fill: int, n: int, m: int):
    """The random-resized-crop recipes; returns (images, mirror: a coin flip node or 0)."""
    from nvidia.dali import fn

    ratio = [0.8, 1.25] if recipe == "mnist" else [3 / 4, 4 / 3]
    images = fn.random_resized_crop(
        images, size=(size, size), random_area=[CROP_SCALE[recipe], 1.0], random_aspect_ratio=ratio
    )
    if recipe == "mnist":
        return _jitter(images, 0.4, 0.4, 0.0, 0.0, 0.8), 0
    if recipe == "simclr":
        return _blur(_grayscale(_jitter(images, 0.4, 0.4, 0.4, 0.0, 1.0), 0.2), 0.5), fn.random.coin_flip()
    if recipe == "cifar_simclr":
        return _grayscale(_jitter(images, 0.4, 0.4, 0.4, 0.1, 0.8), 0.2), fn.random.coin_flip()
    return _randaug(images, recipe, size, fill, n, m), 0


def dali_view(images, recipe: str, image_size: int, mean, std, randaug_n: int, randaug_m: int, eval_resize: int):
    """One view of `images` (uint8 HWC) by `recipe`: float32 CHW, normalised by mean / std (0-1 scale)."""
    from nvidia.dali import fn, types

    fill, mirror = fill_level(mean), 0
    if recipe == "center":
        images = fn.crop(fn.resize(images, resize_shorter=eval_resize), crop=(image_size, image_size))
    elif recipe == "cifar_strong":
        images = _cifar_strong(images, image_size, fill)
    else:
        images, mirror = _cropped(images, recipe, image_size, fill, randaug_n, randaug_m)
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mirror=mirror,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
    )
