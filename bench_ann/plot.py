"""Plots of the bench_ann sweeps: recall@10 against DCO per query (Pareto frontier per method, log x, mean over
seeds with the min-max band) and the copies-per-vector histograms of the multi-assignment methods.

    python -m bench_ann.plot glove-6b-50d --K 1024 [--out bench_ann/results]

Writes ``<dataset>_K<K>.png`` (scan DCO), ``<dataset>_K<K>_total.png`` (scan + routing DCO) and
``<dataset>_K<K>_copies.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .summarize import cost_at, load_runs  # noqa: E402

PANELS = (
    ("The paper's rule vs baselines", ["kmeans", "gmm-single", "gmm-tau", "gmm-tau-cap2", "soar-l2",
                                       "naive-spill@gmm-tau"]),
    ("Equal index size (budgeted spilling)", ["kmeans", "gmm-tau-cap2", "naive-spill@gmm-tau-cap2",
                                              "soar-l2@gmm-tau-cap2", "gmm-resp-spill@gmm-tau-cap2",
                                              "naive-spill@1.6", "soar-l2@1.6", "gmm-resp-spill@1.6",
                                              "km-resp-spill@1.6", "soar-gmm@1.6", "soar-resp@1.6", "soar-gmm"]),
    ("Ablations: centroids vs assignment", ["kmeans", "gmm-single", "gmm-tau", "kmeans-tau", "gmm-nowarm-tau",
                                            "gmm-nowarm-single"]),
)
STYLE = {
    "kmeans": ("black", "-", "o"), "gmm-single": ("tab:blue", "--", "s"), "gmm-tau": ("tab:blue", "-", "^"),
    "gmm-tau-cap2": ("tab:cyan", "-", "v"), "soar-l2": ("tab:red", "-", "D"),
    "naive-spill@gmm-tau": ("tab:orange", ":", "x"), "naive-spill@gmm-tau-cap2": ("tab:orange", "--", "x"),
    "soar-l2@gmm-tau-cap2": ("tab:red", "--", "d"), "gmm-resp-spill@gmm-tau-cap2": ("tab:green", "--", "P"),
    "naive-spill@1.6": ("tab:orange", "-", "+"), "soar-l2@1.6": ("tab:red", ":", "D"),
    "gmm-resp-spill@1.6": ("tab:green", "-", "P"), "km-resp-spill@1.6": ("tab:olive", "-", "*"),
    "soar-gmm@1.6": ("tab:purple", "-", "h"), "soar-gmm": ("tab:purple", ":", "h"),
    "soar-resp@1.6": ("tab:pink", "-", "X"), "kmeans-tau": ("tab:gray", "-", "<"),
    "gmm-nowarm-tau": ("tab:brown", "-", ">"), "gmm-nowarm-single": ("tab:brown", "--", "p"),
}


def mean_curve(records, method, key):
    """Mean (over seeds) cost and recall per nprobe measured in every seed, with min/max recall."""
    runs = [r["runs"][method] for r in records if method in r["runs"]]
    if not runs:
        return None
    common = set.intersection(*({row["nprobe"] for row in run["rows"]} for run in runs))
    pts = []
    for p in sorted(common):
        rows = [next(row for row in run["rows"] if row["nprobe"] == p) for run in runs]
        rec = np.array([row["recall_at_10"] for row in rows])
        pts.append((np.mean([row[key] for row in rows]), rec.mean(), rec.min(), rec.max()))
    pts.sort()
    front, best = [], -1.0
    for x, y, lo, hi in pts:  # Pareto frontier of the mean curve
        if y > best:
            front.append((x, y, lo, hi))
            best = y
    infl = np.mean([run["inflation"] for run in runs])
    return np.array(front), infl, len(runs)


def _log_axis(ax):
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_recall(records, dataset, K, key, path):
    """Top row: recall@10 vs DCO frontiers. Bottom row: k-means DCO / method DCO at equal recall (read off the
    mean frontiers, log DCO interpolated linearly in recall): > 1 means the method needs fewer DCO."""
    n_panels = len(PANELS)
    fig, axes = plt.subplots(2, n_panels, figsize=(6.2 * n_panels, 9.6), sharey="row",
                             gridspec_kw={"height_ratios": [1.6, 1]})
    ymin = 1.0
    base = mean_curve(records, "kmeans", key)
    grid = np.linspace(0.5, 0.995, 100)
    for col, (title, methods) in enumerate(PANELS):
        ax, axr = axes[0, col], axes[1, col]
        for m in methods:
            res = mean_curve(records, m, key)
            if res is None:
                continue
            f, infl, ns = res
            color, ls, marker = STYLE.get(m, (None, "-", "o"))
            label = f"{m} (×{infl:.2f})"
            ax.plot(f[:, 0], f[:, 1], ls=ls, marker=marker, ms=4, color=color, lw=1.5, label=label)
            if ns > 1:
                ax.fill_between(f[:, 0], f[:, 2], f[:, 3], color=color, alpha=0.15, lw=0)
            ymin = min(ymin, f[:, 1].min())
            if base is not None:
                fr, bf = (f[:, 0], f[:, 1]), (base[0][:, 0], base[0][:, 1])
                ratio = np.array([cost_at(bf, r) / cost_at(fr, r) for r in grid])
                axr.plot(grid, ratio, ls=ls, color=color, lw=1.5, label=label)
        _log_axis(ax)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("scan DCO per query (copies counted), log scale" if key == "dco_scan_per_query"
                      else "total DCO per query (scan + K routing), log scale")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="method (inflation)", title_fontsize=8)
        axr.axhline(1.0, color="black", lw=0.8)
        axr.set_xlabel("recall@10")
        axr.grid(True, alpha=0.3)
        axr.set_xlim(0.5, 1.0)
    axes[0, 0].set_ylabel("recall@10 (true top-10 found in returned top-10)")
    axes[1, 0].set_ylabel("DCO ratio k-means / method\nat equal recall (higher is better)")
    lo = max(0.0, min(0.5, ymin))
    axes[0, 0].set_ylim(lo, 1.005)
    seeds = sorted(r["seed"] for r in records)
    rec0 = records[0]
    fig.suptitle(f"{dataset} (nb={rec0['nb']}, d={rec0['d']}, nq={rec0['nq']}, {rec0['metric']}), K={K}: "
                 f"recall@10 vs DCO — up and left is better. Mean over seeds {seeds}, band = min..max.",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_copies(records, dataset, K, path):
    rec = min(records, key=lambda r: r["seed"])
    multi = [m for m, run in rec["runs"].items() if run["max_copies"] > 1]
    if not multi:
        return
    ncol = min(4, len(multi))
    nrow = int(np.ceil(len(multi) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, m in zip(axes.ravel(), multi):
        run = rec["runs"][m]
        h = np.array(run["copies_histogram"], dtype=float)
        c = np.arange(len(h))
        ax.bar(c[1:], h[1:], color=STYLE.get(m, ("tab:blue",))[0] or "tab:blue")
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(h.max(), 1) * 2)  # bars start below 1 vector: heights are comparable
        step = max(1, int(np.ceil((len(h) - 1) / 12)))
        ax.set_xticks(c[1::step])
        ax.set_title(f"{m}\ninflation {run['inflation']:.2f}, max {run['max_copies']}", fontsize=9)
        ax.set_xlabel("copies per vector")
        ax.set_ylabel("vectors (log)")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes.ravel()[len(multi):]:
        ax.axis("off")
    fig.suptitle(f"{dataset}, K={K}: copies per vector (seed {rec['seed']}); fewer copies = smaller index",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot bench_ann sweep results.")
    p.add_argument("dataset")
    p.add_argument("--K", type=int, required=True)
    p.add_argument("--out", default="bench_ann/results")
    a = p.parse_args(argv)
    out = Path(a.out)
    records = load_runs(out, a.dataset, a.K)
    stem = out / f"{a.dataset}_K{a.K}"
    plot_recall(records, a.dataset, a.K, "dco_scan_per_query", f"{stem}.png")
    plot_recall(records, a.dataset, a.K, "dco_total_per_query", f"{stem}_total.png")
    plot_copies(records, a.dataset, a.K, f"{stem}_copies.png")
    print(f"wrote {stem}.png, {stem}_total.png, {stem}_copies.png")


if __name__ == "__main__":
    main()
