"""Collapsed components: are the Triton backend's fitted models and scores those of float64, and what does the exact
path (``flashgmm_faiss._collapsed``) cost?

A component collapsed onto duplicate rows (variance at the ``reg_covar`` floor far from the centre) makes the
kernels' float32 expanded logits cancel; the Triton backend keeps such components out of the kernels and recomputes
the rows they explain in torch. For each problem this fits the Triton backend and the torch backend (same seeds)
and reports: the collapsed components of the Triton fit's final parameters and the share of rows they make the
backend recompute; the largest and mean |score_samples - float64| (direct differences, on up to ``--check-rows``
rows); the final mean log-likelihoods of both backends; the largest relative difference of the variances; the
median ms per EM iteration of both backends, and the CUDA-graph replays of the Triton fit (iterations with
collapsed components run eagerly).

Problems: the duplicates reproducer of NOTES.md v45 (100 distinct N(0, 25) rows in D=32, 30 copies each, plus 1000
random rows, K=64, 50 EM iterations), the bundled siftsmall (real SIFT: diag fits collapse in features that are 0
throughout a cluster) at K=64 and 256, SIFT-like data at the issue's shape (N=2^20, K=1024, D=128: nothing
collapses; the cost of the test itself), and siftsmall resampled to N=2^20 (:func:`resampled`: each row a siftsmall
row with N(0, 2^2) added to its nonzero features, so that the zeros, which make diag components collapse, stay
zeros) at K=1024: the exact path at scale, against the torch backend.

    python -m bench_ann.collapsed_components --out bench_ann/results/v46_collapsed
    python -m bench_ann.collapsed_components --quick --device cpu --out /tmp/cc     # CPU interpreter smoke run
    python -m bench_ann.collapsed_components --only-large --out DIR                 # the N=2^20 problems only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flashgmm_faiss import GaussianMixture, _collapsed
from flashgmm_faiss.cli import load_siftsmall


def duplicates(n_distinct=100, copies=30, extra=1000, d=32, seed=0):
    """(n, d) float32: ``n_distinct`` rows of N(0, 25), each repeated ``copies`` times, then ``extra`` random rows."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_distinct, d)).astype(np.float32) * 5
    return np.vstack([np.repeat(base, copies, 0), rng.standard_normal((extra, d)).astype(np.float32) * 5])


def resampled(xb: np.ndarray, n: int, noise: float = 2.0, seed: int = 0) -> np.ndarray:
    """(n, D) float32: rows of ``xb`` drawn with replacement, ``N(0, noise^2)`` added to their nonzero features and
    clipped to 0..255 (SIFT's range); zero features stay zero."""
    rng = np.random.default_rng(seed)
    x = xb[rng.integers(0, len(xb), n)].astype(np.float32)
    jitter = rng.standard_normal(x.shape, dtype=np.float32) * noise
    return np.clip(np.where(x > 0, x + jitter, 0.0), 0.0, 255.0).astype(np.float32)


def float64_scores(x, fit, rows: int, piece: int = 1024):
    """log-likelihoods of the first ``rows`` rows of x under ``fit``'s parameters, float64 direct differences."""
    m = torch.as_tensor(fit.means_, dtype=torch.float64)
    v = torch.as_tensor(fit.covariances_, dtype=torch.float64)
    v = v[:, None].expand_as(m) if v.ndim == 1 else v
    const = torch.log(torch.as_tensor(fit.weights_, dtype=torch.float64)) - 0.5 * (
        m.shape[1] * np.log(2 * np.pi) + torch.log(v).sum(1))
    out = []
    for s in range(0, rows, piece):
        xs = torch.as_tensor(np.asarray(x[s:min(rows, s + piece)]), dtype=torch.float64)
        quad = ((xs[:, None, :] - m[None]) ** 2 / v[None]).sum(2)
        out.append(torch.logsumexp(const - 0.5 * quad, 1))
    return torch.cat(out).numpy()


def redo_share(fit, x) -> float:
    """Share of rows of x whose collapsed components make the Triton backend recompute them in torch, under the
    fitted parameters (the kernels' log-likelihoods without those components, against theirs)."""
    impl = fit._impl
    dev = fit._device
    m = torch.as_tensor(fit.means_ - fit.center_, device=dev)
    v = torch.as_tensor(fit.covariances_, device=dev)
    cols = _collapsed.collapsed_components(m, v)
    if not cols:
        return 0.0
    lw = torch.log(torch.as_tensor(fit.weights_, device=dev))
    xt = torch.as_tensor(np.asarray(x), device=dev, dtype=torch.float32)
    c = torch.as_tensor(fit.center_, device=dev, dtype=torch.float32)
    sp = _collapsed.split(v.float(), lw.float(), cols)
    if sp.torch_only:
        return 1.0
    ln = impl._k().score(xt, m.float(), sp.var, sp.log_weights, precision=impl.precision, center=c)[0]
    lse = _collapsed.collapsed_lse(xt, c, m.float(), v.float(), lw.float(), sp.cols)
    return _collapsed.rows_to_redo(ln, lse).numel() / xt.shape[0]


