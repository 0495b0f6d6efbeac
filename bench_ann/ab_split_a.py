"""A/B of diag "tf32" with A = -2 mu / var as one or two fp16 terms (``kernels.estep.DIAG_SPLIT_A``), one process.

The two forms are timed alternately, ``--rounds`` times, with the GEMM rates measured in every round (lent GPUs
drift; see ab_pipeline.py). Timed at one (N, K, D): pass 1 (logZ) alone and the whole E-step, dense and sparse
(rows in the order of their most likely component, components grouped: the estimator's default path); the
spherical "tf32" E-steps of the same run are the baseline of the diag / spherical ratio. Also printed: each form's
relative error of Nk, Sx, Sq against float64 on the first ``--err-rows`` rows. Writes JSON.

    python -m bench_ann.ab_split_a --n 1000000 --k 1024 --d 128 --out /tmp/ab
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from .ab_pipeline import health, write_result
from .bench_kernels import (ab_problem, add_shape_args, add_timing_args, autotuned_configs, ref_stats, rel_err,
                            sorted_inputs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    add_timing_args(ap, rep=40, out="bench_ann/results/ab_split_a")
    ap.add_argument("--err-rows", type=int, default=1 << 18)
    args = ap.parse_args(argv)

    import triton
    kernels = importlib.import_module("flashgmm_faiss.kernels")
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    tb = importlib.import_module("flashgmm_faiss._torch_backend")
    dev = torch.cuda.get_device_name()
    h0 = health(" (start)")
    n, k, d = args.n, args.k, args.d
    x, bound, means, var_sph, var_diag, lw, perm = ab_problem(n, k, d, kernels)
    shipped = kestep.DIAG_SPLIT_A

    def cases_for(cov, var):
        """(name, fn) of one covariance type; parameters prepared for the current switch state."""
        params = kernels.prepare(means, var, lw, "tf32", bound)
        params_s, order, lzp, gaps = sorted_inputs(x, means, var, lw, "tf32", bound, perm, kernels)
        diag = var.ndim == 2
        return [
            (f"pass1 {cov}", lambda: kestep.launch_logz(x, params, k, diag, "tf32")),
            (f"E-step {cov}", lambda: kernels.estep(x, means, var, lw, precision="tf32", params=params)),
            (f"pass1 sorted {cov}", lambda: kestep.launch_logz(x, params_s, k, diag, "tf32", order=order, lzp=lzp,
                                                              gaps=gaps)),
            (f"E-step sorted {cov}", lambda: kernels.estep(x, means, var, lw, precision="tf32", params=params_s,
                                                           order=order)),
        ]

    xe = x[: min(n, args.err_rows)]
    ref = ref_stats(xe, means, var_diag, lw, tb)
    forms, errors = {}, {}
    for on in (False, True):                       # build (and compile, autotune) both forms
        kestep.DIAG_SPLIT_A = on
        forms[on] = cases_for("diag", var_diag)
        for _, fn in forms[on]:
            fn()
        errors["split" if on else "one term"] = rel_err(
            kernels.estep(xe, means, var_diag, lw, precision="tf32")[1:], ref)
    baseline = cases_for("spherical", var_sph)
    for _, fn in baseline:
        fn()
    torch.cuda.synchronize()
    print(f"# rel err vs float64 (first {len(xe)} rows): {errors}", flush=True)

    names = [name for name, _ in forms[True]]
    results = {name: {"one term": [], "split": []} for name in names}
    base = {name: [] for name, _ in baseline}
    rounds = []
    for r in range(args.rounds):
        rounds.append(health(f" (round {r + 1})"))
        for i, name in enumerate(names):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                kestep.DIAG_SPLIT_A = on
                ms = triton.testing.do_bench(forms[on][i][1], warmup=10, rep=args.rep, return_mode="median")
                results[name]["split" if on else "one term"].append(ms)
        for name, fn in baseline:
            base[name].append(triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median"))
    kestep.DIAG_SPLIT_A = shipped

    print(f"\n# {dev}, N={n}, K={k}, D={d}, diag 'tf32': median ms over {args.rounds} interleaved rounds")
    print(f"{'kernel':<24} {'one term':>9} {'split':>9} {'ratio':>7} {'spherical':>10} {'split/sph':>9}")
    table = []
    for name in names:
        p = statistics.median(results[name]["one term"])
        q = statistics.median(results[name]["split"])
        sph = statistics.median(base[name.replace("diag", "spherical")])
        table.append({"kernel": name, "one_term_ms": p, "split_ms": q, "split_over_one_term": q / p,
                      "spherical_ms": sph, "split_over_spherical": q / sph,
                      "one_term_over_spherical": p / sph, **{f"{f}_all": results[name][f] for f in results[name]},
                      "spherical_all": base[name.replace("diag", "spherical")]})
        print(f"{name:<24} {p:9.3f} {q:9.3f} {q / p:7.3f} {sph:10.3f} {q / sph:9.2f}")
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shipped": shipped, "rel_err_vs_float64": errors,
            "health_start": h0, "health_rounds": rounds, "autotuned": autotuned_configs(), "rows": table}
    write_result(args.out, "ab_split_a", dev, n, k, d, meta)


if __name__ == "__main__":
    main()
