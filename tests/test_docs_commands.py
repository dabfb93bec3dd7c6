"""Every command the README and docs/ show runs: each one, made tiny (few images, steps and sizes,
outputs under tmp_path), ends with exit 0. A command added to the docs without a tiny form here fails."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_common import CACHE

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAIN_TINY = [
    *("--epochs", "1", "--max-steps", "1", "--max-eval-batches", "1", "--batch-size", "8", "--workers", "1"),
    *("--threads", "1", "--progress", "false", "--tensorboard", "false", "--plot", "false"),
    *("--arch", "small_cnn", "--image-size", "32", "--eval-resize", "32", "--proj-dim", "16", "--queue-size", "0"),
    *("--data-loader", "pytorch", "--check-images", "false"),
]
BENCH_TINY = [
    *("--arch", "small_cnn", "--image-size", "32", "--workers", "1", "--threads", "1", "--batch-size", "4"),
    *("--n-views", "2", "--data-loader", "pytorch", "--warmup", "0", "--steps", "1", "--breakdown-steps", "1"),
]
# commands run only as `--help` (they parse their options): why each is not run in full here
HELP_ONLY = {
    "bench/kernel_cost.py": "compiles every kernel for sm_90; tests/test_kernel_cost.py runs it",
    "bench/cpu_core.py": "appends to bench/results/cpu_core.csv; tests/test_native.py checks the kernel",
    "train.study": "trains hundreds of runs; train/study.py's runs are train() calls tested here",
}
# commands that run exactly what another documented command runs (the Makefile's recipes, the default config)
SAME = {
    "make demo": "python -m train --config mnist_lt_acl",
    "python -m train": "python -m train --config mnist_lt_acl",
    "make study": "python -m train.study",
}
# the suite itself and mutation testing over it (half an hour); shell helpers
NOT_RUN = ("make test", "make mutants", "python -m pytest", "git archive", "python -c")


def documented_commands() -> list[str]:
    """Commands of the docs: lines of code blocks and `inline` spans that start with python / make."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        block, shell, lines = False, False, []
        for line in text.replace("\\\n", " ").splitlines():
            if line.startswith("```"):
                block = not block
                shell = block and line[3:].strip() in ("", "bash", "sh")
            elif shell:
                lines.append(line.split("  #")[0].strip())
        found += lines + re.findall(r"`((?:python|make) [^`]+)`", text)
    keep = [" ".join(c.split()) for c in found if c.startswith(("python ", "make ")) and not c.startswith(NOT_RUN)]
    return sorted({SAME.get(c, c) for c in keep if "..." not in c and " N " not in c})


def _data_root(tmp_path: Path, config: str) -> Path:
    """A small JPEG set under the split file names of a shipped config."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import make_set

    root = make_set(tmp_path / "data", 48, 4)
    cfg = yaml.safe_load((REPO / "train" / "configs" / f"{config}.yaml").read_text())
    for key in ("train_split", "val_split", "test_split"):
        if cfg.get(key):
            (root / cfg[key]).write_text((root / "train.txt").read_text())
    return root


def tiny(command: str, tmp_path: Path) -> list[str]:
    """The command as argv, made small; outputs under tmp_path."""
    argv = shlex.split(command)
    argv[0] = sys.executable
    script = next((a for a in argv[1:] if not a.startswith("-")), "")
    if any(key in command for key in HELP_ONLY):
        return [*argv[: argv.index(script) + 1], "--help"] if script in argv else argv + ["--help"]
    if argv[1:3] == ["-m", "train"]:
        for i, a in enumerate(argv):
            if a == "--data-root":
                argv[i + 1] = str(_data_root(tmp_path, argv[argv.index("--config") + 1]))
            if a == "--nproc-per-node":
                argv[i + 1] = "2"
        return argv + TRAIN_TINY + ["--output", str(tmp_path / "runs"), "--cache-dir", str(CACHE)]
    if script == "bench/bench_train.py":
        return argv + BENCH_TINY + ["--csv", str(tmp_path / "train.csv")]
    if script == "bench/bench_loader.py":
        code = argv.index("--code")
        del argv[code + 2 : argv.index("--labels") + 3]  # one copy: this checkout, labelled
        tail = ["--labels", "here", "--images", "32", "--batch-size", "8", "--batches", "2", "--repeats", "1"]
        return argv + tail + ["--n-views", "2", "--loaders", "pytorch", "--csv", str(tmp_path / "loader.csv")]
    if script == "bench/plot_train.py":
        return argv + ["--out", str(tmp_path / "plot.png")]
    if script == "bench/profile_dali.py":
        return argv + ["--data-root", str(tmp_path / "synthetic"), "--images", "16"]
    return argv


def test_the_docs_show_commands():
    commands = documented_commands()
    assert any(c.startswith("python -m train --config mnist_lt_acl") for c in commands), commands
    assert any("bench/bench_train.py --config imagenet_lt_r50 --synthetic" in c for c in commands), commands


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    """One temporary folder for the commands' own temporary files: the synthetic image set of the
    benchmarks is made once."""
    return tmp_path_factory.mktemp("tmpdir")


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_runs(command, tmp_path, shared_tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(shared_tmp)}
    argv = tiny(command, tmp_path)
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


INTERNAL = re.compile(r"\b(?:this|the|an|another) issue\b|\bissue #?\d+|\bthe lead\b|\bhelpers?\b|\bi\d{1,2}\b", re.I)


def test_user_facing_text_has_no_internal_words():
    """Docs, results notes, shipped configs and --help speak to users: no tracker or branch words."""
    from train import config

    texts = {p: p.read_text() for p in [*DOCS, REPO / "bench" / "NOTES.md", *(REPO / "train" / "results").glob("*.md")]}
    texts.update({p: p.read_text() for p in (REPO / "train" / "configs").glob("*.yaml")})
    texts["--help"] = config.build_parser(config.DEFAULTS).format_help()
    found = {str(k): INTERNAL.findall(v) for k, v in texts.items() if INTERNAL.search(v)}
    assert not found, found
