"""Process memory as a user sees it: the torch path's resident-set growth at N = 16384, d = 128, fp32,
with the default allocator (no MALLOC_* variable), in a fresh process (acl_kernels.demo's child)."""

import os

import pytest

from acl_kernels import demo

LIMIT = 256 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["softmax", "aligned"])
def test_torch_path_rss_growth_at_16384(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "2"
    peak = demo._child(16384, 128, mode, "memory", 1, ["torch"], env)["torch"]
    print(f"{mode}: peak RSS growth of one fwd+bwd {peak / 2**20:.0f} MiB")
    assert peak <= LIMIT, f"peak RSS growth {peak / 2**20:.0f} MiB > {LIMIT / 2**20:.0f} MiB"
