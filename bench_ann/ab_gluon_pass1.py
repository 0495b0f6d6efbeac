"""A/B of the diag pass 1 ("tf32", or ``--precision bf16``): the Triton kernel against the Gluon kernel
(``kernels.logz_gluon``) on one GPU.

Both run the transient-order form (per-row logZ, ||x~||^2 and exact block bits; no row order, argmax or copy) and,
in "tf32", the kept-order form (``kept_*``: a fit's row order, logZ by position, the operand copy, the flag tiles'
bits) on the kernel benchmark's problem and (``--fit-state``) a diag fit's own state; then the sorted and the
kept-order E-steps with either pass 1. Prints and writes (``ab_gluon_pass1_{precision}.json``) the times
(``--rounds`` interleaved rounds), the largest |logZ| difference, the fraction of rows whose block bits differ
and whether the other outputs are equal, for each Gluon launch config.

    python -m bench_ann.ab_gluon_pass1 --fit-state --out DIR [--precision bf16]
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.ab_threshold import add_fit_state_args, fit_state
from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench

# (BLOCK_M, STAGES, num_warps, A_REG)
CONFIGS = [(64, 2, 4, True), (128, 2, 8, True)]


def _switched(ke, flag, f):
    """f run with ``kernels.estep.GLUON_PASS1 = GLUON_PASS1_KEPT = flag`` (launch_logz dispatches on them; the kept
    form's switch is off by default)."""
    def g():
        saved = ke.GLUON_PASS1, ke.GLUON_PASS1_KEPT
        ke.GLUON_PASS1 = ke.GLUON_PASS1_KEPT = flag
        try:
            return f()
        finally:
            ke.GLUON_PASS1, ke.GLUON_PASS1_KEPT = saved
    return g


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    ap.add_argument("--precision", choices=["tf32", "bf16"], default="tf32")
    a = ap.parse_args(argv)
    prec = a.precision
    kept_ok = prec == "tf32"      # the kept form runs the Gluon kernel in "tf32" only
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")   # the package exports a function named estep
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "precision": prec, "problems": {}}
    x, _, means, _, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems = {"bench_kernels": (x, None, means, var_diag, lw)}
    if a.fit_state:
        problems["fit_state_diag"] = fit_state(a.n, a.k, a.d, a.em_iter, "diag")
    skip = ke.SKIP_LOG2[prec]
    for pname, (x, center, means, var, lw) in problems.items():
        n, d = x.shape
        perm = kernels.component_order(means)
        params = kernels.prepare(means, var, lw, prec, float(kernels.absmax(x, center)), comp_perm=perm)
        nb = triton.cdiv(a.k, ke.FLAG_K)
        rb_t, rb_g = ke._row_bits_buffer(n, nb, x.device), ke._row_bits_buffer(n, nb, x.device)
        x2_t, x2_g = torch.empty(n, device=x.device), torch.empty(n, device=x.device)
        # the kept order of a fit (as GaussianMixture builds it at a rebuild) and the kept form's buffers
        first = kernels.estep(x, means, var, lw, precision=prec, center=center, params=params, return_best=True,
                              return_row_bits=True)
        order = ke.row_order(first[4], perm, row_bits=first[5])
        kept = {name: {"order": order, "x2": torch.empty(n, device=x.device), "lzp": torch.empty(n, device=x.device),
                       "copy": tuple(torch.empty((n, d), dtype=torch.float16, device=x.device) for _ in range(3)),
                       "gaps": torch.empty(triton.cdiv(n, ke.FLAG_ROWS), dtype=torch.int64, device=x.device)}
                for name in (("triton", "gluon") if kept_ok else ())}

        def triton_pass1():
            return ke.launch_logz(x, params, a.k, True, prec, center=center, x2=x2_t, row_bits=rb_t)[0]
        fns = {"triton": _switched(ke, False, triton_pass1)}
        for bm, st, w, ar in CONFIGS:
            fns[f"gluon_{bm}_{st}_{w}{'_areg' if ar else ''}"] = (lambda bm=bm, st=st, w=w, ar=ar: lg.launch_diag_logz(
                x, params, a.k, center, skip, rb_g, x2_g, block_m=bm, stages=st, num_warps=w, a_reg=ar))
        for name, flag in (("triton", False), ("gluon", True)) if kept_ok else ():
            fns[f"kept_{name}"] = _switched(ke, flag, lambda kw=kept[name]: ke.launch_logz(
                x, params, a.k, True, prec, center=center, **kw)[0])
        ref = fns["triton"]().clone()
        rb_ref, x2_ref = rb_t.clone(), x2_t.clone()
        check = {}
        for name, f in fns.items():
            if name in ("triton", "kept_triton"):
                continue
            rb_g.fill_(-1)
            x2_g.fill_(float("nan"))
            try:
                lz = f()
                torch.cuda.synchronize()
            except Exception as e:      # a config that does not compile or launch is reported, not fatal
                check[name] = {"error": repr(e)[:400]}
                continue
            if name == "kept_gluon":
                lz_t = fns["kept_triton"]()
                kt, kg = kept["triton"], kept["gluon"]
                check[name] = {"logz_max_abs_diff": (lz - lz_t).abs().max().item(),
                               "outputs_equal": {k_: all(torch.equal(u, v) for u, v in (zip(kg[k_], kt[k_])
                                                 if k_ == "copy" else [(kg[k_], kt[k_])]))
                                                 for k_ in ("x2", "lzp", "copy", "gaps")}}
                continue
            check[name] = {"logz_max_abs_diff": (lz - ref).abs().max().item(),
                           "logz_nan": int(torch.isnan(lz).sum()),
                           "row_bits_differ": (rb_g != rb_ref).float().mean().item(),
                           "x2_equal": bool(torch.equal(x2_g, x2_ref))}
        print(f"[{pname}] " + json.dumps(check), flush=True)
        ok = ["triton"] + (["kept_triton"] if kept_ok else []) + [k for k, v in check.items() if "error" not in v]

        for name, flag in (("triton", False), ("gluon", True)):
            fns[f"sorted_estep_{name}"] = _switched(ke, flag, lambda: kernels.estep(
                x, means, var, lw, precision=prec, center=center, params=params, sort_rows=True))
            fns[f"kept_estep_{name}"] = _switched(ke, flag, lambda: kernels.estep(
                x, means, var, lw, precision=prec, center=center, params=params, order=order))
        # what the kept form's parts cost: without the operand copy, without the row order; and logZ alone
        if kept_ok:
            kg = kept["gluon"]
            fns["kept_gluon_nocopy"] = _switched(ke, True, lambda: ke.launch_logz(
                x, params, a.k, True, prec, center=center, order=order, lzp=kg["lzp"], x2=kg["x2"], gaps=kg["gaps"]))
            fns["kept_gluon_noorder"] = _switched(ke, True, lambda: ke.launch_logz(
                x, params, a.k, True, prec, center=center, copy=kg["copy"], x2=kg["x2"], gaps=kg["gaps"]))
            ok += ["kept_gluon_nocopy", "kept_gluon_noorder"]
        for name, flag in (("triton", False), ("gluon", True)):
            fns[f"logz_{name}"] = _switched(ke, flag, lambda: ke.launch_logz(x, params, a.k, True, prec,
                                                                              center=center))
        ok += ["logz_triton", "logz_gluon"]
        for kind in ("sorted_estep", "kept_estep"):
            st_t, st_g = [[t.double() for t in fns[f"{kind}_{v}"]()] for v in ("triton", "gluon")]
            check[f"{kind}_max_abs_diff"] = [(a_ - b_).abs().max().item() for a_, b_ in zip(st_t, st_g)]
            ok += [f"{kind}_triton", f"{kind}_gluon"]
        times = {name: [] for name in ok}
        for _ in range(a.rounds):
            for name in ok:
                times[name].append(bench(fns[name], a.rep))
        for name, ts in times.items():
            print(f"  {name:<18} ms " + " ".join(f"{t:.3f}" for t in ts), flush=True)
        out["problems"][pname] = {"check": check, "times_ms": times}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"ab_gluon_pass1_{prec}.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
