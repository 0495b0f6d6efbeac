"""A/B of diag "tf32" pass-1 variants (module switches of ``kernels.estep``) on one GPU.

Times, interleaved over ``--rounds`` rounds in one process, on the kernel benchmark's problem and
(``--fit-state``) a diag fit's own state:

* ``pass1``: pass 1 alone as the transient order runs it (per-row block bits, no argmax, no row copy);
* ``sorted_chunks``: ``estep(sort_rows=True)`` in chunks of ``--chunk`` rows (the N=1e8 plan's E-step);
* ``kept_order``: the sparse E-step under a kept (best block, bits) row order with the row copy (in-memory fits);

for each variant in ``VARIANTS`` (a dict of module attributes to set), and the statistics' relative difference
from the dense E-step and the largest |logZ| difference from ``base``. Writes ``ab_diag_pass1.json``.

Variants now: ``base`` and ``no_pipeline`` (``PIPELINE_LOGZ = False``). A variant naming a switch the module lacks
is an error. v20 ran ``base`` against ``no_alo`` (``DIAG_NO_ALO_LOAD``: a DIAGNOSTIC that read A in place of A's
second fp16 term, one parameter tile less per block and WRONG logits, to ask whether pass 1 is bound by the
parameters' L2 traffic; removed after the run), and earlier against ``fuse4`` variants (one fused product per
block) whose kernel code was not kept (NOTES.md v20).

    python -m bench_ann.ab_diag_pass1 --fit-state --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.ab_threshold import add_fit_state_args, fit_state
from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, autotuned_configs, bench, rel_err

# the v20 run used {"base": {}, "no_alo": {"DIAG_NO_ALO_LOAD": True}} (commit "v20 diagnostic"; the switch is gone)
VARIANTS = {"base": {}, "no_pipeline": {"PIPELINE_LOGZ": False}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    ap.add_argument("--chunk", type=int, default=786432)
    a = ap.parse_args(argv)
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "chunk": a.chunk, "problems": {}}
    x, _, means, _, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems = {"bench_kernels": (x, None, means, var_diag, lw)}
    if a.fit_state:
        problems["fit_state_diag"] = fit_state(a.n, a.k, a.d, a.em_iter, "diag")
    for name, switches in VARIANTS.items():
        missing = [key for key in switches if not hasattr(ke, key)]
        if missing:
            raise SystemExit(f"variant {name!r}: kernels.estep has no switch {missing}")

    def variant(name, f):
        def g():
            saved = {key: getattr(ke, key) for key in VARIANTS[name]}
            for key, value in VARIANTS[name].items():
                setattr(ke, key, value)
            try:
                return f()
            finally:
                for key, value in saved.items():
                    setattr(ke, key, value)
        return g

    for pname, (x, center, means, var, lw) in problems.items():
        n = x.shape[0]
        perm = kernels.component_order(means)
        params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, center)), comp_perm=perm)
        kw = dict(precision="tf32", center=center, params=params)
        best, bits = kernels.estep(x, means, var, lw, return_best=True, return_row_bits=True, **kw)[4:]
        order = kernels.row_order(best, perm, row_bits=bits)
        dense = [t.double() for t in kernels.estep(x, means, var, lw, skip_log2=0, **kw)[1:]]
        row_bits = torch.empty(n, dtype=torch.int32, device=x.device)

        def chunked():
            for s in range(0, n, a.chunk):
                kernels.estep(x[s:s + a.chunk], means, var, lw, sort_rows=True, **kw)
        forms = {
            "pass1": lambda: ke.launch_logz(x, params, a.k, True, "tf32", center=center, row_bits=row_bits),
            "sorted_chunks": chunked,
            "kept_order": lambda: kernels.estep(x, means, var, lw, order=order, **kw),
        }
        fns = {f"{form}/{v}": variant(v, f) for form, f in forms.items() for v in VARIANTS}
        diff = {v: rel_err(variant(v, lambda: kernels.estep(x, means, var, lw, order=order, **kw))()[1:], dense)
                for v in VARIANTS}
        logz = {v: variant(v, forms["pass1"])()[0].clone() for v in VARIANTS}
        logz_diff = {v: (logz[v] - logz["base"]).abs().max().item() for v in VARIANTS}
        times = {name: [] for name in fns}
        for _ in range(a.rounds):
            for name, f in fns.items():
                times[name].append(bench(f, a.rep))
        out["problems"][pname] = {"times_ms": times, "rel_diff_vs_dense": diff, "logz_max_abs_diff": logz_diff}
        print(f"[{pname}] rel diff vs dense: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
              + "; max |logZ - base|: " + ", ".join(f"{k} {v:.1e}" for k, v in logz_diff.items()), flush=True)
        for name, ts in times.items():
            print(f"  {name:<28} ms " + " ".join(f"{t:.3f}" for t in ts), flush=True)
    out["autotuned"] = autotuned_configs()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_diag_pass1.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
