"""Per-iteration re-seed counts of diag GaussianMixture fits (Triton backend) on the fit benchmark's data.

A component that EM re-seeds costs its iteration a second pass (the worst-explained rows) and the lookahead
iteration issued before it; a fit that re-seeds again and again never settles. Prints, per precision, the fit's
``history_[i]["n_reseeded"]``, every third log-likelihood and the smallest component weight (in rows).

    python -m bench_ann.fit_reseed_history --n 1000000 --k 4096 --d 128 [--precisions bf16,tf32]
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch

from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--em-iter", type=int, default=30)
    ap.add_argument("--precisions", default="bf16,tf32")
    a = ap.parse_args(argv)
    x = sift_like(a.n, a.d, a.clusters)
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "k": a.k, "d": a.d, "fits": {}}
    for prec in a.precisions.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(a.k, covariance_type="diag", tol=0.0, backend="triton", device="cuda",
                                precision=prec, kmeans_iter=10, max_iter=a.em_iter, seed=0).fit(x)
        fit = {"n_reseeded": [h["n_reseeded"] for h in g.history_],
               "log_likelihood": [h["log_likelihood"] for h in g.history_],
               "min_weight_rows": float(g.weights_.min() * a.n)}
        out["fits"][prec] = fit
        print(prec, "re-seeded", fit["n_reseeded"])
        print("   log-likelihood", " ".join(f"{v:.5f}" for v in fit["log_likelihood"][::3]))
        print("   smallest weight (rows)", fit["min_weight_rows"], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
