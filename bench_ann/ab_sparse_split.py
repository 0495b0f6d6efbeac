"""A/B of how the sparse pass 2 splits its work lists over programs, on one GPU, in interleaved rounds.

The sparse pass 2 (``kernels/estep.py``, ``order=``) streams, per 64-component block, the 64-row tiles that pass 1
kept. Variants:

* ``baseline``: an older ``estep.py`` given by ``--baseline`` (e.g. ``git show c31ee0a:kernels/estep.py``), where
  each block's list is cut into the same number of equal parts (programs = blocks x slabs), so the programs of the
  longest lists form the tail;
* ``even P/SM``: this tree's kernels, the concatenated lists cut into ``P/SM x SMs`` equal ranges
  (``SPARSE_PROGRAMS_PER_SM``).

Two problems: the kernel benchmark's (``bench_kernels.ab_problem``: centred SIFT-like rows, means from three k-means
steps) and, with ``--fit-state``, the state of a ``GaussianMixture`` fit on ``bench_fit.sift_like`` data (the fit
benchmark's data, 2000 clusters) after its k-means warm start and a few EM iterations. For each it prints the pairs
kept, the per-block list lengths (max / mean) and the sparse E-step's median time per variant and precision, and
writes ``ab_sparse_split.json``.

    python -m bench_ann.ab_sparse_split --baseline /tmp/estep_old.py --fit-state --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_shape_args, bench


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fit_state(n, k, d, em_iter):
    """(x, center, means, var, log_weights) in the centred frame after a GaussianMixture fit (bf16, sparse) of
    ``em_iter`` EM iterations on the fit benchmark's data."""
    from bench_ann.bench_fit import sift_like
    from flashgmm_faiss import GaussianMixture
    x = sift_like(n, d, 2000)
    g = GaussianMixture(k, kmeans_iter=10, max_iter=em_iter, tol=0, backend="triton", precision="bf16",
                        device="cuda").fit(x)
    center = x.mean(0)
    dev = x.device
    means = torch.as_tensor(g.means_, device=dev).float() - center
    var = torch.as_tensor(g.covariances_, device=dev).float()
    lw = torch.log(torch.as_tensor(g.weights_, device=dev).float())
    return x, center, means.contiguous(), var, lw


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--baseline", default=None, help="path of an older kernels/estep.py to compare with")
    ap.add_argument("--programs-per-sm", default="2,4,8")
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--diag", action="store_true", help="also diag covariances (tf32)")
    ap.add_argument("--fit-state", action="store_true")
    ap.add_argument("--em-iter", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=60)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    mods = {}
    if a.baseline:
        mods["baseline"] = load_module(a.baseline, "estep_baseline")
    pps = [int(v) for v in a.programs_per_sm.split(",")]
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "k": a.k, "d": a.d, "problems": {}}

    problems = {}
    x, bound, means, var_sph, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
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
            bnd = float(kernels.absmax(x, center))
            fns, info = {}, {}
            for mname, mod in [("this tree", ke)] + list(mods.items()):
                params = mod.prepare(means, var, lw, prec, bnd, comp_perm=perm)
                best = mod.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                 return_best=True)[4]
                order = mod.row_order(best, perm)
                if mname == "this tree":
                    import triton
                    n = x.shape[0]
                    gaps = torch.empty(triton.cdiv(n, ke.FLAG_ROWS), dtype=torch.int64, device=x.device)
                    ke.launch_logz(x, params, a.k, diag, prec, center=center, order=order,
                                   lzp=torch.empty(n, device=x.device), gaps=gaps, skip=ke.SKIP_LOG2)
                    counts = ke._work_lists(gaps, triton.cdiv(a.k, ke.FLAG_K))[1].double()
                    info = {"pairs_kept": float(counts.sum()) / (gaps.numel() * counts.numel()),
                            "list_max_over_mean": float(counts.max() / counts.mean()),
                            "list_lengths": counts.int().tolist()}
                    ref = mod.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                    order=order)

                    def run(p, params=params, order=order):
                        ke.SPARSE_PROGRAMS_PER_SM = p
                        return ke.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                        order=order)
                    for p in pps:
                        fns[f"even {p}/SM"] = lambda p=p, run=run: run(p)
                else:
                    fns[mname] = (lambda mod=mod, params=params, order=order:
                                  mod.estep(x, means, var, lw, precision=prec, center=center, params=params,
                                            order=order))
            # the variants agree (fp32 summation order aside)
            agree = {}
            for name, f in fns.items():
                got = f()
                agree[name] = max(float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
                                  for g, r in zip(got[1:], ref[1:]))
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    times[name].append(bench(f, a.rep))
            ke.SPARSE_PROGRAMS_PER_SM = pps[0]
            res[label] = {**info, "times_ms": times, "rel_diff_vs_this_tree": agree}
            print(f"[{pname} {label}] pairs kept {info['pairs_kept']:.3f}, list max/mean "
                  f"{info['list_max_over_mean']:.2f}", flush=True)
            for name, ts in times.items():
                print(f"  {name:14s} " + " ".join(f"{t:7.3f}" for t in ts) + f"  (rel diff {agree[name]:.1e})",
                      flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_sparse_split.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
