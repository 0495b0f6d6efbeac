"""A/B of block skipping in the E-step (kernels/estep.py SKIP_LOG2, RowOrder, component_order) on one GPU.

Times the E-step and pass 1 for natural/sorted row orders and several skipping thresholds in interleaved
rounds, and measures in torch the fraction of (row tile, component block) pairs that a threshold keeps, so that
a skip rate and a speed can be told apart. Usage: ``python -m bench_ann.ab_skip --out DIR``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench


def kept_fraction(x, means, var, lw, rows, perm, bm, bk, t):
    """Fraction of (bm-row tile, bk-component block) pairs with some log2 r >= -t, rows in order ``rows`` and
    components in order ``perm`` (float32 torch, chunked)."""
    xs = x[rows.long()]
    mu, v, w = means[perm], var[perm], lw[perm]
    d = x.shape[1]
    keep = tot = 0
    for i in range(0, xs.shape[0] - bm + 1, 1 << 16):
        xb = xs[i:i + (1 << 16)].double()
        xb = xb[: (xb.shape[0] // bm) * bm]
        dist = (xb * xb).sum(1, keepdim=True) - 2 * xb @ mu.double().T + (mu.double() ** 2).sum(1)
        lp = w.double() - 0.5 * d * torch.log(2 * math.pi * v.double()) - dist / (2 * v.double())
        s = (lp - torch.logsumexp(lp, 1, keepdim=True)) / math.log(2)
        tile = s.reshape(-1, bm, s.shape[1] // bk, bk).amax(dim=(1, 3))
        keep += int((tile >= -t).sum())
        tot += tile.numel()
    return keep / tot


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_timing_args(ap)
    ap.add_argument("--precision", default="tf32")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    n, k, d = a.n, a.k, a.d
    x, bound, means, var, _vd, lw, perm = ab_problem(n, k, d, kernels)
    prec = a.precision
    ident = torch.arange(k, device="cuda")
    params_p = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
    params_n = kernels.prepare(means, var, lw, prec, bound)
    best = kernels.estep(x, means, var, lw, precision=prec, params=params_p, return_best=True, skip_log2=0)[4]
    order_p = kernels.row_order(best, perm)
    order_n = kernels.row_order(best)
    out = {"device": torch.cuda.get_device_name(), "n": n, "k": k, "d": d, "precision": prec, "times": {}}
    variants = {
        "natural skip0": lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_n, skip_log2=0),
        "sorted+perm skip0": lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_p, order=order_p,
                                                   skip_log2=0),
        "sorted+perm skip40": lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_p,
                                                    order=order_p, skip_log2=40),
        "sorted+perm skip1e-3": lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_p,
                                                      order=order_p, skip_log2=1e-3),
        "sorted only skip40": lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_n,
                                                    order=order_n, skip_log2=40),
    }
    lzp = torch.empty(n, device="cuda")
    gaps = torch.empty(-(-n // ke.FLAG_ROWS), dtype=torch.int64, device="cuda")
    nkb = -(-k // ke.FLAG_K)
    variants["pass1 natural"] = lambda: ke.launch_logz(x, params_n, k, False, prec)
    variants["pass1 sorted+perm"] = lambda: ke.launch_logz(x, params_p, k, False, prec, order=order_p, lzp=lzp)
    variants["pass1 sorted+perm gaps"] = lambda: ke.launch_logz(x, params_p, k, False, prec, order=order_p, lzp=lzp,
                                                                gaps=gaps)
    variants["work lists"] = lambda: ke._work_lists(gaps, nkb)
    variants["pass1 sorted+perm argmax"] = lambda: ke.launch_logz(x, params_p, k, False, prec, order=order_p,
                                                                  lzp=lzp, with_argmax=True)
    # the sparse E-step with the argmax for the next order (pass 1), and the pieces of a rebuild
    variants["sorted+perm skip40 +best"] = lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_p,
                                                                order=order_p, return_best=True)
    variants["row_order int16 stable"] = lambda: kernels.row_order(best, perm)
    variants["argsort int32"] = lambda: torch.argsort(best.int())
    variants["component_order"] = lambda: kernels.component_order(means)
    for f in variants.values():
        f()
    for r in range(a.rounds):
        for name, f in variants.items():
            out["times"].setdefault(name, []).append(bench(f, a.rep))
    cfg = {}
    for name in ("_logz_kernel", "_estep_stats_kernel"):
        for key, c in getattr(ke, name).cache.items():
            cfg[f"{name}{tuple(key)}"] = str(c)
    out["autotuned"] = cfg
    for name, ts in out["times"].items():
        print(f"{name:32s} " + " ".join(f"{t:7.3f}" for t in ts), flush=True)
    _, counts, _ = ke._work_lists(gaps, nkb)
    out["pairs_kept"] = float(counts.sum()) / (gaps.numel() * nkb)
    print(f"pairs kept by the sparse pass 2 (full data, threshold 2^-40): {out['pairs_kept']:.3f}", flush=True)
    xs = x[: 1 << 18]
    sub_best = best[: 1 << 18]
    fr = {}
    for label, o, p in (("sorted+perm", kernels.row_order(sub_best, perm), perm),
                        ("sorted only", kernels.row_order(sub_best), ident), ("natural", None, ident)):
        rows = o.rows if o is not None else torch.arange(xs.shape[0], device="cuda", dtype=torch.int32)
        for bm, bk in ((32, 64), (64, 64), (128, 128)):
            fr[f"{label} {bm}x{bk}"] = kept_fraction(xs, means, var, lw, rows, p, bm, bk, 40.0)
    out["kept_fraction_2^18_rows_t40"] = fr
    for kk, v in fr.items():
        print(f"kept {kk:28s} {v:.3f}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"ab_skip_{prec}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
