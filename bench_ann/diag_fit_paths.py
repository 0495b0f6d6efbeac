"""Ten diag EM steps on the GPU test's problem, several arithmetics side by side (a GPU diagnostic).

On the problem of ``tests/test_gmm_gpu.py::test_triton_fit_matches_float64_em`` (50,000 SIFT-like rows clipped to
0..255, K=64, D=128, means = random rows, var=400, reg_covar=1e-6) variances collapse onto clipped values within a
few steps, where a logit is ``P (x - mu)^2`` with P ~ 1e3..1e6: every arithmetic's path then depends on its
rounding. This script prints the mean log-likelihood and the smallest variance per step for: float64 EM (the direct
``sum P (x - mu)^2`` form, the reference), the torch backend (float32) and the Triton backend in "ieee" and "tf32"
(A = -2 mu / var as two fp16 terms, the shipped form, and as one, ``kernels.estep.DIAG_SPLIT_A``); then, from each
float64 state, one step of each against one float64 step (teacher-forced one-step errors). Writes JSON to
``--out``. Measured (H200, 2026-11-22, ``results/v9_diag_split_a/diag_fit_paths.json``): every float32 arithmetic
leaves the float64 path at step 3, where float64 collapses a variance to 3.7e-4 and they do not (worst relative
deviation 3.5e-3 for all of them); the float32 paths agree with each other to ~1e-5 until a variance collapses in
one of them (two-term "tf32": a different component at step 7, -541.0 against -543.3 at step 10). One step from
float64's states: two-term "tf32" 1.9e-4 (variances) from the start, 5-10e-5 later; one term 1.1e-3, then 6-12e-5;
from the state before float64's collapse all float32 arithmetics are 0.38 off on the means.

    python -m bench_ann.diag_fit_paths --out bench_ann/results
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flashgmm_faiss import GaussianMixture

from .diag_precision_model import sift_like


def float64_path(X, means, weights, var, iters, reg_covar=1e-6, states=None):
    """Mean log-likelihood and smallest variance per step; appends (means, weights, var) to ``states``."""
    x = torch.as_tensor(X, dtype=torch.float64, device="cuda")
    mu = torch.as_tensor(means, dtype=torch.float64, device="cuda")
    v = torch.as_tensor(var, dtype=torch.float64, device="cuda")
    w = torch.as_tensor(weights, dtype=torch.float64, device="cuda")
    out = []
    for _ in range(iters):
        lp = torch.empty(x.shape[0], mu.shape[0], dtype=torch.float64, device="cuda")
        for k in range(mu.shape[0]):           # direct form, no cancellation
            lp[:, k] = -0.5 * (((x - mu[k]) ** 2 / v[k]).sum(1) + torch.log(2 * torch.pi * v[k]).sum())
        lp += torch.log(w)
        lz = torch.logsumexp(lp, 1)
        r = torch.exp(lp - lz[:, None])
        nk = r.sum(0)
        mu = (r.T @ x) / nk[:, None]
        sq = torch.stack([(r[:, k:k + 1] * (x - mu[k]) ** 2).sum(0) for k in range(mu.shape[0])])
        v = sq / nk[:, None] + reg_covar
        w = nk / nk.sum()
        out.append((lz.mean().item(), v.min().item()))
        if states is not None:
            states.append((mu.cpu().numpy(), w.cpu().numpy(), v.cpu().numpy()))
    return out


def one_step_errors(X, states, backend, precision):
    """Teacher-forced: from each state of the float64 path ``states`` (its start, then one per step), one step of
    the estimator against the path's next state (float64's step from there); per step the norm-relative error of
    the means (centred frame) and of the variances."""
    c = X.mean(0, dtype=np.float64)
    out = []
    for (mu, w, v), (rmu, _, rv) in zip(states[:-1], states[1:]):
        g = _fit(X, mu, w, v, 1, backend, precision)
        out.append({"means": float(np.linalg.norm(g.means_ - rmu) / np.linalg.norm(rmu - c)),
                    "variances": float(np.linalg.norm(g.covariances_ - rv) / np.linalg.norm(rv))})
    return out


def _fit(X, means, weights, var, iters, backend, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(means.shape[0], covariance_type="diag", init=means, weights_init=weights,
                               covariances_init=var, kmeans_iter=0, tol=0.0, backend=backend, device="cuda",
                               precision=precision, max_iter=iters).fit(torch.as_tensor(X, device="cuda"))


def estimator_path(X, means, weights, var, iters, backend, precision):
    g = _fit(X, means, weights, var, iters, backend, precision)
    return [(h["log_likelihood"], None) for h in g.history_], float(g.covariances_.min())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="bench_ann/results")
    args = ap.parse_args()
    X = sift_like(50_000, 128, 64)
    means = X[np.random.default_rng(1).choice(len(X), 64, replace=False)]
    weights = np.full(64, 1 / 64)
    var = np.full((64, 128), 400.0)
    states = [(means, weights, var)]
    paths = {"float64": float64_path(X, means, weights, var, args.iters, states=states)}
    finals = {}
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    shipped = kestep.DIAG_SPLIT_A
    arithmetics = (("torch fp32", "torch", "tf32", shipped), ("triton ieee", "triton", "ieee", shipped),
                   ("triton tf32", "triton", "tf32", True), ("triton tf32, A one term", "triton", "tf32", False))
    steps = {}
    for name, backend, prec, split in arithmetics:
        kestep.DIAG_SPLIT_A = split
        paths[name], finals[name] = estimator_path(X, means, weights, var, args.iters, backend, prec)
        steps[name] = one_step_errors(X, states, backend, prec)
    kestep.DIAG_SPLIT_A = shipped
    names = list(paths)
    print("step | " + " | ".join(names))
    for i in range(args.iters):
        print(f"{i + 1:4d} | " + " | ".join(f"{paths[n][i][0]:.4f}" for n in names))
    print("float64 min var per step:", [f"{m:.3g}" for _, m in paths["float64"]])
    print("final min var:", finals)
    dev = {n: max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(paths[n], paths["float64"])) for n in names}
    print("worst relative deviation of the path from float64:", dev)
    print("teacher-forced one-step errors against float64 from float64's states (means / variances):")
    print("step | " + " | ".join(steps))
    for i in range(len(states) - 1):
        print(f"{i:4d} | " + " | ".join(f"{steps[n][i]['means']:.2e} / {steps[n][i]['variances']:.2e}" for n in steps))
    worst = {n: {q: max(e[q] for e in steps[n]) for q in ("means", "variances")} for n in steps}
    print("worst one-step errors:", worst)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diag_fit_paths.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
         "command": "python -m bench_ann.diag_fit_paths", "paths": paths, "final_min_var": finals,
         "worst_rel_deviation_from_float64": dev, "one_step_errors_from_float64_states": steps,
         "worst_one_step_errors": worst}, indent=1))


if __name__ == "__main__":
    main()
