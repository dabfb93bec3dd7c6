"""Plot bench/results/loss.csv: time and peak memory vs N, one line per implementation.

One panel per (loss, d, V, dtype) group of the newest run of each device (rows sharing the newest
git sha and date); writes loss_time.png and loss_memory.png next to the CSV.

    python bench/plot_loss.py [--csv bench/results/loss.csv] [--device "NVIDIA H100 80GB HBM3"]
"""

import argparse
import csv
import math
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "loss.csv"))
    parser.add_argument("--device", help="plot this device's rows (default: the device of the last row)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.csv} holds no rows")
    device = args.device or rows[-1]["device"]
    rows = [r for r in rows if r["device"] == device]
    newest = max((r["date"], r["git_sha"]) for r in rows)
    rows = [r for r in rows if (r["date"], r["git_sha"]) == newest]
    groups = defaultdict(lambda: defaultdict(dict))  # group -> impl -> N -> row (the last one wins)
    for r in rows:
        groups[(r["loss"], r["d"], r["V"], r["dtype"])][r["impl"]][int(r["N"])] = r
    keys = sorted(groups)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    for metric, label, fname in [("median_ms", "fwd+bwd time (ms)", "loss_time.png"),
                                 ("peak_mib", "peak memory beyond inputs (MiB)", "loss_memory.png")]:  # fmt: skip
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        drawn = False
        for ax, key in zip(axes.flat, keys):
            for impl, by_n in sorted(groups[key].items()):
                pts = [(n, float(r[metric])) for n, r in sorted(by_n.items()) if r["status"] == "ok" and r[metric]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
                    drawn = True
                ooms = [n for n, r in by_n.items() if r["status"] == "OOM"]
                if ooms and pts:
                    ax.axvline(min(ooms), ls=":", color=ax.lines[-1].get_color(), alpha=0.6)
            ax.set(xscale="log", yscale="log", xlabel="N (rows)", ylabel=label,
                   title="{} d={} V={} {}".format(*key))  # fmt: skip
            if ax.lines:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.suptitle(f"{device} @ {newest[1]} ({newest[0]}); dotted: out of memory from there", fontsize=9)
        fig.tight_layout()
        out = os.path.join(os.path.dirname(os.path.abspath(args.csv)), fname)
        if drawn:
            fig.savefig(out, dpi=110)
            print("wrote", out)
        plt.close(fig)


if __name__ == "__main__":
    main()
