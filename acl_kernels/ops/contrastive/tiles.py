"""Tile tables of the Triton sample kernels, one per GPU family, chosen from the compute capability.

What differs per family (op README, "Tiles per GPU family"): where the MMA accumulators live
(registers on Ampere, Ada and consumer Blackwell, so a [BLOCK_M, BLOCK_N] score tile plus the
backward's [BLOCK_M, D] accumulator must fit in 255 registers per thread; wgmma / tcgen05 on
Hopper / datacenter Blackwell) and the shared memory one block may use. tests/test_triton_families.py
compiles the bf16 defaults at d = 128 of every family in CI, and every entry in its slow test (0
spills for bf16/fp16 at d <= 256, shared memory within the family's limit); the autotune
alternatives of the new families were picked from single compiles and are checked only there.
bench/kernel_cost.py --arch reports what each costs.
"""

import functools
import sys
from typing import NamedTuple


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class Family(NamedTuple):
    name: str
    caps: tuple[int, ...]  # compute capabilities (major * 10 + minor) built for this family
    gpus: str
    mma: str  # how Triton lowers tl.dot there (the SASS instruction family)


FAMILIES = {
    "ampere": Family("ampere", (80, 86, 87), "A100, A30, A10, RTX 30xx, Jetson Orin", "mma.sync (HMMA)"),
    "ada": Family("ada", (89,), "L40S, L4, RTX 4090", "mma.sync (HMMA)"),
    "hopper": Family("hopper", (90,), "H100, H200, GH200", "wgmma (HGMMA)"),
    "blackwell": Family("blackwell", (100, 103), "B200, GB200, B300", "tcgen05 (UTCHMMA)"),
    "blackwell-consumer": Family(
        "blackwell-consumer", (120, 121), "RTX 5090, RTX PRO 6000, DGX Spark", "mma.sync (HMMA)"
    ),  # fmt: skip
}
# Shared memory one block may use (CUDA programming guide, "Technical Specifications per Compute
# Capability"): the tables of a family fit the smallest limit among its capabilities.
SHARED_LIMIT = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227, 120: 99, 121: 99}
SHARED_LIMIT = {cap: kib * 1024 for cap, kib in SHARED_LIMIT.items()}
CAPS = tuple(sorted(SHARED_LIMIT))

# Per family, kernel, element size (2: bf16/fp16, 4: fp32/tf32) and feature-width class: the first
# entry is the default, the rest the autotune set. Hopper: whole-d forward tiles up to D = 256 in
# shared memory, 8-warp backward tiles at D >= 256, 4-byte data with smaller tiles or fewer stages to
# fit 227 KiB. Register-accumulator families (mma.sync): a 128 x 64 backward tile with its
# [128, D] accumulator spills at D = 128 (ptxas, sm_80: 56 / 164 bytes), so 128 x 32 there,
# 32-row tiles at D = 256, and forward tiles within 99 KiB (128 x 128, 3 stages: 97 KiB).
# Datacenter Blackwell: the Hopper tiles spill there (tcgen05 code keeps more state live), so
# 128 x 64 forward and 128 x 32 backward tiles.
_HOPPER = {
    ("fwd", 2): {
        128: [Tiles(128, 128, 8, 3), Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)],
        256: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3), Tiles(128, 128, 8, 1)],
        512: [Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)],
    },
    ("bwd", 2): {
        128: [Tiles(128, 64, 8, 3), Tiles(64, 64, 8, 3), Tiles(128, 32, 8, 3)],
        256: [Tiles(64, 32, 8, 3), Tiles(32, 64, 4, 3), Tiles(64, 32, 8, 2)],
        512: [Tiles(64, 32, 8, 3), Tiles(64, 64, 8, 2), Tiles(64, 32, 8, 2)],
    },
    ("fwd", 4): {
        128: [Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 3), Tiles(128, 32, 8, 3)],
        256: [Tiles(64, 64, 4, 2), Tiles(64, 32, 4, 3)],
        512: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3)],
    },
    ("bwd", 4): {
        128: [Tiles(64, 64, 4, 3), Tiles(128, 32, 8, 3), Tiles(64, 32, 4, 3)],
        256: [Tiles(64, 32, 8, 2), Tiles(32, 64, 4, 2)],
        512: [Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 3)],
    },
}
_REGISTER_MMA = {
    ("fwd", 2): {
        128: [Tiles(128, 128, 8, 3), Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)],
        256: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3), Tiles(64, 128, 8, 2)],
        512: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3)],
    },
    ("bwd", 2): {
        128: [Tiles(128, 32, 8, 3), Tiles(64, 64, 8, 3), Tiles(64, 32, 4, 3)],
        256: [Tiles(32, 64, 4, 3), Tiles(32, 64, 4, 2), Tiles(32, 32, 4, 3)],
        512: [Tiles(64, 32, 8, 2), Tiles(32, 64, 4, 3)],
    },
    ("fwd", 4): {
        128: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3), Tiles(128, 32, 8, 3)],
        256: [Tiles(64, 64, 4, 2), Tiles(64, 32, 4, 3)],
        512: [Tiles(64, 64, 4, 2), Tiles(64, 32, 4, 2)],
    },
    ("bwd", 4): {
        128: [Tiles(64, 64, 4, 2), Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3)],
        256: [Tiles(64, 32, 8, 2), Tiles(32, 64, 4, 2)],
        512: [Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 3)],
    },
}
_BLACKWELL = {
    **_HOPPER,
    ("fwd", 2): {
        128: [Tiles(128, 64, 8, 3), Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3)],
        256: [Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3)],
        512: [Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)],
    },
    ("bwd", 2): {
        128: [Tiles(128, 32, 8, 3), Tiles(64, 64, 8, 3), Tiles(128, 32, 8, 2)],
        256: [Tiles(64, 32, 8, 3), Tiles(32, 64, 4, 3), Tiles(64, 32, 8, 2)],
        512: [Tiles(64, 32, 8, 3), Tiles(64, 64, 8, 2), Tiles(64, 32, 8, 2)],
    },
}
# sm_120 code keeps more live at D = 256 (32 x 64, 4 warps: 12 bytes of spills there, 0 on sm_80).
_CONSUMER_BLACKWELL = {
    **_REGISTER_MMA,
    ("bwd", 2): {
        **_REGISTER_MMA["bwd", 2],
        256: [Tiles(32, 64, 8, 3), Tiles(32, 32, 4, 3)],
    },
}
TILES = {
    "ampere": _REGISTER_MMA,
    "ada": _REGISTER_MMA,
    "hopper": _HOPPER,
    "blackwell": _BLACKWELL,
    "blackwell-consumer": _CONSUMER_BLACKWELL,
}


@functools.cache
def family_of(cap: int) -> str:
    """The family whose tables serve compute capability `cap` (major * 10 + minor). A capability
    the tables do not know takes the nearest older known one (the oldest for older GPUs), and one
    line on stderr says so."""
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        raise ValueError(f"arch: expected a compute capability such as 80 or 120 (major * 10 + minor), got {cap!r}")
    known = max((c for c in CAPS if c <= cap), default=CAPS[0])
    family = next(f.name for f in FAMILIES.values() if known in f.caps)
    if known != cap:
        print(f"acl_kernels: no tile table for sm_{cap}; using the {family} tables (sm_{known})", file=sys.stderr)
    return family


def shared_limit(cap: int) -> int:
    """Bytes of shared memory one block may use on `cap` (a known capability or its stand-in)."""
    return SHARED_LIMIT[max((c for c in CAPS if c <= cap), default=CAPS[0])]
