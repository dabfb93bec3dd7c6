"""The CPU benchmarks as a new user runs them: every backend the install has (the native kernel
included), memory as peak RSS growth, and the tracked CSVs written only when asked."""

import csv
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss
    import cpu_core

    return bench_loss, cpu_core


def _native() -> bool:
    from acl_kernels.dispatch import backends

    return backends()["native"].missing is None


def test_bench_loss_on_cpu_shows_every_backend_and_memory(bench, tmp_path, capsys, monkeypatch):
    bench_loss, _ = bench
    wanted = ["reference", "torch"] + (["native"] if _native() else [])
    assert bench_loss.choose_impls(None, bench_loss.torch.device("cpu")) == wanted
    assert bench_loss.parse_args(["--impls", "native"]).impls == ["native"]
    monkeypatch.setattr(bench_loss, "DEFAULT_CSV", str(tmp_path / "tracked.csv"))
    bench_loss.main(["--device", "cpu", "--sizes", "64", "--losses", "supcon", "--repeats", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("supcon")]
    assert [ln.split()[5] for ln in lines] == wanted
    assert all(" ok " in ln and "peak -" not in ln and " MiB" in ln for ln in lines), lines
    assert not (tmp_path / "tracked.csv").exists()  # printed only
    out = tmp_path / "mine.csv"
    bench_loss.main(["--device", "cpu", "--sizes", "64", "--losses", "acl", "--repeats", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["impl"] for r in rows] == wanted and all(float(r["peak_mib"]) >= 0 for r in rows)


def test_cpu_core_prints_a_header_and_writes_only_when_asked(bench, tmp_path, capsys, monkeypatch):
    """One run (each backend is timed and measured in fresh processes): printed with its header, and
    recorded only because --csv names a file; the tracked file stays untouched."""
    _, cpu_core = bench
    monkeypatch.setattr(cpu_core, "OUT", str(tmp_path / "tracked.csv"))
    mine = tmp_path / "mine.csv"
    cpu_core.main(["--sizes", "64", "--modes", "aligned", "--repeats", "1", "--csv", str(mine)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split(",") == cpu_core.HEADER
    printed = list(csv.reader(out[1:]))
    assert [row[cpu_core.HEADER.index("impl")] for row in printed] == ["reference", "torch"] + (
        ["native"] if _native() else []
    )
    with open(mine, newline="") as f:
        assert list(csv.reader(f)) == [cpu_core.HEADER] + printed
    assert not (tmp_path / "tracked.csv").exists()
