"""A/B of the sparse pass 2's launch order: programs by component block, longest work lists first
(``estep.PASS2_HEAVY_FIRST``), against the plain (block-interleaved) order.

Kernel part, on two problems, the sorted diag "tf32" E-step (``estep.estep(sort_rows=True)``, the diag fits'
E-step) in either order:

* ``fit``: a diag fit's state (:func:`bench_ann.estep_floors.diag_fit_state`: N=1e6, K=1024, D=128 by default);
* ``bench``: the kernel benchmark's state (``bench_kernels.make_data`` / ``make_params``: parameters from 3 k-means
  steps, broader posteriors, about twice the kept pairs);
* ``odd``: N=100,003, K=1000, D=96 (statistics only).

For each: the kept pairs and the blocks' work (max / mean of the work lists' lengths), whether the statistics are
bitwise equal, then, in interleaved rounds, the E-step's time (median, ``bench_kernels.bench``), its pass-2
kernel's and the partials' reduction's (torch profiler, mean over --rep calls). Fit part (``--fits``): whole
``GaussianMixture`` fits per "cov precision" with each order, interleaved (``bench_fit.interleaved_fits``).

    python -m bench_ann.ab_pass2_order --problems fit,bench --fits "diag tf32,spherical tf32,diag bf16" --out DIR

Writes ``ab_pass2_order.json`` in --out. (v39 ran this script, timing the E-step as the mean of --rep calls
between CUDA events, with a third and fourth variant, the pipelined Gluon diag pass 2 of commit ac9b5cb with and
without the order: bench_ann/results/v39_pass2_heavy_first.)
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

from bench_ann.bench_fit import add_problem_args
from bench_ann.bench_kernels import bench
from bench_ann.estep_floors import diag_fit_state
from bench_ann.profile_fit import kernel_times


def _kmeans_problem(ke, n, k, d):
    from bench_ann.bench_kernels import make_data, make_params
    from flashgmm_faiss import kernels
    x = make_data(n, d)
    means, _, var, lw = make_params(x, k, kernels)
    params = ke.prepare(means, var, lw, "tf32", ke.absmax(x), comp_perm=ke.component_order(means))
    return x, means, var, lw, None, params


VARIANTS = {   # name -> estep module switches
    "plain": {"PASS2_HEAVY_FIRST": False},
    "heavy-first": {"PASS2_HEAVY_FIRST": True},
}


def _run(ke, variant, x, means, var, lw, center, params):
    saved = {name: getattr(ke, name) for name in VARIANTS[variant]}
    for name, value in VARIANTS[variant].items():
        setattr(ke, name, value)
    try:
        return ke.estep(x, means, var, lw, precision="tf32", center=center, params=params, sort_rows=True)
    finally:
        for name, value in saved.items():
            setattr(ke, name, value)


def _compare(ke, variants, *problem):
    ref = _run(ke, variants[0], *problem)
    res = {}
    for variant in variants[1:]:
        got = _run(ke, variant, *problem)
        res[variant] = {}
        for name, u, v in zip(("logz", "nk", "sx", "sq"), ref, got):
            rel = float((u.double() - v.double()).norm() / u.double().norm().clamp_min(1e-300))
            res[variant][name] = {"bitwise": bool(torch.equal(u, v)), "norm_rel_diff": rel,
                                  "finite": bool(torch.isfinite(v).all())}
    return res


def _work_balance(ke, x, means, var, lw, center, params):
    """Kept pairs per component block (the work lists' counts): max / mean and the fraction of all pairs."""
    k = means.shape[0]
    gaps = ke.transient_order(x, params, k, True, "tf32", center=center)[3]
    _, counts, _ = ke._work_lists(gaps, -(-k // ke.FLAG_K))
    c = counts.double()
    return {"counts": counts.tolist(), "max_over_mean": float(c.max() / c.mean()),
            "kept_fraction": float(c.sum() / (gaps.shape[0] * c.numel()))}


def _timings(ke, variants, problem, rounds, rep, rep_ms):
    rows = []
    for r in range(rounds):
        for variant in variants:
            def fn():
                return _run(ke, variant, *problem)
            times, _ = kernel_times(fn, rep)
            pass2 = sum(v for kn, v in times.items() if "stats_kernel" in kn)
            reduce = sum(v for kn, v in times.items() if "reduce" in kn)
            rows.append({"round": r, "variant": variant, "estep_ms": bench(fn, rep_ms), "pass2_us": pass2,
                         "reduce_us": reduce})
    return rows


def fit_ab(ke, fits, rounds, n, k, d, clusters):
    """Whole ``GaussianMixture`` fits (10 k-means + 30 EM iterations, bench_fit's SIFT-like rows) per "cov
    precision" of ``fits`` with each of VARIANTS, interleaved: median ms per EM iteration and final
    log-likelihoods."""
    from bench_ann.bench_fit import interleaved_fits, sift_like
    x = sift_like(n, d, clusters)
    out = {}

    def use(name):
        for attr, value in VARIANTS[name].items():
            setattr(ke, attr, value)
    try:
        for spec in fits.split(","):
            cov, precision = spec.split()
            res = interleaved_fits(x, k, cov, {v: (lambda v=v: use(v)) for v in VARIANTS}, rounds, precision=precision)
            out[spec] = res
            for v, r in res.items():
                print(f"fit {spec} {v:18s} median {statistics.median(r['ms']):.3f} ms per EM iteration "
                      f"{[round(t, 3) for t in r['ms']]}, k-means {statistics.median(r['kmeans_ms']):.3f} ms; "
                      f"final log-likelihood {r['log_likelihood']}", flush=True)
    finally:
        use("heavy-first")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(p)
    p.add_argument("--kmeans-iter", type=int, default=3)
    p.add_argument("--em-iter", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=20, help="calls per kernel profile")
    p.add_argument("--rep-ms", type=int, default=200, help="time budget of each E-step timing (bench_kernels.bench)")
    p.add_argument("--problems", default="odd,fit,bench")
    p.add_argument("--variants", default=",".join(VARIANTS), help="the first one is the reference")
    p.add_argument("--fits", default="", help='whole fits per "cov precision", e.g. "diag tf32,spherical tf32"')
    p.add_argument("--fit-rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.n = args.n or 1_000_000
    args.d = args.d or 128
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")    # (the package's `estep` is the function)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(args), "problems": {}}
    for name in filter(None, args.problems.split(",")):
        if name == "odd":
            problem = _kmeans_problem(ke, 100_003, 1000, 96)
            info = {"n": 100_003, "k": 1000, "d": 96}
        elif name == "bench":
            problem = _kmeans_problem(ke, args.n, args.k, args.d)
            info = {"n": args.n, "k": args.k, "d": args.d}
        else:
            *problem, fit_s = diag_fit_state(args.n, args.k, args.d, args.clusters, args.kmeans_iter, args.em_iter)
            info = {"n": args.n, "k": args.k, "d": args.d, "fit_s": fit_s}
        variants = args.variants.split(",")
        info["compare"] = _compare(ke, variants, *problem)
        info["balance"] = _work_balance(ke, *problem)
        print(f"{name} {info['n']} {info['k']} {info['d']}: kept {info['balance']['kept_fraction']:.4f}, block "
              f"counts max/mean {info['balance']['max_over_mean']:.2f}", flush=True)
        for variant, cmp in info["compare"].items():
            print(f"  {variant}: " + ", ".join(f"{k} {v['norm_rel_diff']:.1e}{'' if v['finite'] else ' NONFINITE'}"
                                               for k, v in cmp.items()), flush=True)
        if name != "odd":
            info["timings"] = _timings(ke, variants, problem, args.rounds, args.rep, args.rep_ms)
            print("| round | pass 2 | sorted E-step ms | pass 2 us | reduction us |")
            print("|---|---|---:|---:|---:|")
            for r in info["timings"]:
                print(f"| {r['round']} | {r['variant']} | {r['estep_ms']:.3f} | {r['pass2_us']:.1f} | "
                      f"{r['reduce_us']:.1f} |", flush=True)
        out["problems"][name] = info
        del problem
        _write(out, args.out)
    if args.fits:
        out["fits"] = fit_ab(ke, args.fits, args.fit_rounds, args.n, args.k, args.d, args.clusters)
        _write(out, args.out)


def _write(out, directory):
    """``ab_pass2_order.json`` in ``directory`` (None: nothing), rewritten after each problem and the fits."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "ab_pass2_order.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