def run_case(name, x, k, cov, precision, device, em_iter, kmeans_iter, check_rows, torch_reference=True):
    kw = dict(covariance_type=cov, kmeans_iter=kmeans_iter, max_iter=em_iter, tol=0.0, seed=0, device=device)
    fits = {}
    for backend in ("triton", "torch") if torch_reference else ("triton",):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"precision": precision} if backend == "triton" else {}
            t0 = time.perf_counter()
            fits[backend] = GaussianMixture(k, backend=backend, **extra, **kw).fit(x)
            fits[backend].wall_s = time.perf_counter() - t0
    a = fits["triton"]
    xs = x[:check_rows] if isinstance(x, np.ndarray) else x[:check_rows].cpu().numpy()
    rows = xs.shape[0]
    err = np.abs(a.score_samples(xs) - float64_scores(xs, a, rows))
    m = torch.as_tensor(a.means_ - a.center_)
    cols = _collapsed.collapsed_components(m, torch.as_tensor(a.covariances_))
    row = {
        "problem": name, "n": int(x.shape[0]), "d": int(x.shape[1]), "K": k, "cov": cov, "precision": precision,
        "em_iter": em_iter, "collapsed": len(cols), "redo_share": redo_share(a, xs),
        "score_err_max": float(err.max()), "score_err_mean": float(err.mean()), "checked_rows": rows,
        "ll_triton": a.lower_bound_, "triton_ms": 1e3 * statistics.median(h["seconds"] for h in a.history_[1:]),
        "graph_replays": a.graph_replays_,
    }
    if torch_reference:
        b = fits["torch"]
        row.update(ll_torch=b.lower_bound_,
                   var_rel_diff=float(np.abs(a.covariances_ / b.covariances_ - 1).max()),
                   torch_ms=1e3 * statistics.median(h["seconds"] for h in b.history_[1:]))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny problems (the CPU interpreter)")
    ap.add_argument("--check-rows", type=int, default=20000)
    ap.add_argument("--skip-large", action="store_true", help="leave out the N=2^20 problems")
    ap.add_argument("--only-large", action="store_true", help="only the N=2^20 problems")
    ap.add_argument("--no-bf16-floor", action="store_true",
                    help="fit bf16 without the variance floor (TritonBackend.floor_resolution -> None)")
    args = ap.parse_args(argv)
    if args.no_bf16_floor:
        from flashgmm_faiss._triton_backend import TritonBackend
        TritonBackend.floor_resolution = lambda self: None
    quick = args.quick
    precisions = ("ieee",) if quick else ("tf32", "bf16")
    xb = load_siftsmall()[0]
    cases = []
    dup = duplicates(20, 10, 100, 16) if quick else duplicates()
    for cov in ("spherical", "diag") if not args.only_large else ():
        for p in precisions:
            cases.append(("duplicates", dup, 12 if quick else 64, cov, p, 8 if quick else 50, 5, True))
    for k in ((16,) if quick else (64, 256)) if not args.only_large else ():
        for cov in ("spherical", "diag"):
            cases.append(("siftsmall", xb[:1000] if quick else xb, k, cov, precisions[0], 5 if quick else 30, 5, True))
    if not quick and not args.skip_large:
        from bench_ann.bench_fit import sift_like
        x = sift_like(1 << 20, 128, 2000, device=args.device)
        for cov in ("spherical", "diag"):
            cases.append(("SIFT-like", x, 1024, cov, "tf32", 20, 10, False))
        big = torch.as_tensor(resampled(xb, 1 << 20), device=args.device)
        for p in precisions:
            cases.append(("siftsmall-1M", big, 1024, "diag", p, 20, 10, True))
    rows = []
    head = (f"{'problem':<11} {'K':>5} {'cov':<9} {'prec':<5} {'coll.':>5} {'redo':>6} {'|err| max':>10} "
            f"{'mean':>9} {'ll triton':>11} {'ll torch':>11} {'var diff':>9} {'ms triton':>9} {'ms torch':>9} "
            f"{'replays':>7}")
    print(head, flush=True)
    for case in cases:
        r = run_case(*case[:5], args.device, *case[5:7], args.check_rows, case[7])
        rows.append(r)
        print(f"{r['problem']:<11} {r['K']:>5} {r['cov']:<9} {r['precision']:<5} {r['collapsed']:>5} "
              f"{r['redo_share']:>6.3f} {r['score_err_max']:>10.3g} {r['score_err_mean']:>9.2g} "
              f"{r['ll_triton']:>11.5f} {r.get('ll_torch', float('nan')):>11.5f} "
              f"{r.get('var_rel_diff', float('nan')):>9.2g} {r['triton_ms']:>9.2f} "
              f"{r.get('torch_ms', float('nan')):>9.2f} {r['graph_replays']:>7}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python -m bench_ann.collapsed_components " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collapsed_components.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
