"""A/B of the screened pass 1 (``kernels.estep.SCREEN_LOGZ``) on the sparse E-step, one process.

The sparse E-step (rows in the order of their most likely component, components grouped: the estimator's default
path) with pass 1 unscreened (exact logits and exponentials of every component block) and screened (cheap logits of
every block without exponentials, then exact logits and exponentials only of the blocks within reach of each row's
maximum). Both forms are timed alternately, ``--rounds`` times, with the GEMM rates measured in every round (lent
GPUs drift; see ab_pipeline.py): pass 1 alone and the whole sparse E-step, for each covariance type and
precision. Also printed: the fraction of (64-row tile, 64-component block) pairs that pass 2 visits (the gaps; the
screen may only keep more), and each form's relative error of Nk, Sx, Sq against float64 on the first
``--err-rows`` rows (sorted by their own most likely component). Writes JSON.

    python -m bench_ann.ab_screen --n 1000000 --k 1024 --d 128 --out /tmp/ab
    python -m bench_ann.ab_screen --precisions tf32 --forms "exact,screened,screened per block,phase A only"
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from .ab_pipeline import health, write_result
from .bench_kernels import autotuned_configs, make_data, make_params, ref_stats, rel_err


def _popcount_fraction(gaps, n_blocks):
    bits = torch.stack([(gaps >> b) & 1 for b in range(n_blocks)])
    return float(bits.sum()) / bits.numel()


# forms: (SCREEN_LOGZ, SCREEN_PER_COMPONENT, SCREEN_DEBUG); the debug forms time phase A alone and phase B over
# every block (their results are not the E-step's)
FORMS = {"exact": (False, True, 0), "screened": (True, True, 0), "screened per block": (True, False, 0),
         "phase A only": (True, True, 1), "phase B all blocks": (True, True, 2)}


def _set_form(kestep, form):
    kestep.SCREEN_LOGZ, kestep.SCREEN_PER_COMPONENT, kestep.SCREEN_DEBUG = FORMS[form]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--precisions", default="tf32,bf16")
    ap.add_argument("--covs", default="spherical,diag")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=40, help="do_bench ms per measurement")
    ap.add_argument("--err-rows", type=int, default=1 << 18)
    ap.add_argument("--forms", default="exact,screened", help=f"comma-separated, of {list(FORMS)}")
    ap.add_argument("--out", default="bench_ann/results/ab_screen")
    args = ap.parse_args(argv)

    import triton
    kernels = importlib.import_module("flashgmm_faiss.kernels")
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    tb = importlib.import_module("flashgmm_faiss._torch_backend")
    dev = torch.cuda.get_device_name()
    h0 = health(" (start)")
    n, k, d = args.n, args.k, args.d
    x = make_data(n, d)
    bound = max(-float(x.min()), float(x.max()))
    means, var_sph, var_diag, lw = make_params(x, k, kernels)
    perm = kernels.component_order(means)
    shipped = (kestep.SCREEN_LOGZ, kestep.SCREEN_PER_COMPONENT, kestep.SCREEN_DEBUG)
    forms = args.forms.split(",")
    n_blocks = triton.cdiv(k, kestep.FLAG_K)
    xe = x[: min(n, args.err_rows)]

    cases, errors, kept = [], {}, {}
    for cov in args.covs.split(","):
        var = var_diag if cov == "diag" else var_sph
        diag = cov == "diag"
        ref = ref_stats(xe, means, var, lw, tb)
        for prec in args.precisions.split(","):
            params_s = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
            _set_form(kestep, "exact")
            best = kernels.estep(x, means, var, lw, precision=prec, params=params_s, return_best=True)[4]
            order = kernels.row_order(best, perm)
            lzp = torch.empty(n, device="cuda")
            gaps = torch.empty(triton.cdiv(n, kestep.FLAG_ROWS), dtype=torch.int64, device="cuda")
            params_e = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
            best_e = kernels.estep(xe, means, var, lw, precision=prec, params=params_e, return_best=True)[4]
            order_e = kernels.row_order(best_e, perm)
            tag = f"{cov} {prec}"

            def p1(params_s=params_s, diag=diag, prec=prec, order=order, lzp=lzp, gaps=gaps):
                return kestep.launch_logz(x, params_s, k, diag, prec, order=order, lzp=lzp, gaps=gaps)

            def es(var=var, prec=prec, params_s=params_s, order=order):
                return kernels.estep(x, means, var, lw, precision=prec, params=params_s, order=order)

            cases += [(f"pass1 sorted {tag}", p1), (f"E-step sorted {tag}", es)]
            for form in forms:                # compile and autotune every form; their error and kept pairs
                _set_form(kestep, form)
                p1()
                es()
                if FORMS[form][2] == 0:
                    kept[f"{tag} {form}"] = _popcount_fraction(gaps, n_blocks)
                    errors[f"{tag} {form}"] = rel_err(kernels.estep(xe, means, var, lw, precision=prec,
                                                                    params=params_e, order=order_e)[1:], ref)
                if FORMS[form][0]:            # the blocks phase B visits, per program (SCREEN_DEBUG 3)
                    kestep.SCREEN_DEBUG = 3
                    gaps.zero_()
                    p1()
                    progs = gaps[gaps != 0]
                    kept[f"{tag} {form} phase B"] = _popcount_fraction(progs, n_blocks)
            _set_form(kestep, "exact")
    torch.cuda.synchronize()
    print(f"# rel err vs float64 (first {len(xe)} rows): {errors}", flush=True)
    print(f"# fraction of (tile, block) pairs in pass 2's work lists: {kept}", flush=True)

    results = {name: {form: [] for form in forms} for name, _ in cases}
    rounds = []
    for r in range(args.rounds):
        rounds.append(health(f" (round {r + 1})"))
        for name, fn in cases:
            for form in (forms if r % 2 == 0 else forms[::-1]):
                _set_form(kestep, form)
                ms = triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median")
                results[name][form].append(ms)
    kestep.SCREEN_LOGZ, kestep.SCREEN_PER_COMPONENT, kestep.SCREEN_DEBUG = shipped

    print(f"\n# {dev}, N={n}, K={k}, D={d}: median ms over {args.rounds} interleaved rounds")
    print(f"{'kernel':<30} " + " ".join(f"{form:>19}" for form in forms))
    table = []
    for name, _ in cases:
        med = {form: statistics.median(results[name][form]) for form in forms}
        table.append({"kernel": name, **{f"{form}_ms": v for form, v in med.items()},
                      **{f"{form}_all": results[name][form] for form in forms}})
        print(f"{name:<30} " + " ".join(f"{med[form]:19.3f}" for form in forms))
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shipped": shipped, "rel_err_vs_float64": errors,
            "pairs_kept": kept, "health_start": h0, "health_rounds": rounds, "autotuned": autotuned_configs(),
            "rows": table}
    write_result(args.out, "ab_screen", dev, n, k, d, meta)


if __name__ == "__main__":
    main()
