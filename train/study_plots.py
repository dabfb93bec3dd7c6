"""The MNIST-LT study's plots: accuracy against V with 95 % CIs, learning curves, the ablation chart."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_views(rows: list[dict], cells, path: Path) -> None:
    """Test top-1 (All, Few) against V, one line per loss and per multi-view ablation variant."""
    from .study_report import LOSS_NAMES, mean_ci

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    lines = {**{k: ("grid", k) for k in LOSS_NAMES}}
    for name, v in cells(rows, "ablation"):
        if v > 2:
            lines[name] = ("ablation", name)
    for ax, metric, title in ((axes[0], "test_top1", "All"), (axes[1], "test_few", "Few")):
        for label, (phase, name) in lines.items():
            grid = cells(rows, phase)
            vs = sorted(v for (n, v) in grid if n == name)
            if not vs:
                continue
            stats = [mean_ci([float(r[metric]) for r in grid[(name, v)]]) for v in vs]
            ax.errorbar(
                vs,
                [s[0] for s in stats],
                yerr=[0 if s[1] != s[1] else s[1] for s in stats],
                marker="o",
                capsize=3,
                linestyle="-" if phase == "grid" else "--",
                label={"acl": "ACL (search winner)"}.get(label) or LOSS_NAMES.get(label, f"ACL, {label}"),
            )
        ax.set(
            xlabel="views V", ylabel=f"test top-1, {title} (%)", title=f"MNIST-LT, {title} (95 % CI)", xticks=[2, 4, 8]
        )
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], chosen_cell, path: Path) -> None:
    """Validation top-1 per epoch of every loss's chosen cell: the mean over seeds and each seed faintly."""
    from .study_report import LOSS_NAMES

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, loss in enumerate(LOSS_NAMES):
        chosen = chosen_cell(rows, loss)
        if not chosen:
            continue
        v, rs = chosen
        curves = [[float(x) for x in r["val_curve"].split()] for r in rs]
        n = min(len(c) for c in curves)
        color = f"C{i}"
        for c in curves:
            ax.plot(range(1, n + 1), c[:n], color=color, alpha=0.15, linewidth=0.8)
        mean = [sum(c[e] for c in curves) / len(curves) for e in range(n)]
        ax.plot(range(1, n + 1), mean, color=color, label=f"{LOSS_NAMES[loss]} (V = {v})")
        ax.axvline(0.8 * n, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="MNIST-LT: validation curves of the chosen configs")
    ax.set_ylim(bottom=40)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablation(rows: list[dict], ablation, path: Path) -> None:
    """Bars: each ablation variant minus the chosen ACL at the same V (paired by seed), All and Few, 95 % CI."""
    from .study_report import paired

    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.55 * max(len(ablation), 1)))
    names = [a[0] for a in ablation]
    for k, (metric, label) in enumerate((("test_top1", "All"), ("test_few", "Few"))):
        stats = [paired(rs, base, metric) for _, rs, base in ablation]
        ys = [i + (k - 0.5) * 0.38 for i in range(len(ablation))]
        errs = [0 if s[1] != s[1] else s[1] for s in stats]
        ax.barh(ys, [s[0] for s in stats], height=0.36, xerr=errs, capsize=3, label=label, color=f"C{k}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="test top-1 of the variant minus the chosen ACL (points, paired by seed, 95 % CI)")
    ax.set_title("MNIST-LT: which part of ACL carries the difference")
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
