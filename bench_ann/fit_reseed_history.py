"""Per-iteration re-seed counts of GaussianMixture fits (Triton backend) on the fit benchmark's data.

A component that EM re-seeds costs its iteration a second pass (the worst-explained rows) and the lookahead
iteration issued before it; a fit that re-seeds again and again never settles. Prints, per (covariance, precision,
bf16 variance floor), the fit's ``history_[i]["n_reseeded"]``, every third log-likelihood, the smallest component
weight (in rows), the median ms per EM iteration and the number of collapsed components of the fitted model.

``--floors on,off`` fits bf16 both with the variance floor ``(BF16_MEAN_RESOLUTION mu)^2``
(``TritonBackend.floor_resolution``) and without it (the question of NOTES.md v46/v47: is the floor still needed
now that collapsed components run on the exact path?). ``--torch-reference`` adds the torch backend's fit (no floor:
the model sklearn fits) from the same seeds.

    python -m bench_ann.fit_reseed_history --n 1000000 --k 4096 --d 128 [--precisions bf16,tf32] [--floors on,off]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture, _collapsed
from flashgmm_faiss._triton_backend import TritonBackend


def one_fit(x, k, cov, em_iter, backend, precision=None):
    kw = {"precision": precision} if backend == "triton" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(k, covariance_type=cov, tol=0.0, backend=backend, device="cuda", kmeans_iter=10,
                            max_iter=em_iter, seed=0, **kw).fit(x)
    m = torch.as_tensor(g.means_ - g.center_)
    return {"n_reseeded": [h["n_reseeded"] for h in g.history_],
            "log_likelihood": [h["log_likelihood"] for h in g.history_],
            "ms_per_iter": 1e3 * statistics.median(h["seconds"] for h in g.history_[1:]),
            "min_weight_rows": float(g.weights_.min() * x.shape[0]),
            "collapsed": len(_collapsed.collapsed_components(m, torch.as_tensor(g.covariances_)))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--em-iter", type=int, default=30)
    ap.add_argument("--covs", default="diag")
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--floors", default="on", help="bf16 variance floor: on, off or on,off")
    ap.add_argument("--torch-reference", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    x = sift_like(a.n, a.d, a.clusters)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "n": a.n, "k": a.k, "d": a.d, "fits": {}}
    floor = TritonBackend.floor_resolution
    runs = [(cov, "torch", None) for cov in a.covs.split(",")] if a.torch_reference else []
    runs += [(cov, p, f) for cov in a.covs.split(",") for p in a.precisions.split(",")
             for f in (a.floors.split(",") if p == "bf16" else ["on"])]
    for cov, prec, fl in runs:
        TritonBackend.floor_resolution = floor if fl != "off" else (lambda self: None)
        try:
            fit = one_fit(x, a.k, cov, a.em_iter, "torch" if prec == "torch" else "triton", prec)
        finally:
            TritonBackend.floor_resolution = floor
        name = f"{cov} {prec}" + (" no-floor" if fl == "off" else "")
        out["fits"][name] = fit
        print(name, "re-seeded", fit["n_reseeded"])
        print("   log-likelihood", " ".join(f"{v:.5f}" for v in fit["log_likelihood"][::3]),
              f"final {fit['log_likelihood'][-1]:.5f}")
        print(f"   smallest weight (rows) {fit['min_weight_rows']:.3g}, collapsed {fit['collapsed']}, "
              f"{fit['ms_per_iter']:.2f} ms per EM iteration", flush=True)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "fit_reseed_history.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
