"""How far the sorted diag E-step's two passes are from their tensor-core floors, on a diag fit's own state.

The sparse pass 2 streams only the (64-row tile, 64-component block) pairs that pass 1 marks; its cost is set by
how many pairs that is. This script fits a diag GMM (Triton backend), then, on the fitted state and the fit's own
centre, bound and component order:

* counts the kept pairs of the transient order (``estep.transient_order``'s tile bits), the fraction of all pairs;
* times the E-step (median, ``bench_kernels.bench``) and each of its kernels (torch profiler, mean over
  ``--rep`` calls);
* measures the fp16 tensor-core GEMM ceiling (cuBLAS, 8192^3) and the copy bandwidth in the same process;
* and prints each pass against its product floor (pass 1: 4 fp16 products per (row, component); pass 2: 7 per
  kept pair, 4 for the logits and 3 for R X and R x^2) and pass 2's read floor (the gathered float32 rows).

    python -m bench_ann.estep_floors --out bench_ann/results/DIR          # N=1e6, K=1024, D=128 by default

Writes ``estep_floors.json`` in --out.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from bench_ann.bench_fit import add_problem_args, sift_like
from bench_ann.bench_kernels import bench, matmul_tflops
from bench_ann.profile_fit import kernel_times

PASS2_PRODUCTS = 7     # diag "tf32" sparse pass 2 per kept pair: ql.P, qh.P, xh.A_lo, xh.A, then R xh, R ql, R qh
PASS1_PRODUCTS = 4     # diag "tf32" pass 1 per (row, component): ql.P, qh.P, xh.A_lo, xh.A


def ceilings(rep_ms=300):
    """fp16 GEMM TFLOP/s (8192^3, fp32 accumulation by cuBLAS) and copy GB/s (1 GiB) on this GPU (medians,
    ``bench_kernels.bench``)."""
    tflops = matmul_tflops(torch.float16, rep_ms=rep_ms)
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), rep_ms)
    return {"fp16_gemm_tflops": tflops, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def _us_of(times, name):
    """Summed us per call of the kernels in ``times`` (from :func:`kernel_times`) whose name contains ``name``."""
    return sum(v for kname, v in times.items() if name in kname)


def _scaled_layout(layout, factor):
    """``estep.slab_layout`` with about ``factor`` times the slabs (rows per slab divided by factor)."""
    import triton

    def scaled(n, k, device, d=128):
        rows = triton.cdiv(layout(n, k, device, d)[1], factor)
        return triton.cdiv(n, rows), rows
    return scaled


def diag_fit_state(n, k, d, clusters, kmeans_iter, em_iter):
    """A diag "tf32" fit's state on ``bench_fit.sift_like`` data, as the fit's sorted E-step sees it: ``(x, means,
    var, lw, center, params, fit_s)`` with x (n, d) the raw rows, means (k, d) in the centred frame, var (k, d),
    lw (k,), center (d,), params prepared under the fit's component order and bound, fit_s the fit's seconds."""
    import importlib

    from flashgmm_faiss import GaussianMixture
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")    # (the package's `estep` is the function)
    x = sift_like(n, d, clusters, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        g = GaussianMixture(k, covariance_type="diag", tol=0.0, backend="triton", device="cuda",
                            kmeans_iter=kmeans_iter, max_iter=em_iter, seed=0).fit(x)
        fit_s = time.perf_counter() - t0
    center = torch.as_tensor(g.center_, device="cuda", dtype=torch.float32)
    means = (torch.as_tensor(g.means_, device="cuda") - center).contiguous()
    var = torch.as_tensor(g.covariances_, device="cuda").contiguous()
    lw = torch.log(torch.as_tensor(g.weights_, device="cuda")).contiguous()
    params = ke.prepare(means, var, lw, "tf32", ke.absmax(x, center), comp_perm=ke.component_order(means))
    return x, means, var, lw, center, params, fit_s


def run(args):
    import importlib

    import triton
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    k, d, n = args.k, args.d, args.n
    x, means, var, lw, center, params, fit_s = diag_fit_state(n, k, d, args.clusters, args.kmeans_iter,
                                                              args.em_iter)
    gaps = ke.transient_order(x, params, k, True, "tf32", center=center)[3]
    n_tiles, n_blocks = gaps.shape[0], triton.cdiv(k, ke.FLAG_K)
    per_block = [int(((gaps >> b) & 1).sum()) for b in range(n_blocks)]    # the kept tiles of each block
    pairs = sum(per_block)
    frac = pairs / (n_tiles * n_blocks)
    slabs = ke.slab_layout(n, k, x.device, d)[0]

    def sorted_estep():
        return ke.estep(x, means, var, lw, precision="tf32", center=center, params=params, sort_rows=True)

    per_kernel, _ = kernel_times(sorted_estep, args.rep)
    total_ms = bench(sorted_estep, args.rep_ms)
    # pass 2 splits each block's work list over the same number of slabs: its time follows the largest list
    slab_runs = []
    shipped_layout = ke.slab_layout
    try:
        for f in args.slab_factors:
            ke.slab_layout = _scaled_layout(shipped_layout, f)
            kt, _ = kernel_times(sorted_estep, args.rep)
            slab_runs.append({"factor": f, "slabs": ke.slab_layout(n, k, x.device, d)[0],
                              "pass2_us": _us_of(kt, "_estep_stats_kernel"), "reduce_us": _us_of(kt, "_reduce_k")})
    finally:
        ke.slab_layout = shipped_layout
    ceil = ceilings()
    tile, block = ke.FLAG_ROWS, ke.FLAG_K
    pass1_flop = PASS1_PRODUCTS * 2.0 * n * (n_blocks * block) * d
    pass2_flop = PASS2_PRODUCTS * 2.0 * pairs * tile * block * d
    pass2_bytes = pairs * tile * d * 4.0

    p1_ms, p2_ms = _us_of(per_kernel, "logz") / 1e3, _us_of(per_kernel, "_estep_stats_kernel") / 1e3
    out = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(args), "fit_s": fit_s,
        "tiles": n_tiles, "blocks": n_blocks, "kept_pairs": pairs, "kept_fraction": frac,
        "pairs_per_block": per_block, "slabs": slabs, "slab_factor_runs": slab_runs,
        "ceilings": ceil, "sorted_estep_ms": total_ms, "kernel_us": per_kernel,
        "pass2_configs": {str(key): str(cfg) for key, cfg in ke._estep_stats_kernel.cache.items()},
        "pass1": {"ms": p1_ms, "product_floor_ms": pass1_flop / ceil["fp16_gemm_tflops"] / 1e9},
        "pass2": {"ms": p2_ms, "product_floor_ms": pass2_flop / ceil["fp16_gemm_tflops"] / 1e9,
                  "row_read_floor_ms": pass2_bytes / ceil["copy_gbps"] / 1e6},
    }
    print(f"# {out['device']}: N={n} K={k} D={d}, diag fit state after {args.kmeans_iter} k-means + "
          f"{args.em_iter} EM iterations ({fit_s:.1f} s)")
    print(f"kept pairs {pairs} of {n_tiles * n_blocks} ({100 * frac:.1f} %); fp16 GEMM "
          f"{ceil['fp16_gemm_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    print(f"sorted E-step {total_ms:.3f} ms")
    print("| pass | ms | product floor ms | fraction of the floor's rate |")
    print("|---|---:|---:|---:|")
    for name in ("pass1", "pass2"):
        r = out[name]
        print(f"| {name} | {r['ms']:.3f} | {r['product_floor_ms']:.3f} | {r['product_floor_ms'] / r['ms']:.2f} |")
    print(f"pass 2 read floor (gathered float32 rows) {out['pass2']['row_read_floor_ms']:.3f} ms")
    print(f"pairs per block (largest / mean {max(per_block) / (pairs / n_blocks):.2f}): {per_block}")
    print(f"{slabs} slabs per block: the largest program streams {triton.cdiv(max(per_block), slabs)} tiles, "
          f"a balanced split {triton.cdiv(pairs, slabs * n_blocks)}")
    for r in slab_runs:
        print(f"slabs x{r['factor']} ({r['slabs']}): pass 2 {r['pass2_us']:.1f} us, reductions {r['reduce_us']:.1f} us")
    print("pass 2 autotune choices:", out["pass2_configs"])
    print("kernels (us per call):")
    for kname, v in list(per_kernel.items())[:14]:
        print(f"  {v:9.1f}  {kname[:100]}")
    if args.out:
        p = Path(args.out)
        p.mkdir(parents=True, exist_ok=True)
        (p / "estep_floors.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(p)
    p.add_argument("--kmeans-iter", type=int, default=3)
    p.add_argument("--em-iter", type=int, default=10)
    p.add_argument("--rep", type=int, default=20, help="profiled calls per kernel table")
    p.add_argument("--rep-ms", type=int, default=100, help="timing budget of the E-step's median (bench)")
    p.add_argument("--slab-factors", type=lambda v: [int(f) for f in v.split(",")], default=[1, 2, 4],
                   help="also time pass 2 and the reductions with this many times the slabs (comma-separated)")
    p.add_argument("--out", default=None)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
