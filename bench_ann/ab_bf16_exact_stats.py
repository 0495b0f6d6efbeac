"""A/B of the diag bf16 statistics from the float32 rows (``kernels.estep.BF16_EXACT_STATS``) on one GPU.

For each K of ``--ks`` on the kernel benchmark's problem (``bench_kernels.ab_problem``: centred SIFT-like rows,
parameters from 3 k-means steps), times the diag bf16 E-step on a transient row order (``sort_rows=True``, the
E-step diag fits run) with the switch off (R X and R x^2 on the bf16-rounded rows) and on (the float32 rows and
their squares as two bf16 terms each), interleaved over ``--rounds`` rounds in one process, and reports each
statistic's relative error against float64 on the first ``--err-rows`` rows (``bench_kernels.ref_stats``).
Writes ``ab_bf16_exact_stats.json`` to ``--out``.

    python -m bench_ann.ab_bf16_exact_stats --ks 1024,4096 --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_timing_args, bench, ref_stats


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--ks", default="1024,4096")
    ap.add_argument("--err-rows", type=int, default=1 << 20)
    add_timing_args(ap)
    a = ap.parse_args(argv)
    from flashgmm_faiss import _torch_backend as tb
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    shipped = ke.BF16_EXACT_STATS
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "d": a.d, "precision": "bf16", "cov": "diag",
           "err_rows": a.err_rows, "shapes": []}
    for k in (int(v) for v in a.ks.split(",")):
        x, bound, means, _vs, var, lw, perm = ab_problem(a.n, k, a.d, kernels)
        xe = x[: min(a.n, a.err_rows)]
        ref = ref_stats(xe, means, var, lw, tb)
        params = kernels.prepare(means, var, lw, "bf16", bound, comp_perm=perm)
        rec = {"k": k, "times_ms": {"off": [], "on": []}, "rel_err": {}}
        for flag in (False, True):
            ke.BF16_EXACT_STATS = flag
            got = kernels.estep(xe, means, var, lw, precision="bf16", params=params, sort_rows=True)
            rec["rel_err"]["on" if flag else "off"] = {name: ((g.double() - r).norm() / r.norm()).item()
                                                       for name, g, r in zip(("nk", "sx", "sq"), got[1:], ref)}
        for _ in range(a.rounds):
            for flag in (False, True):
                ke.BF16_EXACT_STATS = flag
                fn = lambda: kernels.estep(x, means, var, lw, precision="bf16", params=params,  # noqa: E731
                                           sort_rows=True)
                rec["times_ms"]["on" if flag else "off"].append(bench(fn, a.rep))
        ke.BF16_EXACT_STATS = shipped
        print(json.dumps(rec), flush=True)
        out["shapes"].append(rec)
        del x, xe
        torch.cuda.empty_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_bf16_exact_stats.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
