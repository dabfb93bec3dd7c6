"""bench/kernel_cost.py, the static cost report: its SASS loop reading, and a run on a tiny set
(bf16, d = 128, softmax, no centres) whose CSV must be complete."""

import csv
import math

import pytest

pytestmark = pytest.mark.sm90

# Issue 9's required columns; the tool adds more.
REQUIRED = ["kernel", "mode", "dtype", "d", "loop", "block_m", "block_n", "num_warps", "num_stages", "registers",
            "spill_bytes", "shared_bytes", "sass_per_element", "mufu_per_element", "similarity_passes",
            "predicted_ms", "tag", "git_sha"]  # fmt: skip
NUMERIC = ["d", "block_m", "block_n", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes",
           "fraction", "sass_per_element", "mufu_per_element", "similarity_passes", "gemm_passes", "issue_ms",
           "mufu_ms", "tensor_ms", "predicted_ms", "n", "band_fraction"]  # fmt: skip
# The summed fwd+bwd rows have no per-kernel resources.
PER_KERNEL = ["block_m", "block_n", "num_warps", "num_stages", "registers", "shared_bytes", "fraction"]

SASS = """
        /*0000*/                   MOV R1, R2 ;
.L_x_0:
        /*0010*/                   MUFU.EX2 R3, R4 ;
        /*0020*/              @!P2 BRA `(.L_x_3) ;
.L_x_1:
        /*0030*/                   FADD R5, R5, R3 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_3:
        /*0050*/                   MUFU.RCP R3, R4 ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0080*/               @P1 BRA `(.L_x_2) ;
        /*0090*/                   EXIT ;
.L_x_4:
        /*00a0*/                   BRA `(.L_x_4);
"""


def test_sass_loops_finds_nested_loops_and_ignores_forward_branches_and_the_trap(kernel_cost):
    outer, second = kernel_cost.sass_loops(SASS)
    assert (outer.instructions, outer.mufu, len(outer.inner)) == (6, 2, 1)
    assert (outer.inner[0].instructions, outer.inner[0].mufu, outer.inner[0].inner) == (2, 0, [])
    assert (second.instructions, second.mufu, second.inner) == (2, 0, [])
    assert kernel_cost.loop_dynamic(outer, inner_trips=3) == (6 + 2 * 2, 2)


def test_write_csv_replaces_only_its_own_tag(kernel_cost, tmp_path):
    path = str(tmp_path / "cost.csv")
    kernel_cost.write_csv(path, "before", [{"kernel": "fwd", "sass_per_element": 60.0}])
    kernel_cost.write_csv(path, "after", [{"kernel": "fwd", "sass_per_element": 11.0}])
    kernel_cost.write_csv(path, "after", [{"kernel": "bwd", "sass_per_element": 12.5}])
    with open(path, newline="") as f:
        rows = [(r["tag"], r["kernel"], r["sass_per_element"]) for r in csv.DictReader(f)]
    assert rows == [("before", "fwd", "60"), ("after", "bwd", "12.5")]


def test_write_csv_replaces_only_the_targets_it_reports(kernel_cost, tmp_path):
    path = str(tmp_path / "cost.csv")
    kernel_cost.write_csv(path, "after", [{"kernel": "fwd", "sass_per_element": 11.0}])  # sm_90 by default
    kernel_cost.write_csv(path, "after", [{"arch": 80, "kernel": "fwd", "sass_per_element": 10.4}])
    kernel_cost.write_csv(path, "after", [{"arch": 80, "kernel": "bwd", "sass_per_element": 15.9}])
    with open(path, newline="") as f:
        rows = [(r["arch"], r["kernel"]) for r in csv.DictReader(f)]
    assert rows == [("", "fwd"), ("80", "bwd")]


def test_sass_loops_skip_out_of_line_wait_stubs_and_spin_loops(kernel_cost):
    """tcgen05 code (sm_100): a TMEM allocation retry loop, the elect-one-lane issue of an MMA, and
    mbarrier retry stubs after EXIT that jump back into the loop they left, are no loops of the
    kernel body."""
    sass = """
.L_x_0:
        /*0000*/                   NANOSLEEP 0x1 ;
        /*0010*/                   UTCATOMSWS.FIND_AND_SET.ALIGN UP0, UR4, UR4 ;
        /*0020*/              @!UP0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   MUFU.EX2 R3, R4 ;
.L_x_5:
        /*0034*/                   ELECT P3, URZ, PT ;
        /*0038*/                   UTCHMMA gdesc[UR30], gdesc[UR28], tmem[UR60], tmem[UR32], idesc[UR33], !UPT ;
        /*003c*/                   BRA.U.ANY `(.L_x_5) ;
.L_x_2:
        /*0040*/              @!P2 BRA `(.L_x_9) ;
        /*0050*/                   FADD R5, R5, R3 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
.L_x_9:
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR8], R2 ;
        /*0090*/                   BRA `(.L_x_2) ;
"""
    (loop,) = kernel_cost.sass_loops(sass)
    assert (loop.instructions, loop.mufu, loop.inner) == (7, 1, [])


