"""Argument checks with errors that name the argument and say what was expected."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, ndim: int | None = None, floating: bool | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating is True and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if floating is False and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer class indices, got {x.dtype}")
    return x


def same_device(name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def labels(name: str, y, n: int, ref: Tensor, num_classes: int | None) -> Tensor:
    y = tensor(name, y, floating=False)
    if y.dim() != 1:
        y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one label per row), got {tuple(y.shape)}")
    same_device(name, y, ref, "features")
    if n and not torch.compiler.is_compiling():  # reading values would break a compiled graph
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise ValueError(f"{name} must be >= 0, found {lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{name} must be < num_classes={num_classes}, found {hi}")
        if hi >= 2**31:  # the kernels and a process group's gather hold class indices as int32
            raise ValueError(f"{name} must be < 2^31 (class indices, stored as int32), found {hi}")
    return y.long()


def number(name: str, v) -> float:
    """A finite real number (int, float, or a one-element tensor); NaN and +-inf are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)) or (isinstance(v, Tensor) and v.numel() != 1):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) v is a symbolic float
    if not -math.inf < v < math.inf:
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def positive(name: str, v: float) -> float:
    v = number(name, v)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def non_negative(name: str, v: float) -> float:
    v = number(name, v)
    if not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def count(name: str, v, minimum: int) -> int:
    """An int >= minimum (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def choice(name: str, v: str, options: tuple[str, ...]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
    return v


def finite(name: str, x: Tensor | None) -> None:
    if x is None or torch.compiler.is_compiling():  # a data-dependent branch would break a compiled graph
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} holds {bad} NaN/Inf values; fix the model/input (or pass check_finite=False, to "
            "contrastive_loss or to a preset's constructor, to skip this check)"
        )
