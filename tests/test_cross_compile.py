"""csrc/ builds for Arm (GH200 / GB200 hosts): cross-compiled with Debian's g++-aarch64-linux-gnu
where it is installed (`apt-get install -y g++-aarch64-linux-gnu`), skipped elsewhere. The portable
tile loops are the only copy there; the AVX2 + FMA copy exists on x86-64 only."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CXX = "aarch64-linux-gnu-g++"
CSRC = Path(__file__).resolve().parents[1] / "csrc"
EM_AARCH64 = 183  # ELF e_machine


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} is not installed")
def test_native_kernel_cross_compiles_for_aarch64(tmp_path):
    from torch.utils.cpp_extension import include_paths

    obj = tmp_path / "contrastive_cpu.o"
    flags = ["-std=c++20", "-O2", "-fPIC", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-w"]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [CXX, *flags, *includes, "-DTORCH_EXTENSION_NAME=_C", "-c", str(CSRC / "contrastive_cpu.cpp"), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-5000:]}"
    data = obj.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == EM_AARCH64
    assert b"isa_default" in data and b"isa_avx2" not in data  # one portable copy of the tile loops
