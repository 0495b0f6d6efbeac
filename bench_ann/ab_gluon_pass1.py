"""A/B of the diag "tf32" pass 1: the Triton kernel against the Gluon kernel (``kernels.logz_gluon``) on one GPU.

Both run the transient-order form (per-row logZ, ||x~||^2 and exact block bits; no row order, argmax or copy) on
the kernel benchmark's problem and (``--fit-state``) a diag fit's own state. Prints and writes
(``ab_gluon_pass1.json``) the times (``--rounds`` interleaved rounds), the largest |logZ| difference, the fraction
of rows whose block bits differ and whether ||x~||^2 is equal, for each Gluon launch config.

    python -m bench_ann.ab_gluon_pass1 --fit-state --out DIR
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    a = ap.parse_args(argv)
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")   # the package exports a function named estep
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "problems": {}}
    x, _, means, _, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems = {"bench_kernels": (x, None, means, var_diag, lw)}
    if a.fit_state:
        problems["fit_state_diag"] = fit_state(a.n, a.k, a.d, a.em_iter, "diag")
    skip = ke.SKIP_LOG2["tf32"]
    for pname, (x, center, means, var, lw) in problems.items():
        n = x.shape[0]
        perm = kernels.component_order(means)
        params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, center)), comp_perm=perm)
        nb = triton.cdiv(a.k, ke.FLAG_K)
        rb_t, rb_g = ke._row_bits_buffer(n, nb, x.device), ke._row_bits_buffer(n, nb, x.device)
        x2_t, x2_g = torch.empty(n, device=x.device), torch.empty(n, device=x.device)

        def triton_pass1():
            return ke.launch_logz(x, params, a.k, True, "tf32", center=center, x2=x2_t, row_bits=rb_t)[0]
        fns = {"triton": triton_pass1}
        for bm, st, w, ar in CONFIGS:
            fns[f"gluon_{bm}_{st}_{w}{'_areg' if ar else ''}"] = (lambda bm=bm, st=st, w=w, ar=ar: lg.launch_diag_logz(
                x, params, a.k, center, skip, rb_g, x2_g, block_m=bm, stages=st, num_warps=w, a_reg=ar))
        ref = triton_pass1().clone()
        rb_ref, x2_ref = rb_t.clone(), x2_t.clone()
        check = {}
        for name, f in fns.items():
            if name == "triton":
                continue
            rb_g.fill_(-1)
            x2_g.fill_(float("nan"))
            try:
                lz = f()
                torch.cuda.synchronize()
            except Exception as e:      # a config that does not compile or launch is reported, not fatal
                check[name] = {"error": repr(e)[:400]}
                continue
            check[name] = {"logz_max_abs_diff": (lz - ref).abs().max().item(),
                           "logz_nan": int(torch.isnan(lz).sum()),
                           "row_bits_differ": (rb_g != rb_ref).float().mean().item(),
                           "x2_equal": bool(torch.equal(x2_g, x2_ref))}
        print(f"[{pname}] " + json.dumps(check), flush=True)
        ok = ["triton"] + [k for k, v in check.items() if "error" not in v]

        def sorted_estep(gluon):
            def f():
                saved = ke.GLUON_PASS1
                ke.GLUON_PASS1 = gluon
                try:
                    return kernels.estep(x, means, var, lw, precision="tf32", center=center, params=params,
                                         sort_rows=True)
                finally:
                    ke.GLUON_PASS1 = saved
            return f
        fns["sorted_estep_triton"], fns["sorted_estep_gluon"] = sorted_estep(False), sorted_estep(True)
        st_t, st_g = [[t.double() for t in fns[f"sorted_estep_{v}"]()] for v in ("triton", "gluon")]
        check["sorted_estep_max_abs_diff"] = [(a_ - b_).abs().max().item() for a_, b_ in zip(st_t, st_g)]
        ok += ["sorted_estep_triton", "sorted_estep_gluon"]
        times = {name: [] for name in ok}
        for _ in range(a.rounds):
            for name in ok:
                times[name].append(bench(fns[name], a.rep))
        for name, ts in times.items():
            print(f"  {name:<18} ms " + " ".join(f"{t:.3f}" for t in ts), flush=True)
        out["problems"][pname] = {"check": check, "times_ms": times}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_gluon_pass1.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
