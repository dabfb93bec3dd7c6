"""The wheel installs `acl_kernels` and `acl_train`, never a top-level `train` that would shadow a
user's own train.py or train/ folder; the `acl-train` script and `python -m train` (checkout) both run."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


@pytest.mark.slow
def test_wheel_in_fresh_venv_ships_no_train_package(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked sources")
    # build from a copy of the tracked files: no build/ or *.egg-info of the checkout leaks in
    src = tmp_path / "src"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], REPO).split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], tmp_path)
    (wheel,) = wheels.glob("acl_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith("-info")}
    assert tops == {"acl_kernels", "acl_train"}, tops
    assert "acl_train/configs/imagenet_lt_r50.yaml" in names and "acl_kernels/ops/contrastive/__init__.py" in names

    # a fresh venv; its dependencies (numpy, yaml, torch) come from this interpreter's site-packages
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert not (site / "train").exists() and not (site / "train.py").exists()

    # a user project with its own train/ package: its import still finds the user's module
    user = tmp_path / "project"
    (user / "train").mkdir(parents=True)
    (user / "train" / "__init__.py").write_text("WHO = 'user'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(py), "-c", "import train, acl_train.config as c; print(train.WHO, c.__file__)"], user, env)
    assert out.startswith("user ") and str(site) in out
    assert "--batch-size" in _run([str(env_dir / "bin" / "acl-train"), "--help"], user, env)
    # and from the checkout, `python -m train` still runs the sources in place
    assert "--batch-size" in _run([sys.executable, "-m", "train", "--help"], REPO, env)
