"""Compile every kernel configuration the Triton launchers can select for sm_90 (H100), without a GPU.

The interpreter cannot catch what only the compiler sees (layouts, dot operand types, shared
memory, register spills); `triton.compile` with an explicit target runs the whole pipeline down to
a cubin on CPU. triton_backend.compile_set() lists every autotune config of every width class and
mode per element size (the test checks that it covers the tile tables); the configs are compiled in two
processes, resources read from the ptxas log (bench/kernel_cost.compile_spec).
"""

import time

import pytest

pytestmark = pytest.mark.sm90

SHARED_LIMIT = 227 * 1024  # one H100 SM has 228 KiB of shared memory, 227 KiB usable by one block
# The other families: tests/test_triton_families.py.


def test_compile_set_covers_every_tile_config(kernel_cost):
    """Every entry of the tile tables, for each element size (bf16 stands for 2-byte data, tf32 for
    4-byte data: fp16 and ieee fp32 share their tables and use the same shared memory or less), every
    width class and mode; fp16 and fp32 themselves with the default tiles."""
    from acl_kernels.ops.contrastive import triton_backend as tb

    built = {
        (s.info["kernel"], s.info["dtype"], tb.width_class(tb.feature_block(s.info["d"])), s.info["mode"],
         s.info["block_m"], s.info["block_n"], s.options["num_warps"], s.options["num_stages"])
        for s in tb.compile_set() if s.info["kernel"] in ("fwd", "bwd")
    }  # fmt: skip
    wanted = [
        (kind, name, width, mode, *t)
        for (kind, size), table in tb.TILES["hopper"].items()
        for width, tiles in table.items()
        for name in {2: ("bf16",), 4: ("tf32",)}[size]
        for mode in ("softmax", "aligned")
        for t in tiles
    ] + [
        (kind, name, 128, mode, *tb.tile_set(kind, tb.DTYPE_NAMES[name][0], 128, 90)[0])
        for kind in ("fwd", "bwd")
        for name in ("fp16", "fp32")
        for mode in ("softmax", "aligned")
    ]
    missing = [w for w in wanted if w not in built]
    assert not missing, f"compile_set() misses these launcher configs: {missing}"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32", "fp32"])
def test_every_launcher_config_compiles_for_sm90(kernel_cost, dtype):
    from acl_kernels.ops.contrastive import triton_backend as tb

    specs = [s for s in tb.compile_set() if s.info["dtype"] == dtype]
    t0 = time.time()
    failures = []
    for spec, res in kernel_cost.compile_many(specs, jobs=2, sass=False):
        what = kernel_cost.describe(spec)
        if isinstance(res, Exception):
            failures.append(f"{what}: does not compile: {res}")
            continue
        if not res.has_cubin:
            failures.append(f"{what}: no cubin")
        if res.shared_bytes > SHARED_LIMIT:
            failures.append(f"{what}: shared memory {res.shared_bytes} B > {SHARED_LIMIT} B")
        # half data with whole-d tiles (d <= 256; the centre kernels too) must not spill registers
        if dtype in ("bf16", "fp16") and (spec.info["d"] or 0) <= tb.WHOLE_D_MAX and res.spill_bytes:
            failures.append(f"{what}: {res.spill_bytes} bytes of register spill stores")
    print(f"compiled {len(specs)} {dtype} specialisations in {time.time() - t0:.1f}s")
    assert specs
    assert not failures, f"{len(failures)} of {len(specs)} {dtype} configs fail:\n" + "\n".join(failures)
