"""The tile tables of every GPU family, compiled for that family without a GPU.

`GPUTarget("cuda", cap, 32)` runs Triton's whole pipeline down to a cubin on CPU, so what only the
compiler sees (register spills, shared memory, the tensor-core instructions) is checked for
Ampere, Ada, datacenter Blackwell and consumer Blackwell here, and for Hopper in
test_triton_sm90.py. CI compiles a representative subset (the default tiles at d = 128, bf16,
both modes, forward and backward: about a minute per family on 2 cores); the whole matrix (every
config of every width class and data type, centre kernels) is the `slow` test, run where
ACL_KERNELS_LONG_TESTS=1:

    ACL_KERNELS_LONG_TESTS=1 python -m pytest -q -m slow tests/test_triton_families.py
"""

import itertools
import os
import time

import pytest

pytest.importorskip("triton")

from acl_kernels.ops.contrastive import tiles  # noqa: E402

# One capability per family besides Hopper (sm_90 has its own test); shared memory is checked
# against the smallest limit among the family's capabilities (the tables serve all of them).
FAMILY_CAPS = [80, 89, 100, 120]


def _family_limit(cap: int) -> int:
    return min(tiles.SHARED_LIMIT[c] for c in tiles.FAMILIES[tiles.family_of(cap)].caps)


def test_every_capability_has_a_family_and_unknown_ones_take_the_nearest_older(capsys):
    for family in tiles.FAMILIES.values():
        for cap in family.caps:
            assert tiles.family_of(cap) == family.name
    assert capsys.readouterr().err == ""
    assert (tiles.family_of(88), tiles.family_of(110), tiles.family_of(130)) == (
        "ampere",
        "blackwell",
        "blackwell-consumer",
    )
    assert tiles.family_of(75) == "ampere"  # older than every table: the oldest
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and "sm_110" in lines[1] and "blackwell tables (sm_103)" in lines[1]
    tiles.family_of(110)  # said once per capability
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="arch: expected a compute capability"):
        tiles.family_of("sm_90")


def test_specialisations_use_the_family_tables():
    from acl_kernels.ops.contrastive import triton_backend as tb

    for cap in (80, 86, 89, 90, 100, 120, 121):
        table = tiles.TILES[tiles.family_of(cap)]
        for spec in tb.specialisations(("bf16", "tf32"), (128, 256, 512), centres=(False,), arch=cap):
            i = spec.info
            size = tb.DTYPE_NAMES[i["dtype"]][0].itemsize
            first = table[i["kernel"], size][tb.width_class(tb.feature_block(i["d"]))][0]
            assert i["arch"] == cap
            assert (i["block_m"], i["block_n"], spec.options["num_warps"], spec.options["num_stages"]) == first


def _check(kernel_cost, specs, cap):
    from acl_kernels.ops.contrastive import triton_backend as tb

    limit = _family_limit(cap)
    failures = []
    for spec, res in kernel_cost.compile_many(specs, jobs=2, sass=True):
        what = f"sm_{cap} {kernel_cost.describe(spec)}"
        if isinstance(res, Exception):
            failures.append(f"{what}: does not compile: {res}")
            continue
        if res.shared_bytes > limit:
            failures.append(f"{what}: shared memory {res.shared_bytes} B > {limit} B")
        half = spec.info["dtype"] in ("bf16", "fp16")
        if half and (spec.info["d"] or 0) <= tb.WHOLE_D_MAX and res.spill_bytes:
            failures.append(f"{what}: {res.spill_bytes} bytes of register spill stores")
        if half and spec.info["d"] and not res.mma:
            failures.append(f"{what}: the dots do not reach the tensor cores (no MMA instruction in the SASS)")
    return failures


@pytest.mark.sm90
@pytest.mark.parametrize("cap", FAMILY_CAPS)
def test_default_tiles_compile_without_spills(kernel_cost, cap):
    from acl_kernels.ops.contrastive import triton_backend as tb

    specs = list(tb.specialisations(("bf16",), (128,), centres=(False,), arch=cap))
    t0 = time.time()
    failures = _check(kernel_cost, specs, cap)
    print(f"sm_{cap}: {len(specs)} specialisations in {time.time() - t0:.0f}s")
    assert not failures, "\n".join(failures)


def family_matrix(cap: int) -> list:
    """Every config of every width class for bf16, fp16 and tf32, fp32's defaults, the centre
    variants and the centre kernels, each specialisation once."""
    from acl_kernels.ops.contrastive import triton_backend as tb

    seen, out = set(), []
    for spec in itertools.chain(
        tb.compile_set(cap),
        tb.specialisations(("fp16",), (128, 256), centres=(False,), all_tiles=True, arch=cap),
    ):
        key = (spec.kernel, str(spec.signature), str(spec.constexprs), str(spec.options))
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


@pytest.mark.slow
@pytest.mark.sm90
@pytest.mark.skipif(os.environ.get("ACL_KERNELS_LONG_TESTS") != "1", reason="set ACL_KERNELS_LONG_TESTS=1")
@pytest.mark.parametrize("cap", FAMILY_CAPS)
def test_every_config_of_the_family_compiles(kernel_cost, cap):
    specs = family_matrix(cap)
    t0 = time.time()
    failures = _check(kernel_cost, specs, cap)
    print(f"sm_{cap}: {len(specs)} specialisations in {time.time() - t0:.0f}s")
    assert not failures, f"{len(failures)} of {len(specs)} fail:\n" + "\n".join(failures)
