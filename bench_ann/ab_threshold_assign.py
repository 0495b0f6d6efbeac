"""A/B of the threshold-assignment kernel's launch configs and a breakdown of ``kernels.threshold_assign``.

On the A/B problem (``bench_kernels.ab_problem``: centred SIFT-like rows, parameters from k-means steps) it times,
per covariance type: pass 1 with the argmax (``launch_logz``), the first launch of ``_threshold_kernel`` (all
rows) under each config of ``CONFIGS`` (BLOCK_M, BLOCK_K, num_warps, num_stages), width of ``WIDTHS`` (slots
per row) and form of ``FORMS`` (``THRESHOLD_EXTRACT``, ``THRESHOLD_SORT_WIDTH``: extraction rounds with the rows
sorted in the kernel, extraction rounds sorted by torch, the rank product), and the whole ``threshold_assign``
(tau = 1/K, no cap) under each. Writes ``ab_threshold_assign_<device>.json``.

Usage: ``python -m bench_ann.ab_threshold_assign --profile --out bench_ann/results/v43_refresh``.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from .bench_kernels import ab_problem, add_shape_args, add_timing_args, bench

CONFIGS = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)]
WIDTHS = (8, 16)
FORMS = {"extract+sort": (True, 32), "extract": (True, 0), "rank": (False, 0)}   # (EXTRACT, SORT_WIDTH)


def _profile(fn, calls=5, top=12):
    """{kernel name: GPU microseconds per call of ``fn``} for its ``top`` most expensive kernels
    (:func:`bench_ann.profile_fit.kernel_times`)."""
    from .profile_fit import kernel_times
    per_call, _ = kernel_times(fn, calls)
    return {name[:80]: round(us, 1) for name, us in list(per_call.items())[:top]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap)
    add_timing_args(ap, rep=100)
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--profile", action="store_true",
                    help="also the GPU time per kernel of the whole threshold_assign (shipped settings)")
    args = ap.parse_args(argv)
    kernels = importlib.import_module("flashgmm_faiss.kernels")
    ka = importlib.import_module("flashgmm_faiss.kernels.assign")
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    x, bound, means, var_sph, var_diag, lw, _ = ab_problem(args.n, args.k, args.d, kernels, with_order=False)
    n, d, k = x.shape[0], x.shape[1], args.k
    tau = 1.0 / k
    mode = ke._MODES[args.precision]
    rows = []
    for cov, var in (("spherical", var_sph), ("diag", var_diag)):
        diag = cov == "diag"
        params = ke.prepare(means, var, lw, args.precision, bound)
        logz, best = ke.launch_logz(x, params, k, diag, args.precision, with_argmax=True)
        rows.append({"cov": cov, "what": "pass 1 with argmax", "ms": bench(
            lambda: ke.launch_logz(x, params, k, diag, args.precision, with_argmax=True), args.rep)})
        print(json.dumps(rows[-1]), flush=True)
        for cfg, width, form in ((c, w, f) for c in CONFIGS for w in WIDTHS for f in FORMS):
            old = (ka.THRESHOLD_CONFIG, ka.THRESHOLD_WIDTH, ka.THRESHOLD_EXTRACT, ka.THRESHOLD_SORT_WIDTH)
            ka.THRESHOLD_CONFIG, ka.THRESHOLD_WIDTH = cfg, width
            ka.THRESHOLD_EXTRACT, ka.THRESHOLD_SORT_WIDTH = FORMS[form]
            try:
                k_ms = bench(lambda: ka._launch_threshold(x, None, params, logz, best, k, tau, diag, mode, None,
                                                          width), args.rep)
                counts = ka._launch_threshold(x, None, params, logz, best, k, tau, diag, mode, None, width)[2]
                whole = bench(lambda: ka.threshold_assign(x, means, var, lw, tau, None, precision=args.precision,
                                                          x_absmax=bound), args.rep)
            except Exception as err:  # noqa: BLE001 (a config out of resources: recorded, not fatal)
                rows.append({"cov": cov, "config": cfg, "width": width, "form": form, "error": repr(err)[:200]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            finally:
                ka.THRESHOLD_CONFIG, ka.THRESHOLD_WIDTH, ka.THRESHOLD_EXTRACT, ka.THRESHOLD_SORT_WIDTH = old
            over = int((counts > width).sum())
            rows.append({"cov": cov, "config": cfg, "width": width, "form": form, "kernel_ms": k_ms,
                         "whole_ms": whole, "rows_over_width": over, "entries": int(counts.sum())})
            print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            rows.append({"cov": cov, "what": "profile of threshold_assign, GPU us per call", "kernels": _profile(
                lambda: ka.threshold_assign(x, means, var, lw, tau, None, precision=args.precision,
                                            x_absmax=bound))})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    (out / f"ab_threshold_assign_{dev.lower().replace(' ', '_')}.json").write_text(json.dumps(
        {"device": dev, "n": n, "k": k, "d": d, "precision": args.precision, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
