"""CPU fwd+bwd of the loss: the float64-capable reference, the chunked torch path and the native C++
kernel, fp32, d = 128.

Targets: native time <= 0.5x the torch path at N = 4096 and 16384 (softmax and aligned); native RSS
growth <= 64 MiB at N = 16384 with the default allocator.

Time: the impls interleaved in one process, same thread count, median of `--repeats` steps after a
warm-up round (a change of machine load hits every impl alike). Memory: one step in a fresh process
per impl, peak resident set (VmHWM) minus the resident set before the step, inputs and the
gradient buffer already allocated; glibc's default allocator (no MALLOC_* tuning). The load
average of the machine when the size was measured is recorded with each row.

Usage: python bench/cpu_core.py [--sizes 4096 16384] [--modes softmax aligned]
       [--reference-max 4096] (the reference needs O(N^2) memory: 11 GB at N = 16384 aligned)
       [--record | --csv PATH]
The rows are printed as CSV (header first); --record appends them to the tracked
bench/results/cpu_core.csv, --csv PATH to another file. The native kernel is left out (said on
stderr) where this install lacks it.
"""

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys

import torch

from acl_kernels.demo import _child
from acl_kernels.dispatch import backends

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu_core.csv")
HEADER = ["date", "git_sha", "device", "threads", "torch", "mode", "N", "d", "impl", "time_s", "peak_extra_mib",
          "time_vs_reference", "memory_vs_reference", "time_vs_torch", "load_avg_1min"]  # fmt: skip


def measure(n: int, d: int, mode: str, repeats: int, impls: list[str]) -> dict[str, dict]:
    """Per impl: {"time_s", "peak_extra_bytes"}, or {"error": message}."""
    try:
        times = _child(n, d, mode, "time", repeats, impls, dict(os.environ))
    except RuntimeError as err:
        return {impl: {"error": str(err)} for impl in impls}
    out = {}
    for impl in impls:
        try:
            peak = _child(n, d, mode, "memory", 1, [impl], dict(os.environ))[impl]
            out[impl] = {"time_s": times[impl], "peak_extra_bytes": peak}
        except RuntimeError as err:
            out[impl] = {"error": str(err)}
    return out


def ratio(results: dict, impl: str, base: str, key: str) -> str:
    a, b = results.get(impl, {}), results.get(base, {})
    if key not in a or key not in b:
        return ""
    return f"{a[key] / max(b[key], 1):.4f}" if key == "peak_extra_bytes" else f"{a[key] / b[key]:.3f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--modes", nargs="+", default=["softmax", "aligned"], choices=["softmax", "aligned"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max", type=int, default=4096, help="largest N the reference runs at")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--record", action="store_true", help="append the rows to bench/results/cpu_core.csv")
    out.add_argument("--csv", help="append the rows to this CSV instead (default: print only)")
    return parser.parse_args(argv)


def open_csv(path: str | None) -> str | None:
    """`path`, made ready for appending rows: the header written to a new file, checked in an
    existing one (None: print only)."""
    if path is None:
        return None
    if os.path.exists(path):
        with open(path) as f:
            if next(csv.reader(f), None) != HEADER:
                raise SystemExit(f"{path}: not a cpu_core CSV (its header differs from {HEADER})")
    else:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(HEADER)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = platform.processor() or platform.machine()
    native = backends()["native"].missing is None
    if native:  # the instruction set of the native kernel's tile loops (from 2026-11-26 on)
        from acl_kernels import _C

        device += f" native:{_C.isa()}"
    else:
        print(f"native: left out, not in this install ({backends()['native'].missing})", file=sys.stderr)
    path = open_csv(OUT if args.record else args.csv)
    print(",".join(HEADER), flush=True)
    for mode in args.modes:
        for n in args.sizes:
            impls = (["reference"] if n <= args.reference_max else []) + ["torch"] + (["native"] if native else [])
            load = os.getloadavg()[0]
            results = measure(n, args.dim, mode, args.repeats, impls)
            rows = []
            for impl, r in results.items():
                if "error" in r:
                    print(f"{mode} N={n} {impl}: {r['error']}", file=sys.stderr)
                    continue
                rows.append([datetime.date.today().isoformat(), sha, device,
                             torch.get_num_threads(), torch.__version__, mode, n, args.dim, impl,
                             f"{r['time_s']:.4f}", f"{r['peak_extra_bytes'] / 2**20:.1f}",
                             ratio(results, impl, "reference", "time_s"),
                             ratio(results, impl, "reference", "peak_extra_bytes"),
                             ratio(results, impl, "torch", "time_s"), f"{load:.1f}"])  # fmt: skip
            writer = csv.writer(sys.stdout)
            writer.writerows(rows)
            sys.stdout.flush()
            if path is not None:
                with open(path, "a", newline="") as f:
                    csv.writer(f).writerows(rows)
    if path is not None:
        print(f"rows appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
