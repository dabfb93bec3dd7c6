"""impl='triton' over a process group (gloo, CPU, Triton interpreter) against one process.

The spawned ranks inherit TRITON_INTERPRET=1 from birth (it must be set before triton is
imported, and unpickling this module's worker already imports it), then run the preset cases of
tests/test_distributed.py (SupCon all/one, PaCo, GPaCo, ACL batch/prior, reduction='none' with
centres) with impl='triton': value and every gradient equal the single-process triton result on
the concatenated batch (relative 1e-5). The sizes give more than one 64-row tile of output rows
and of columns, with a tile that holds both anchors and other rows.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import CASES

pytest.importorskip("triton")

SIZES = (40, 27)  # uneven; more than one 64-row tile of rows and of columns


def _worker(rank, world, store, seed, sizes):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from acl_kernels.ops.contrastive import triton_backend

    assert triton_backend.INTERPRET, "TRITON_INTERPRET=1 did not reach the spawned process"
    triton_backend.POISON = True  # unwritten outputs fail as NaN
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for i, (case, kw) in enumerate(CASES):
            case(rank, world, torch.Generator().manual_seed(seed + i), "triton", list(sizes), **kw)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.interpret
def test_two_processes_triton(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the children's environment, set before they start
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "store"), seed, SIZES), nprocs=2, join=True, start_method="spawn"
    )