def test_report_on_a_tiny_set_writes_a_complete_csv(kernel_cost, tmp_path):
    path = tmp_path / "kernel_cost.csv"
    args = ["--dtypes", "bf16", "--dims", "128", "--modes", "softmax", "--centres", "off", "--tag", "test"]
    assert kernel_cost.main(args + ["--csv", str(path)]) == 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED) <= set(reader.fieldnames)
        rows = list(reader)
    loops = [(r["kernel"], r["loop"]) for r in rows]
    assert loops == [("fwd", "band"), ("fwd", "off-band"), ("fwd", "total"), ("bwd", "band"), ("bwd", "off-band"),
                     ("bwd", "off-band two-exp"), ("bwd", "total"), ("fwd+bwd", "total")]  # fmt: skip
    for r in rows:
        assert r["tag"] == "test" and r["git_sha"] and r["mode"] == "softmax" and r["dtype"] == "bf16"
        for col in NUMERIC:
            if r["kernel"] == "fwd+bwd" and col in PER_KERNEL:
                continue
            assert math.isfinite(float(r[col])), f"{r['kernel']} {r['loop']}: {col} = {r[col]!r}"
        if r["kernel"] != "fwd+bwd":  # a kernel's roofline; fwd+bwd is the sum of its kernels'
            assert float(r["predicted_ms"]) == pytest.approx(
                max(float(r["issue_ms"]), float(r["mufu_ms"]), float(r["tensor_ms"])), rel=1e-3
            )
    by = {(r["kernel"], r["loop"]): r for r in rows}
    for kind in ("fwd", "bwd"):
        assert by[(kind, "total")]["wgmma"] == "True"  # bf16 dots on Hopper's tensor cores
        assert float(by[(kind, "off-band")]["sass_per_element"]) > 1.0
        # the loops' similarity passes (launch structure) add up to the kernel's (gemm_passes)
        loop_rows = [by[(kind, lp)] for k, lp in loops if k == kind and lp != "total"]
        passes = sum(float(r["fraction"]) * float(r["similarity_passes"]) for r in loop_rows)
        assert passes == pytest.approx(float(by[(kind, "total")]["similarity_passes"]), rel=1e-3)
    # the loops are matched to the SASS in source order: the fallback issues two exps, the lean loop one
    assert float(by[("bwd", "off-band two-exp")]["mufu_per_element"]) > float(
        by[("bwd", "off-band")]["mufu_per_element"]
    )
    total = by[("fwd+bwd", "total")]
    parts = float(by[("fwd", "total")]["predicted_ms"]) + float(by[("bwd", "total")]["predicted_ms"])
    assert float(total["predicted_ms"]) == pytest.approx(parts, rel=1e-3)
    assert float(total["floor_ratio"]) == pytest.approx(float(total["predicted_ms"]) / float(total["floor_ms"]))


def test_report_for_another_family_uses_its_tables_and_roofline(kernel_cost, tmp_path):
    """--arch 120: the consumer-Blackwell tile tables, mma.sync (HMMA) dots, one RTX 5090's roofline."""
    path = tmp_path / "kernel_cost.csv"
    args = ["--arch", "120", "--dtypes", "bf16", "--dims", "128", "--modes", "softmax", "--centres", "off"]
    assert kernel_cost.main(args + ["--tag", "test", "--csv", str(path)]) == 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    from acl_kernels.ops.contrastive import triton_backend as tb

    fwd_tiles = tb.tile_set("fwd", tb.DTYPE_NAMES["bf16"][0], 128, 120)[0]
    for r in rows:
        assert (r["arch"], r["gpu"]) == ("120", "RTX 5090")
        if r["kernel"] == "fwd":
            assert (int(r["block_m"]), int(r["block_n"])) == fwd_tiles[:2]
        if r["kernel"] in ("fwd", "bwd"):
            assert r["mma"] == "HMMA" and r["wgmma"] == "False"
    issue_ms, _ = kernel_cost.element_ms(65536, 120)
    assert issue_ms == pytest.approx(65536.0**2 / (170 * 2.407e9 * 4 * 32) * 1e3)
