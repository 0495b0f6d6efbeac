"""Where the time of ``GaussianMixture.fit`` outside its iterations goes (``bench_fit``'s "other s"), on one GPU.

Times, after a warm-up, with a device synchronisation around each (medians of ``--rep`` runs):

* ``fit(kmeans_iter=0, max_iter=0)``: the whole set-up (validation pass, sample, k-means++ seeding, variances);
* the same with ``init`` given as an array: everything but the seeding;
* the sample draw alone (``rng.choice`` of max(50 K, 10^4) rows and their gather) and ``kmeans_plusplus`` alone
  on each of its paths (``SEEDING_PATHS``: "pruned" and "fused", the update kernel and the one-program draw with and
  without the triangle-inequality pruning; "update", the update kernel and torch's cumulative sum and search;
  "torch"), replayed as CUDA graphs and launched eagerly (all seeds must equal the default path's);
* ``fit(kmeans_iter=1, max_iter=0)``: the set-up plus one k-means iteration and the k-means variances pass (the
  iteration's cost is its difference with the first row).

    python -m bench_ann.time_fit_setup --n 1000000 --k 1024 --d 128 --out bench_ann/results/fit_setup
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flashgmm_faiss import GaussianMixture
from flashgmm_faiss.gmm import SEEDING_PATHS, kmeans_plusplus, seeding_sample_rows

from .bench_fit import add_problem_args, sift_like


def _timed(fn, rep: int) -> float:
    """Median wall time (ms) of fn() over rep runs, each between two device synchronisations."""
    times = []
    for _ in range(rep):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args):
    dev = torch.cuda.get_device_name(0)
    X = sift_like(args.n, args.d, args.clusters, device="cuda")
    n, d, k = args.n, args.d, args.k
    kw = dict(covariance_type=args.cov, backend="triton", precision="tf32", seed=0, verbose=0)
    init = X[torch.randperm(n, device="cuda")[:k]].cpu().numpy()

    def fit(**extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GaussianMixture(k, **{**kw, **extra}).fit(X)
    m = seeding_sample_rows(n, k)
    center = X.double().mean(0).float()

    def draw():
        idx = np.random.default_rng(0).choice(n, size=m, replace=False)
        return X[torch.as_tensor(idx, device="cuda")].sub_(center)
    sample = draw()

    def seed(graphs=True, path=None):
        return kmeans_plusplus(sample, k, np.random.default_rng(1), cuda_graphs=graphs, path=path)
    ref = seed(True)
    paths = [p for p in SEEDING_PATHS if p != "torch" or not args.no_torch_path]
    same_seeds = all(bool(torch.equal(seed(g, p), ref)) for p in paths for g in (True, False) if p != "torch" or g)
    parts = {
        "fit, no iterations (set-up)": lambda: fit(kmeans_iter=0, max_iter=0),
        "fit, no iterations, init given (no seeding)": lambda: fit(kmeans_iter=0, max_iter=0, init=init),
        f"sample draw ({m} rows)": draw,
    }
    for p in paths:
        parts[f"k-means++ seeding, path={p} (CUDA graphs)"] = lambda p=p: seed(True, p)
        if p != "torch":
            parts[f"k-means++ seeding, path={p} (eager launches)"] = lambda p=p: seed(False, p)
    parts["fit, one k-means iteration (+ its variances pass)"] = lambda: fit(kmeans_iter=1, max_iter=0)
    for fn in parts.values():        # warm-up: compilation, autotuning
        fn()
    rows = [{"part": name, "ms": _timed(fn, args.rep)} for name, fn in parts.items()]
    lines = [f"# GaussianMixture.fit set-up on {dev}", "",
             f"N={n}, K={k}, D={d}, cov={args.cov}, X on the GPU, torch {torch.__version__}; medians of {args.rep} "
             f"runs after a warm-up. Seeds of every path, with and without CUDA graphs, equal: {same_seeds}.", "",
             "| part | ms |", "|---|---:|"]
    lines += [f"| {r['part']} | {r['ms']:.1f} |" for r in rows]
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fit_setup_{dev.lower().replace(' ', '_')}_n{n}_k{k}_d{d}_{args.cov}"
    meta = {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "args": vars(args), "same_seeds": same_seeds, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(p)
    p.add_argument("--cov", default="spherical", choices=["spherical", "diag"])
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--no-torch-path", action="store_true",
                   help="skip kmeans_plusplus(path='torch') (19 s per run at K=16384)")
    p.add_argument("--out", default="bench_ann/results/fit_setup")
    main_args = p.parse_args()
    run(main_args)


if __name__ == "__main__":
    main()
