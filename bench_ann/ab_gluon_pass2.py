"""A/B of the sparse diag "tf32" pass 2: the Triton kernel against the Gluon one (``estep.GLUON_PASS2``).

On a diag fit's state (:func:`bench_ann.estep_floors.diag_fit_state`) and on an odd problem (N=100,003, K=1000,
D=96, parameters from k-means), the sorted E-step (``estep(sort_rows=True)``) with either pass 2:

* the statistics (Nk, Sx, Sq): bitwise equal or not, and the largest norm-relative difference;
* times, in interleaved rounds: the E-step (CUDA events) and its pass-2 kernel (torch profiler).

    python -m bench_ann.ab_gluon_pass2 --out bench_ann/results/DIR

Writes ``ab_gluon_pass2.json`` in --out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

from bench_ann.bench_fit import add_problem_args
from bench_ann.estep_floors import _cuda_ms, diag_fit_state, kernel_times


def _odd_problem(ke):
    from bench_ann.bench_kernels import make_data, make_params
    from flashgmm_faiss import kernels
    x = make_data(100_003, 96)
    means, _, var, lw = make_params(x, 1000, kernels)
    params = ke.prepare(means, var, lw, "tf32", ke.absmax(x), comp_perm=ke.component_order(means))
    return x, means, var, lw, None, params


def _compare(ke, x, means, var, lw, center, params):
    outs = []
    for flag in (False, True):
        ke.GLUON_PASS2 = flag
        outs.append(ke.estep(x, means, var, lw, precision="tf32", center=center, params=params, sort_rows=True))
    ke.GLUON_PASS2 = False
    res = {}
    for name, a, b in zip(("logz", "nk", "sx", "sq"), outs[0], outs[1]):
        rel = float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-300))
        res[name] = {"bitwise": bool(torch.equal(a, b)), "norm_rel_diff": rel,
                     "finite": bool(torch.isfinite(b).all())}
    return res


def _timings(ke, x, means, var, lw, center, params, rounds, rep):
    def fn():
        return ke.estep(x, means, var, lw, precision="tf32", center=center, params=params, sort_rows=True)

    rows = []
    for r in range(rounds):
        for flag in (False, True):
            ke.GLUON_PASS2 = flag
            kt = kernel_times(fn, rep)
            pass2 = sum(v for kn, v in kt.items() if "stats_kernel" in kn)
            rows.append({"round": r, "gluon": flag, "estep_ms": _cuda_ms(fn, rep), "pass2_us": pass2})
    ke.GLUON_PASS2 = False
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(p)
    p.add_argument("--kmeans-iter", type=int, default=3)
    p.add_argument("--em-iter", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(args)}
    odd = _odd_problem(ke)
    out["odd_problem"] = {"n": 100_003, "k": 1000, "d": 96, "compare": _compare(ke, *odd)}
    print("odd problem (N=100003, K=1000, D=96):", json.dumps(out["odd_problem"]["compare"]), flush=True)
    del odd
    *state, fit_s = diag_fit_state(args.n, args.k, args.d, args.clusters, args.kmeans_iter, args.em_iter)
    out["fit_state"] = {"fit_s": fit_s, "compare": _compare(ke, *state)}
    print("fit state:", json.dumps(out["fit_state"]["compare"]), flush=True)
    out["fit_state"]["timings"] = _timings(ke, *state, args.rounds, args.rep)
    print("| round | pass 2 | sorted E-step ms | pass 2 us |")
    print("|---|---|---:|---:|")
    for r in out["fit_state"]["timings"]:
        print(f"| {r['round']} | {'Gluon' if r['gluon'] else 'Triton'} | {r['estep_ms']:.3f} | {r['pass2_us']:.1f} |")
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "ab_gluon_pass2.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
