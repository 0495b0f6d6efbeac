"""Merge the per-seed sweep results of one (data set, K) and write the summary tables.

    python -m bench_ann.summarize glove-6b-50d --K 1024 [--out bench_ann/results]

Reads ``OUT/raw/<dataset>_K<K>_seed*.json`` (written by :mod:`bench_ann.sweep`) and writes

* ``<dataset>_K<K>.json``: environment, command(s), every run with its nprobe rows, and the summary;
* ``<dataset>_K<K>.csv``: one line per (method, seed, nprobe);
* ``<dataset>_K<K>.md``: DCO per query needed for recall@10 = 0.80 / 0.90 / 0.95 / 0.99 per method (mean ± std
  over seeds), the ratio k-means DCO / method DCO, inflation, and recall at k-means' DCO.

Operating points are read off each seed's Pareto frontier (recall@10 against DCO per query), interpolating
log(DCO) linearly in recall between neighbouring frontier points; a target the sweep never reached is "—".
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from flashgmm_faiss.evaluation import cost_on_frontier, pareto_frontier

TARGETS = (0.80, 0.90, 0.95, 0.99)
BASELINE = "kmeans"
HEADLINE = ("gmm-tau", "gmm-tau-cap2")


def load_runs(out: Path, dataset: str, K: int) -> list[dict]:
    files = sorted((out / "raw").glob(f"{dataset}_K{K}_seed*.json"))
    if not files:
        raise FileNotFoundError(f"no results in {out / 'raw'} for {dataset} K={K}: run python -m bench_ann.sweep "
                                f"--dataset {dataset} --K {K} first.")
    return [json.loads(f.read_text()) for f in files]


frontier = pareto_frontier  # (cost, recall) arrays of a run's Pareto frontier


def cost_at(front, target):
    """DCO needed to reach recall ``target`` on the frontier (nan when never reached, or when the cheapest
    point, nprobe=1, already exceeds it: the cost is then unknown, below that point)."""
    xs, ys = front
    if ys.size == 0 or ys[0] > target:
        return math.nan
    cost = cost_on_frontier(xs, ys, target)
    return math.nan if cost is None else cost


def recall_at(front, cost):
    """Recall reached with ``cost`` DCO per query on the frontier (nan below the cheapest point)."""
    xs, ys = front
    if xs.size == 0 or not math.isfinite(cost) or cost < xs[0]:
        return math.nan
    if cost >= xs[-1]:
        return float(ys[-1])
    i = int(np.searchsorted(xs, cost, side="right"))
    t = (np.log(cost) - np.log(xs[i - 1])) / (np.log(xs[i]) - np.log(xs[i - 1]))
    return float(ys[i - 1] + t * (ys[i] - ys[i - 1]))


def _ms(values):
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def summarize(records: list[dict]) -> dict:
    methods = []
    for rec in records:
        for m in rec["runs"]:
            if m not in methods:
                methods.append(m)
    from .sweep import METHODS  # canonical order, whatever order the runs were made in

    order = {m: i for i, m in enumerate(METHODS)}
    methods.sort(key=lambda m: order.get(m, len(order)))
    out = {}
    for key in ("dco_scan_per_query", "dco_total_per_query"):
        table = {}
        for m in methods:
            per_seed = {"cost": {t: [] for t in TARGETS}, "ratio": {t: [] for t in TARGETS},
                        "recall_at_baseline_cost": {t: [] for t in TARGETS}}
            for rec in records:
                if m not in rec["runs"]:
                    continue
                front = frontier(rec["runs"][m]["rows"], key)
                base = rec["runs"].get(BASELINE)
                bfront = frontier(base["rows"], key) if base else None
                for t in TARGETS:
                    c = cost_at(front, t)
                    per_seed["cost"][t].append(c)
                    if bfront is not None:
                        bc = cost_at(bfront, t)
                        per_seed["ratio"][t].append(bc / c if c > 0 else math.nan)
                        per_seed["recall_at_baseline_cost"][t].append(recall_at(front, bc))
            runs = [rec["runs"][m] for rec in records if m in rec["runs"]]
            table[m] = {
                "seeds": [rec["seed"] for rec in records if m in rec["runs"]],
                "inflation": _ms([r["inflation"] for r in runs]),
                "max_copies": max(r["max_copies"] for r in runs),
                "build_seconds": _ms([r["build_seconds"] for r in runs]),
                "assign_seconds": _ms([r["assign_seconds"] for r in runs]),
                **{f"{what}@{t:.2f}": _ms(v[t]) for what, v in per_seed.items() for t in TARGETS},
            }
        out[key] = table
    return out


def _fmt(s, digits=0, pct=False):
    if s["n"] == 0 or not math.isfinite(s["mean"]):
        return "—"
    f = f"{{:.{digits}f}}"
    if pct:
        return f"{100 * s['mean']:+.1f} ± {100 * s['std']:.1f}"
    return (f.format(s["mean"]) + (f" ± {f.format(s['std'])}" if s["n"] > 1 else "")) + \
        (f" ({s['n']}/{s['n']})" if False else "")


def markdown(dataset: str, K: int, records: list[dict], summ: dict) -> str:
    rec0 = records[0]
    seeds = sorted(r["seed"] for r in records)
    lines = [f"# {dataset}, K={K}: recall@10 vs distance computations",
             "",
             f"nb={rec0['nb']}, d={rec0['d']}, nq={rec0['nq']}, metric={rec0['metric']}, training sample "
             f"{rec0['n_train']} rows, seeds {seeds}. Device: {rec0.get('device')}, {rec0.get('threads')} threads. "
             f"Versions: {json.dumps(rec0.get('versions'))}. Date: {rec0.get('date')}.",
             "",
             "Recall@10 = |top-10 returned ∩ true top-10| / 10, averaged over queries. Scan DCO = vectors compared "
             "per query while scanning the probed lists (every copy counted); total DCO adds the K routing "
             "distances. Cells are mean ± std over the seeds that ran (n in the last column); '—' = never reached "
             "by the sweep (or already exceeded at nprobe=1). Ratio = k-means DCO / method DCO at the same recall (> 1: the method needs fewer). "
             "Δrecall = recall of the method at the DCO k-means needs for recall 0.90 / 0.95, minus that recall.",
             ""]
    for key, title in (("dco_scan_per_query", "Scan DCO per query"), ("dco_total_per_query",
                                                                      "Total DCO per query (scan + routing)")):
        tab = summ[key]
        lines += [f"## {title}", "",
                  "| method | inflation | " + " | ".join(f"DCO@{t:.2f}" for t in TARGETS) + " | "
                  + " | ".join(f"ratio@{t:.2f}" for t in TARGETS) + " | Δrecall@km0.90 | Δrecall@km0.95 | seeds |",
                  "|---" * (2 + 2 * len(TARGETS) + 3) + "|"]
        for m, s in tab.items():
            cells = [m, _fmt(s["inflation"], 3)]
            cells += [_fmt(s[f"cost@{t:.2f}"]) for t in TARGETS]
            cells += [_fmt(s[f"ratio@{t:.2f}"], 3) for t in TARGETS]
            for t in (0.90, 0.95):
                r = s[f"recall_at_baseline_cost@{t:.2f}"]
                cells.append("—" if r["n"] == 0 else f"{100 * (r['mean'] - t):+.2f} ± {100 * r['std']:.2f}")
            cells.append(str(len(s["seeds"])))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Build", "", "| method | centroids | build s (fit + assign + add) | assign s | max copies |",
              "|---|---|---|---|---|"]
    for m, s in summ["dco_scan_per_query"].items():
        c = next(r["runs"][m]["centroids"] for r in records if m in r["runs"])
        lines.append(f"| {m} | {c} | {_fmt(s['build_seconds'], 1)} | {_fmt(s['assign_seconds'], 1)} | "
                     f"{s['max_copies']} |")
    aliases = rec0.get("aliases", {})
    if aliases:
        lines += ["", "Aliases (identical fit and assignment, measured once): "
                  + ", ".join(f"`{a}` = `{b}`" for a, b in aliases.items()) + "."]
    lines += ["", "Commands:", ""] + [f"    {c}" for c in sorted({r.get('command', '') for r in records})]
    return "\n".join(lines) + "\n"


def headline(summ: dict) -> dict:
    tab = summ["dco_scan_per_query"]
    out = {}
    for m in HEADLINE + tuple(k for k in tab if k not in HEADLINE):
        if m not in tab or m == BASELINE:
            continue
        s = tab[m]
        out[m] = {"inflation": s["inflation"]["mean"],
                  **{f"dco_ratio_kmeans_over_method@{t}": s[f"ratio@{t:.2f}"]["mean"] for t in (0.90, 0.95)},
                  **{f"recall_gain_at_kmeans_dco@{t}": s[f"recall_at_baseline_cost@{t:.2f}"]["mean"] - t
                     for t in (0.90, 0.95)}}
    return out


def write_csv(path: Path, records: list[dict]):
    cols = ["dataset", "K", "seed", "method", "centroids", "rule", "tau", "inflation", "max_copies",
            "build_seconds", "nprobe", "recall_at_10", "dco_scan_per_query", "dco_total_per_query", "qps"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for rec in sorted(records, key=lambda r: r["seed"]):
            for m, run in rec["runs"].items():
                for row in run["rows"]:
                    w.writerow([rec["dataset"], rec["K"], rec["seed"], m, run["centroids"], run["rule"],
                                run.get("tau", ""), f"{run['inflation']:.5f}", run["max_copies"],
                                f"{run['build_seconds']:.2f}", row["nprobe"], f"{row['recall_at_10']:.5f}",
                                f"{row['dco_scan_per_query']:.1f}", f"{row['dco_total_per_query']:.1f}",
                                f"{row['qps']:.1f}"])


def headline_markdown(out: Path, pairs, methods=None) -> str:
    """Cross-data-set table (scan DCO): per data set and method, inflation, k-means/method DCO ratio at recall@10
    0.90 and 0.95, and the recall gain at k-means' DCO for those recalls (mean ± std over seeds)."""
    lines = ["| data set | method | inflation | DCO ratio k-means/method @0.90 | @0.95 | Δrecall@10 (points) at k-means DCO "
             "(0.90) | (0.95) | seeds |", "|---|---|---|---|---|---|---|---|"]
    for dataset, K in pairs:
        tab = summarize(load_runs(out, dataset, K))["dco_scan_per_query"]
        for m in (methods or list(tab)):
            if m not in tab:
                continue
            s = tab[m]
            cells = [f"{dataset} K={K}", m, _fmt(s["inflation"], 2), _fmt(s["ratio@0.90"], 3),
                     _fmt(s["ratio@0.95"], 3)]
            for t in (0.90, 0.95):
                r = s[f"recall_at_baseline_cost@{t:.2f}"]
                cells.append("—" if r["n"] == 0 else f"{100 * (r['mean'] - t):+.2f} ± {100 * r['std']:.2f}")
            cells.append(str(len(s["seeds"])))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Summarise bench_ann sweeps (all seeds) into JSON/CSV/markdown.")
    p.add_argument("dataset", help="data set name, or DATASET:K,DATASET:K,... with --headline")
    p.add_argument("--K", type=int, default=None)
    p.add_argument("--out", default="bench_ann/results")
    p.add_argument("--headline", action="store_true", help="print the cross-data-set headline table only")
    p.add_argument("--methods", nargs="*", default=None, help="with --headline: methods to show")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.headline:
        pairs = [(x.split(":")[0], int(x.split(":")[1])) for x in a.dataset.split(",")]
        print(headline_markdown(out, pairs, a.methods))
        return
    if a.K is None:
        p.error("--K is required")
    records = load_runs(out, a.dataset, a.K)
    summ = summarize(records)
    stem = out / f"{a.dataset}_K{a.K}"
    env_keys = ("device", "cpu_count", "threads", "platform", "versions", "date")
    merged = {"dataset": a.dataset, "K": a.K, "seeds": sorted(r["seed"] for r in records),
              "environment": {k: records[0].get(k) for k in env_keys},
              "commands": sorted({r.get("command", "") for r in records}),
              "headline": headline(summ), "summary": summ, "per_seed": records}
    Path(f"{stem}.json").write_text(json.dumps(merged, indent=1))
    write_csv(Path(f"{stem}.csv"), records)
    Path(f"{stem}.md").write_text(markdown(a.dataset, a.K, records, summ))
    print(f"wrote {stem}.json, .csv, .md")


if __name__ == "__main__":
    main()
