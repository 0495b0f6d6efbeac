"""A/B of the E-step on a transient row order (``kernels.estep(sort_rows=True)``) on one GPU.

A fit whose memory plan cannot keep row orders (8 bytes per row: N=1e8 in 64 MiB) ran the dense E-step without the
16-bit row copy. ``sort_rows=True`` sorts each chunk inside the call instead: pass 1 in the rows' own order with
exact per-row block bits, an argsort by argmax, the tile bits of that order and the sparse pass 2. This script
times, interleaved over ``--rounds`` rounds on the same data and parameters (one process):

* ``dense_nocopy``: the dense E-step without the row copy (what such a fit ran before);
* ``sorted``: the E-step with ``sort_rows=True`` (no row copy), whole problem and in chunks of ``--chunks`` rows;
* ``sorted_argmax``: the same with the v15 transient order (rows sorted by most likely component instead of by
  block bit set, ``kernels.estep.TRANSIENT_SORT_KEY``);
* ``kept_order``: the sparse E-step under a kept :class:`RowOrder` with the row copy (the default plan's E-step),
  sorted by most likely component; ``kept_order_bits``: the same order sorted by (best block, row bits);
* ``dense_copy``: the dense E-step with the row copy;

and reports the fraction of (tile, block) pairs each sparse form visits and the relative difference of its
statistics from the dense E-step's. Problems: the kernel benchmark's (``bench_kernels.ab_problem``) and, with
``--fit-state``, a fit's state (``ab_threshold.fit_state``; with ``--diag`` also a diag fit's own state;
``--no-spherical``: diag only). Writes ``ab_sort_rows.json``; ``--profile`` adds per-kernel GPU times of the sorted
E-step.

    python -m bench_ann.ab_sort_rows --fit-state --diag --chunks 262144,495160 --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.ab_threshold import add_fit_state_args, fit_state
from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench, peak_extra, rel_err
from bench_ann.profile_fit import _profile


def pairs_kept(gaps, n_blocks):
    """Fraction of (tile, block) pairs whose bit is set in ``gaps`` (n_tiles,) int64."""
    bits = torch.stack([(gaps >> b) & 1 for b in range(n_blocks)], 1)
    return float(bits.double().mean())


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_fit_state_args(ap)
    add_timing_args(ap)
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--diag", action="store_true", help="also diag covariances")
    ap.add_argument("--no-spherical", action="store_true", help="diag only (with --diag)")
    ap.add_argument("--chunks", default="262144", help="comma list of chunk sizes for the chunked sorted E-step")
    ap.add_argument("--profile", action="store_true",
                    help="also a torch.profiler table of 10 sorted E-steps per problem (profile_<problem>_<cov>.txt "
                         "in --out): the time of each kernel (pass 1, the sort, the work lists, pass 2, reduction)")
    a = ap.parse_args(argv)
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    prec = a.precision
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "precision": prec, "problems": {}}
    problems = {}
    x, _, means, var_sph, var_diag, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems["bench_kernels"] = (x, None, means, {"spherical": var_sph, "diag": var_diag}, lw)
    if a.fit_state:
        if not a.no_spherical:
            xf, cf, mf, vf, lwf = fit_state(a.n, a.k, a.d, a.em_iter)
            problems["fit_state"] = (xf, cf, mf, {"spherical": vf}, lwf)
        if a.diag:      # a diag fit's own state (same data)
            xf, cf, mf, vf, lwf = fit_state(a.n, a.k, a.d, a.em_iter, "diag")
            problems["fit_state_diag"] = (xf, cf, mf, {"diag": vf}, lwf)
    chunks = [int(float(c)) for c in a.chunks.split(",") if c]
    n_blocks = triton.cdiv(a.k, ke.FLAG_K)
    for pname, (x, center, means, variances, lw) in problems.items():
        n = x.shape[0]
        perm = kernels.component_order(means)
        res = out["problems"].setdefault(pname, {})
        for cov, var in variances.items():
            if (cov == "diag" and not a.diag) or (cov == "spherical" and a.no_spherical):
                continue
            diag = cov == "diag"
            params = kernels.prepare(means, var, lw, prec, float(kernels.absmax(x, center)), comp_perm=perm)
            kw = dict(precision=prec, center=center, params=params)
            best, bits = kernels.estep(x, means, var, lw, return_best=True, return_row_bits=True, **kw)[4:]
            order = kernels.row_order(best, perm)
            order_bits = kernels.row_order(best, perm, row_bits=bits)
            dense = [t.double() for t in kernels.estep(x, means, var, lw, skip_log2=0, **kw)[1:]]

            def chunked(rows):
                def f():
                    for s in range(0, n, rows):
                        kernels.estep(x[s:s + rows], means, var, lw, sort_rows=True, **kw)
                return f
            fns = {
                "dense_nocopy": lambda: kernels.estep(x, means, var, lw, copy_rows=False, **kw),
                "dense_copy": lambda: kernels.estep(x, means, var, lw, **kw),
                "kept_order": lambda: kernels.estep(x, means, var, lw, order=order, **kw),
                "kept_order_bits": lambda: kernels.estep(x, means, var, lw, order=order_bits, **kw),
                "sorted": lambda: kernels.estep(x, means, var, lw, sort_rows=True, **kw),
            }
            for rows in chunks:
                fns[f"sorted_chunks_{rows}"] = chunked(rows)

            def by_argmax(f):       # the v15 transient order (sorted by most likely component)
                def g():
                    default, ke.TRANSIENT_SORT_KEY = ke.TRANSIENT_SORT_KEY, "argmax"
                    try:
                        return f()
                    finally:
                        ke.TRANSIENT_SORT_KEY = default
                return g
            fns["sorted_argmax"] = by_argmax(fns["sorted"])
            # pairs visited: the transient orders' tile bits, and the kept order's gaps from its pass 1
            kept = {"sorted": pairs_kept(ke.transient_order(x, params, a.k, diag, prec, center=center)[3], n_blocks),
                    "sorted_argmax": pairs_kept(by_argmax(lambda: ke.transient_order(
                        x, params, a.k, diag, prec, center=center))()[3], n_blocks)}
            gaps = torch.empty(triton.cdiv(n, ke.FLAG_ROWS), dtype=torch.int64, device=x.device)
            for name, o in (("kept_order", order), ("kept_order_bits", order_bits)):
                ke.launch_logz(x, params, a.k, diag, prec, center=center, order=o,
                               lzp=torch.empty(n, device=x.device), gaps=gaps)
                kept[name] = pairs_kept(gaps, n_blocks)
            diff = {name: rel_err(fns[name]()[1:], dense)
                    for name in ("sorted", "sorted_argmax", "kept_order", "kept_order_bits", "dense_nocopy")}
            peak = {name: peak_extra(fns[name]) for name in ("sorted", "sorted_argmax", "dense_nocopy", "kept_order")}
            peak.update({name: peak_extra(f) for name, f in fns.items() if name.startswith("sorted_chunks")})
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    times[name].append(bench(f, a.rep))
            if a.profile:
                def ten_sorted():
                    for _ in range(10):
                        fns["sorted"]()
                Path(a.out).mkdir(parents=True, exist_ok=True)
                _profile(f"{pname}_{cov}", ten_sorted, Path(a.out), rows=25)
            res[cov] = {"times_ms": times, "pairs_kept": kept, "rel_diff_vs_dense": diff, "peak_extra_mib": peak}
            print(f"[{pname} {cov} {prec}] pairs kept: " + ", ".join(f"{k} {v:.3f}" for k, v in kept.items())
                  + "; rel diff vs dense: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()), flush=True)
            for name, ts in times.items():
                print(f"  {name:<24} ms " + " ".join(f"{v:.3f}" for v in ts)
                      + (f"   peak {peak[name]:.1f} MiB" if name in peak else ""), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_sort_rows.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
