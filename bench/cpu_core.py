"""CPU check of the chunked torch path against the naive reference (issue: foundation).

Targets: at N = 16384, d = 128, fp32 SupCon the torch path's peak loss memory is at most 1/8 of the
reference's; at N = 4096 its fwd+bwd time is at most 1.5x the reference's. Rows are appended to
bench/results/cpu_core.csv. Usage: python bench/cpu_core.py [--sizes 4096 16384] [--modes softmax aligned]
"""

import argparse
import csv
import datetime
import os
import platform
import subprocess

import torch

from acl_kernels.demo import measure

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu_core.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--modes", nargs="+", default=["softmax"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    new = not os.path.exists(OUT)
    with open(OUT, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "git_sha", "device", "threads", "torch", "mode", "N", "d", "impl",
                             "time_s", "peak_extra_mib", "time_vs_reference", "memory_vs_reference"])
        for mode in args.modes:
            for n in args.sizes:
                results = measure(n, args.dim, mode, args.repeats)
                ref = results["reference"]
                for impl, r in results.items():
                    if "error" in r:
                        print(f"{mode} N={n} {impl}: {r['error']}")
                        continue
                    t_ratio = m_ratio = ""
                    if "error" not in ref:
                        t_ratio = f"{r['time_s'] / ref['time_s']:.3f}"
                        m_ratio = f"{r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.4f}"
                    row = [datetime.date.today().isoformat(), sha, platform.processor() or platform.machine(),
                           torch.get_num_threads(), torch.__version__, mode, n, args.dim, impl,
                           f"{r['time_s']:.4f}", f"{r['peak_extra_bytes'] / 2**20:.1f}", t_ratio, m_ratio]
                    writer.writerow(row)
                    print(", ".join(map(str, row)))


if __name__ == "__main__":
    main()
