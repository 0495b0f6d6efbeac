"""A/B of the Gluon diag "tf32" pass 1: the warp-specialised kernel (two consumer warpgroups sharing one parameter
ring, a TMA producer warp) against the one-warpgroup kernel with CTA barriers, on one GPU.

Both run the transient-order form (per-row logZ, ||x~||^2 and exact block bits) on the kernel benchmark's problem
and (``--fit-state``) a diag fit's own state; then the sorted E-step (``kernels.estep(sort_rows=True)``) with
either. Prints and writes (``ab_ws_pass1.json``) the times of ``--rounds`` interleaved rounds and whether the
outputs equal the one-warpgroup kernel's bit for bit (logZ, row bits; ||x~||^2 to rounding).

    python -m bench_ann.ab_ws_pass1 --fit-state --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.ab_threshold import add_fit_state_args, fit_state
from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench

# (name, launch_diag_logz keywords, forms): "bits" = the transient form (row bits, ||x~||^2), "logz" = logZ alone
VARIANTS = [
    ("one_warpgroup", dict(ws=False), ("bits", "logz")),
    ("ws_s3", dict(ws=True, ws_stages=3), ("bits", "logz")),
    ("ws_s4", dict(ws=True, ws_stages=4), ("bits", "logz")),
    ("ws_s3_nopipe", dict(ws=True, ws_stages=3, ws_pipe=False), ("bits", "logz")),
    ("ws_s4_nopipe", dict(ws=True, ws_stages=4, ws_pipe=False), ("bits", "logz")),
    ("ws_k128_s2_nopipe", dict(ws=True, ws_stages=2, ws_block_k=128, ws_pipe=False), ("logz",)),
    ("ws_k128_s2", dict(ws=True, ws_stages=2, ws_block_k=128), ("logz",)),
]


def _switched(lg, flag, f):
    """f run with ``kernels.logz_gluon.WARP_SPECIALIZE = flag``."""
    def g():
        saved = lg.WARP_SPECIALIZE
        lg.WARP_SPECIALIZE = flag
        try:
            return f()
        finally:
            lg.WARP_SPECIALIZE = saved
    return g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    a = ap.parse_args(argv)
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "ws_maxnreg": lg.WS_MAXNREG, "ws_consumer_regs": lg.WS_CONSUMER_REGS,
           "problems": {}}
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
        bufs = {}
        fns = {}
        for name, kw, forms in VARIANTS:
            for form in forms:
                rb = ke._row_bits_buffer(n, nb, x.device) if form == "bits" else None
                x2 = torch.empty(n, device=x.device) if form == "bits" else None
                bufs[f"{form}_{name}"] = (rb, x2)
                fns[f"{form}_{name}"] = (lambda kw=kw, rb=rb, x2=x2: lg.launch_diag_logz(
                    x, params, a.k, center, skip, rb, x2, **kw))
        check = {}
        ref = {}
        for name, f in list(fns.items()):
            form = name.split("_")[0]
            rb, x2 = bufs[name]
            if rb is not None:
                rb.fill_(-1)
                x2.fill_(float("nan"))
            try:
                lz = f().clone()
                torch.cuda.synchronize()
            except Exception as e:      # a config that does not compile or launch is reported, not fatal
                check[name] = {"error": repr(e)[:400]}
                del fns[name]
                continue
            if form not in ref:
                ref[form] = (lz, None if rb is None else rb.clone(), None if x2 is None else x2.clone())
            r = ref[form]
            check[name] = {"logz_equal": bool(torch.equal(lz, r[0])),
                           "logz_max_abs_diff": (lz - r[0]).abs().max().item()}
            if rb is not None:
                check[name]["row_bits_equal"] = bool(torch.equal(rb, r[1]))
                check[name]["x2_max_rel_diff"] = ((x2 - r[2]).abs() / r[2].abs().clamp_min(1e-30)).max().item()
        for flag in (False, True):
            fns[f"sorted_estep_ws_{flag}"] = _switched(lg, flag, lambda: kernels.estep(
                x, means, var, lw, precision="tf32", center=center, params=params, sort_rows=True))
        st_a, st_b = [[t.double() for t in fns[f"sorted_estep_ws_{v}"]()] for v in (False, True)]
        check["sorted_estep_equal"] = [bool(torch.equal(u, v)) for u, v in zip(st_a, st_b)]
        print(f"[{pname}] " + json.dumps(check), flush=True)
        times = {name: [] for name in fns}
        for _ in range(a.rounds):
            for name, f in fns.items():
                times[name].append(bench(f, a.rep))
        for name, ts in times.items():
            print(f"  {name:<22} ms " + " ".join(f"{t:.3f}" for t in ts), flush=True)
        out["problems"][pname] = {"check": check, "times_ms": times}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_ws_pass1.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
