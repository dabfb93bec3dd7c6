"""The Triton backend without a GPU: the interpreter suite (in a subprocess) and the refusals.

TRITON_INTERPRET=1 must be set before triton builds the kernels (at import), so the kernel checks
live in tests/triton_interpret_cases.py and run here in a fresh interpreter-mode process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import unit_rows

from acl_kernels import contrastive_loss

pytest.importorskip("triton")
TESTS = Path(__file__).parent


@pytest.mark.interpret
def test_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton_interpret_cases.py")]
    done = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter suite failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    print(done.stdout.strip().splitlines()[-1])


def _interpreting() -> bool:
    from acl_kernels.ops.contrastive import triton_backend

    return triton_backend.INTERPRET


def test_cpu_without_interpreter_is_refused_clearly():
    if torch.cuda.is_available() or _interpreting():
        pytest.skip("this process can run the kernels")
    z = unit_rows(8, 4)
    y = torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        contrastive_loss(z, y, impl="triton")
    # auto keeps triton for CUDA tensors and serves CPU tensors with the torch backend
    assert torch.isfinite(contrastive_loss(z, y))


def test_refusals():
    from acl_kernels.ops.contrastive import triton_backend

    z = unit_rows(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="float64"):
        contrastive_loss(z, y, impl="triton")
    with pytest.raises(ValueError, match="positive mask"):
        contrastive_loss(z.float(), y, impl="triton", pos_mask=torch.ones(8, 8))
    assert triton_backend.similarity_flops(1024, 1024, 128) == 3 * 2 * 1024 * 1024 * 128
