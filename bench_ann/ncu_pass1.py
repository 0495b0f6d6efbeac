"""Pass 1 (``_logz_kernel``) launches for Nsight Compute: where the sparse E-step's pass 1 spends its time.

Builds the benchmark's data (N rows, SIFT-like, centred), the sorted row order and grouped components of the
sparse E-step, compiles and autotunes every variant first, then launches each variant once between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that ``ncu --profile-from-start off`` sees exactly those
launches (no autotuning runs):

    ncu --clock-control none --profile-from-start off --kernel-name regex:_logz_kernel \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python -m bench_ann.ncu_pass1 --covs spherical,diag

Variants: covariance type x precision, launched in that order. ``--transient``: instead the pass 1 of the transient
row orders that diag fits run (rows in their own order, logZ and the rows' block bits, no argmax): on a
Hopper GPU the Gluon kernel of ``kernels/logz_gluon.py`` (``--kernel-name regex:_diag_logz_kernel``). ``--stats``:
the whole transient-order E-step (``estep(sort_rows=True)``, as diag fits run it) in the profiled range; profile
its sparse pass 2 with ``--kernel-name regex:_estep_stats_kernel``. Pass 1 writes ||x~||^2 for spherical
covariances only, as ``estep`` asks it to (its diag pass 2 never reads it; v36's profiles in
``bench_ann/results/v36_pass1_overheads`` still wrote it for diag). (The v10 report in
``bench_ann/results/v10_screen_and_nocopy`` also profiled the screened pass 1 of commit fad8240, since removed.)
"""
from __future__ import annotations

import argparse
import functools
import importlib

import torch

from .bench_kernels import ab_problem, add_shape_args, autotuned_configs, sorted_inputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--covs", default="spherical,diag")
    ap.add_argument("--precisions", default="tf32")
    form = ap.add_mutually_exclusive_group()
    form.add_argument("--transient", action="store_true", help="the transient orders' pass 1 (Gluon on Hopper, diag)")
    form.add_argument("--stats", action="store_true",
                      help="the whole transient-order E-step (its pass 2: --kernel-name regex:_estep_stats_kernel)")
    args = ap.parse_args(argv)

    kernels = importlib.import_module("flashgmm_faiss.kernels")
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    n, k, d = args.n, args.k, args.d
    x, bound, means, var_sph, var_diag, lw, perm = ab_problem(n, k, d, kernels)
    runs = []
    for cov in args.covs.split(","):
        var = var_diag if cov == "diag" else var_sph
        diag = cov == "diag"
        x2 = None if diag else torch.empty(n, device="cuda")     # as estep: the diag pass 2 never reads ||x~||^2
        for prec in args.precisions.split(","):
            if args.stats:
                params = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
                fn = functools.partial(kestep.estep, x, means, var, lw, prec, params=params, sort_rows=True)
            elif args.transient:
                params = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
                fn = functools.partial(kestep.launch_logz, x, params, k, diag, prec, x2=x2,
                                       row_bits=kestep._row_bits_buffer(n, -(-k // kestep.FLAG_K), x.device))
            else:   # the kept orders' pass 1 (row order, operand copy, flag-tile bits, argmax)
                params, order, lzp, gaps = sorted_inputs(x, means, var, lw, prec, bound, perm, kernels)
                dt = torch.float16 if prec == "tf32" else torch.bfloat16
                copy = tuple(torch.empty((n, d) if (i == 0 or diag) else (1,), dtype=dt, device="cuda")
                             for i in range(3))
                fn = functools.partial(kestep.launch_logz, x, params, k, diag, prec, with_argmax=True,
                                       x2=x2, copy=copy, order=order, lzp=lzp, gaps=gaps)
            fn()                           # compile and autotune outside the profiled range
            runs.append((f"{cov} {prec}", fn))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in runs:
        print(f"# profiled launch: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for key, cfg in autotuned_configs().items():     # the profiled configs
        print(f"# {key}: {cfg}")


if __name__ == "__main__":
    main()
