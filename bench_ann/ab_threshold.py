"""A/B of the sparse pass 2's threshold (``kernels.estep.SKIP_LOG2``, the ``skip_log2`` argument) on one GPU.

The sparse E-step drops every (64-row tile, 64-component block) pair whose responsibilities pass 1 bounds below
2^-t. For each threshold t this prints the fraction of pairs kept, the sparse E-step's median time (interleaved
rounds) and the relative difference of its statistics (Nk, Sx, Sq; max over the three of ||got - dense|| /
||dense||) from the dense E-step of the same kernels, i.e. what the dropped terms change. Problems: the kernel
benchmark's (``bench_kernels.ab_problem``) and, with ``--fit-state``, the state of a ``GaussianMixture`` fit on
the fit benchmark's data (``bench_fit.sift_like``, 2000 clusters) after its k-means warm start and ``--em-iter``
EM iterations, where posteriors overlap more. Writes ``ab_threshold.json``.

    python -m bench_ann.ab_threshold --fit-state --diag --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench, rel_err


def add_fit_state_args(ap):
    """--fit-state (also a fit's own state, :func:`fit_state`) and --em-iter (its EM iterations)."""
    ap.add_argument("--fit-state", action="store_true")
    ap.add_argument("--em-iter", type=int, default=8)


def fit_state(n, k, d, em_iter, covariance_type="spherical"):
    """(x, center, means, var, log_weights), means in the centred frame, after a GaussianMixture fit (bf16,
    sparse E-step) of ``em_iter`` EM iterations on the fit benchmark's data; var (K,) or, for
    ``covariance_type="diag"``, (K, D)."""
    from bench_ann.bench_fit import sift_like
    from flashgmm_faiss import GaussianMixture
    x = sift_like(n, d, 2000)
    g = GaussianMixture(k, covariance_type=covariance_type, kmeans_iter=10, max_iter=em_iter, tol=0,
                        backend="triton", precision="bf16", device="cuda").fit(x)
    center = x.mean(0)
    means = torch.as_tensor(g.means_, device=x.device).float() - center
    var = torch.as_tensor(g.covariances_, device=x.device).float()
    lw = torch.log(torch.as_tensor(g.weights_, device=x.device).float())
    return x, center, means.contiguous(), var, lw


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    ap.add_argument("--thresholds", default="40,32,28,24,20")
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--diag", action="store_true", help="also diag covariances (tf32)")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    ts = [float(v) for v in a.thresholds.split(",")]
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "k": a.k, "d": a.d, "problems": {}}
    problems = {}
    x, _, means, var_sph, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems["bench_kernels"] = (x, None, means, var_sph, var_diag, lw)
    if a.fit_state:
        xf, cf, mf, vf, lwf = fit_state(a.n, a.k, a.d, a.em_iter)
        problems["fit_state"] = (xf, cf, mf, vf, None, lwf)
    for pname, (x, center, means, var_sph, var_diag, lw) in problems.items():
        perm = kernels.component_order(means)
        cases = [(p, False, var_sph) for p in a.precisions.split(",")]
        if a.diag and var_diag is not None:
            cases.append(("tf32", True, var_diag))
        res = out["problems"].setdefault(pname, {})
        for prec, diag, var in cases:
            label = f"{'diag' if diag else 'spherical'}-{prec}"
            params = kernels.prepare(means, var, lw, prec, float(kernels.absmax(x, center)), comp_perm=perm)
            best = kernels.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                 return_best=True)[4]
            order = kernels.row_order(best, perm)
            dense = kernels.estep(x, means, var, lw, precision=prec, center=center, params=params)
            fns, kept, diff = {"dense": lambda: kernels.estep(x, means, var, lw, precision=prec, center=center,
                                                              params=params)}, {}, {}
            for t in ts:
                def f(t=t, pairs=None):
                    return kernels.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                         order=order, skip_log2=t, pair_counts=pairs)
                fns[f"2^-{t:g}"] = f
                pairs = torch.zeros(2, dtype=torch.int64, device=x.device)
                diff[t] = rel_err(f(pairs=pairs)[1:], [r.double() for r in dense[1:]])
                kept[t] = pairs[0].item() / pairs[1].item()
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    times[name].append(bench(f, a.rep))
            res[label] = {"pairs_kept": kept, "rel_diff_vs_dense": diff, "times_ms": times}
            print(f"[{pname} {label}] dense " + " ".join(f"{v:.3f}" for v in times["dense"]), flush=True)
            for t in ts:
                print(f"  2^-{t:<4g} kept {kept[t]:.3f}  rel diff vs dense {diff[t]:.1e}  ms "
                      + " ".join(f"{v:.3f}" for v in times[f'2^-{t:g}']), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_threshold.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
