"""A/B of the small per-call kernels' launch sizes on one GPU: ``prepare`` and the partials' reduction.

Every E-step call runs ``kernels.prepare`` once per iteration (O(K D) float64 math) and ``reduce_partials`` once per
chunk (a fixed-order float64 sum of pass 2's S per-slab partials). A profile of a diag fit (H100, N=1e6, K=1024,
D=128) put them at 27 and 42 us of a 2.85 ms EM iteration. This script times each under its launch sizes
(``kernels.estep.PREPARE_ELEMS``: elements per ``prepare`` program; ``REDUCE_SIZES[cov]``: elements per
reduction program x slabs per load), and the sparse pass 2's work-list scan (``WORK_LIST_BLOCK`` x
``WORK_LIST_WARPS``) on synthetic tile bits, each variant as a CUDA graph of ``--calls`` back-to-back calls
(so that host launch time does not hide the kernel time), interleaved over ``--rounds`` rounds, on the shapes of
``--ks`` (the partials as ``slab_layout`` sizes them for ``--n`` rows), and checks that every variant's outputs are
bitwise the default's. Writes ``ab_small_kernels.json`` to ``--out``.

    python -m bench_ann.ab_small_kernels --ks 1024,4096 --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
from pathlib import Path

import torch

from bench_ann.bench_kernels import add_timing_args


def graph_us(fn, calls, rep):
    """Microseconds per call of ``fn`` replayed ``calls`` times from one CUDA graph (median of do_bench)."""
    import triton
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median") * 1e3 / calls


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b) if isinstance(u, torch.Tensor))


OLD_SIZES = (4096, {"spherical": (128, 32), "diag": (128, 32)}, 1024, 4)   # before v32


def ab_fits(a, ke, shipped, k):
    """Median ms per EM iteration of whole fits (10 k-means + ``--fit-em-iter`` EM iterations, tol 0, defaults:
    sparse E-step, CUDA graphs) with the old and the shipped sizes, ``--rounds`` interleaved rounds."""
    import warnings

    from flashgmm_faiss import GaussianMixture

    from bench_ann.bench_fit import sift_like
    x = sift_like(a.fit_n, a.d, k)

    def use(sizes):
        ke.PREPARE_ELEMS, ke.REDUCE_SIZES, ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS = (
            sizes[0], dict(sizes[1]), sizes[2], sizes[3])

    res = {"n": a.fit_n, "k": k, "ms": {}}
    variants = {"old": OLD_SIZES, "shipped": shipped}
    for cov in ("spherical", "diag"):
        for name, sizes in variants.items():
            use(sizes)
            with warnings.catch_warnings():      # warm-up: compilation of this variant's kernels
                warnings.simplefilter("ignore")
                GaussianMixture(k, covariance_type=cov, kmeans_iter=1, max_iter=7, device="cuda", seed=0).fit(x)
            res["ms"][f"{cov} {name}"] = []
        for _ in range(a.rounds):
            for name, sizes in variants.items():
                use(sizes)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = GaussianMixture(k, covariance_type=cov, kmeans_iter=10, max_iter=a.fit_em_iter, tol=0.0,
                                        device="cuda", seed=0).fit(x)
                res["ms"][f"{cov} {name}"].append(1e3 * statistics.median(h["seconds"] for h in g.history_[1:]))
        print(f"fits N={a.fit_n} K={k} {cov}: " + ", ".join(
            f"{n} {statistics.median(v):.3f} ms {[round(t, 3) for t in v]}" for n, v in res["ms"].items()
            if n.startswith(cov)), flush=True)
    use(shipped)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--ks", default="1024,4096")
    ap.add_argument("--prepare", default="4096,1024,512,256,128", help="PREPARE_ELEMS values")
    ap.add_argument("--reduce", default="128x32,256x32,512x32,256x16,512x8,1024x8",
                    help="REDUCE_SIZES values (elements per program x slabs per load)")
    ap.add_argument("--work", default="1024x4,2048x4,4096x4,4096x8,8192x8,16384x16",
                    help="WORK_LIST_BLOCK x WORK_LIST_WARPS values")
    ap.add_argument("--tiles", default="15625,65536", help="tile counts of the work-list A/B (n / 64)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--fit-n", type=lambda v: int(float(v)), default=0,
                    help="also time GaussianMixture fits on this many SIFT-like rows (K = the first of --ks), "
                         "spherical and diag 'tf32', with the old sizes and the shipped ones, interleaved")
    ap.add_argument("--fit-em-iter", type=int, default=30)
    add_timing_args(ap, rep=50)
    a = ap.parse_args(argv)
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    shipped = (ke.PREPARE_ELEMS, dict(ke.REDUCE_SIZES), ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS)
    prep = [int(v) for v in a.prepare.split(",")]
    red = [tuple(int(u) for u in v.split("x")) for v in a.reduce.split(",")]
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "d": a.d, "calls": a.calls, "shipped": shipped,
           "shapes": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for k in (int(v) for v in a.ks.split(",")):
        d = a.d
        means = torch.randn(k, d, device="cuda", generator=g) * 30
        var_d = torch.rand(k, d, device="cuda", generator=g) * 200 + 1
        var_s = var_d.mean(1)
        lw = torch.log_softmax(torch.randn(k, device="cuda", generator=g), 0)
        perm = torch.randperm(k, device="cuda", generator=g)
        slabs, _ = ke.slab_layout(a.n, k, torch.device("cuda"), d)
        rec = {"k": k, "slabs": slabs, "prepare_us": {}, "reduce_us": {}, "bitwise": {}}
        for cov, var in (("spherical", var_s), ("diag", var_d)):
            ke.PREPARE_ELEMS = shipped[0]
            ref = ke.prepare(means, var, lw, "tf32", 200.0, comp_perm=perm)
            run = lambda: ke.prepare(means, var, lw, "tf32", 200.0, comp_perm=perm)  # noqa: E731 (reads the size)
            for e in prep:
                ke.PREPARE_ELEMS = e
                rec["bitwise"][f"prepare {cov} {e}"] = same(run(), ref)
                rec["prepare_us"][f"{cov} {e}"] = []
            for _ in range(a.rounds):
                for e in prep:
                    ke.PREPARE_ELEMS = e
                    rec["prepare_us"][f"{cov} {e}"].append(graph_us(run, a.calls, a.rep))
            ke.PREPARE_ELEMS = shipped[0]
            params = ke.prepare(means, var, lw, "tf32", 200.0, comp_perm=perm)
            diag = cov == "diag"
            nk_p = torch.rand(slabs, k, device="cuda", generator=g)
            sx_p = torch.randn(slabs, k, d, device="cuda", generator=g)
            sq_p = torch.rand((slabs, k, d) if diag else (slabs, k), device="cuda", generator=g)
            ke.REDUCE_SIZES[cov] = shipped[1][cov]
            ref = ke.reduce_partials(nk_p, sx_p, sq_p, means, params.inv, perm)
            for b, sb in red:
                ke.REDUCE_SIZES[cov] = (b, sb)
                rec["bitwise"][f"reduce {cov} {b}x{sb}"] = same(
                    ke.reduce_partials(nk_p, sx_p, sq_p, means, params.inv, perm), ref)
                rec["reduce_us"][f"{cov} {b}x{sb}"] = []
            for _ in range(a.rounds):
                for b, sb in red:
                    ke.REDUCE_SIZES[cov] = (b, sb)
                    rec["reduce_us"][f"{cov} {b}x{sb}"].append(graph_us(
                        lambda: ke.reduce_partials(nk_p, sx_p, sq_p, means, params.inv, perm), a.calls, a.rep))
            ke.REDUCE_SIZES[cov] = shipped[1][cov]
        for key in ("prepare_us", "reduce_us"):
            print(f"K={k} slabs={slabs} {key}: " + ", ".join(f"{n} {statistics.median(v):.1f}"
                                                             for n, v in rec[key].items()), flush=True)
        print(f"K={k} not bitwise: {[n for n, ok in rec['bitwise'].items() if not ok]}", flush=True)
        out["shapes"].append(rec)
    work_variants = [tuple(int(u) for u in v.split("x")) for v in a.work.split(",")]
    out["work_lists"] = []
    for n_tiles in (int(v) for v in a.tiles.split(",")):
        # a fit's state: most tiles need one or two of the 16 blocks (bits of a random block and its neighbour)
        blk = torch.randint(0, 16, (n_tiles,), device="cuda", generator=g)
        two = torch.rand(n_tiles, device="cuda", generator=g) < 0.3
        gaps = (1 << blk) | torch.where(two, 1 << ((blk + 1) % 16), 0)
        ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS = shipped[2:]
        ref_w, ref_c, _ = ke._work_lists(gaps, 16)
        rec = {"n_tiles": n_tiles, "us": {}, "bitwise": {}}
        for b, w in work_variants:
            ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS = b, w
            got_w, got_c, _ = ke._work_lists(gaps, 16)
            rec["bitwise"][f"{b}x{w}"] = torch.equal(got_c, ref_c) and all(
                torch.equal(got_w[i, :c], ref_w[i, :c]) for i, c in enumerate(ref_c.tolist()))
            rec["us"][f"{b}x{w}"] = []
        for _ in range(a.rounds):
            for b, w in work_variants:
                ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS = b, w
                rec["us"][f"{b}x{w}"].append(graph_us(lambda: ke._work_lists(gaps, 16), a.calls, a.rep))
        ke.WORK_LIST_BLOCK, ke.WORK_LIST_WARPS = shipped[2:]
        print(f"work lists, {n_tiles} tiles: " + ", ".join(f"{n} {statistics.median(v):.1f}"
                                                           for n, v in rec["us"].items())
              + f"; not bitwise: {[n for n, ok in rec['bitwise'].items() if not ok]}", flush=True)
        out["work_lists"].append(rec)
    if a.fit_n:
        out["fits"] = ab_fits(a, ke, shipped, int(a.ks.split(",")[0]))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_small_kernels.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
