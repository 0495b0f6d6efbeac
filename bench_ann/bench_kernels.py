"""Kernel benchmark: fused Triton EM against torch/cuBLAS baselines, in one process on one GPU.

For each shape (N, K, D) it times

* ``ours E-step``        : ``flashgmm_faiss.kernels.estep`` on the whole X (chunks of ``--chunk`` rows when N is larger),
                           tf32 and bf16, spherical and diag;
* ``ours EM iter``       : the same over chunks, float64 accumulation and the M-step in torch (what
                           ``GaussianMixture(backend="triton")`` does per iteration);
* ``ours ... sorted``    : the same with rows visited in the order of the previous E-step's most likely component
                           and components grouped by ``kernels.component_order`` (block skipping then drops most
                           exponentials and most of R^T X; ``kernels/estep.py``). The E-step row gets the order made
                           from a previous call; the EM-iteration row includes building the next order (argmax in
                           pass 1, one argsort per chunk); ``sorted/4`` (``/8``) rebuilds it every 4th (8th)
                           iteration and reports the mean over the cycle, rebuilding iteration included. The
                           component order is computed once (its time is in the note): the benchmark's parameters
                           do not move between iterations;
* ``ours ... transient``  : the sparse E-step on a transient row order (``kernels.estep(sort_rows=True)``): pass 1 in
                           the rows' own order records each row's block bits, the call sorts the rows by them and
                           the sparse pass 2 runs on that order; nothing is kept between iterations. This is the
                           E-step ``GaussianMixture`` runs for diag fits (and for chunks without a kept order);
* ``... graph``          : ``--graphs``: the EM-iteration rows again, recorded once as a CUDA graph and replayed (one
                           call instead of ~60 launches: what ``GaussianMixture(cuda_graphs=True)`` does for data
                           resident on the GPU); at N = 1e6 the eager rows are bound by the host's launch rate;
* ``torch chunked``      : ``_torch_backend.estep`` on 131072-row chunks with tf32 GEMMs, eager and under
                           ``torch.compile`` (the strongest simple alternative);
* ``torch materialising``: the same on the whole N x K matrix at once (skipped when it cannot fit);
* ``torch k-means``      : ``_torch_backend.kmeans_step`` on 131072-row chunks (GEMM + argmin + index_add);
* ``ours k-means``       : ``flashgmm_faiss.kernels.kmeans_step`` (tf32); with ``--graphs`` also replayed as a CUDA
                           graph.

Columns: median ms, TFLOP/s of the GEMM work the method must do (spherical E-step 3 GEMMs of 2NKD, diag 6;
k-means 1), fraction of the GEMM ceiling measured in the same run (torch.matmul 8192^3, tf32 and bf16),
peak memory beyond X and the parameters (``torch.cuda.max_memory_allocated`` deltas), and the relative error
of Nk, Sx, Sq (the max of the three) against float64 on the first ``--err-rows`` rows.

The data are SIFT-like (non-negative integers 0..255 with cluster structure) and centred, as the estimator
centres them; the parameters come from a few k-means steps on a subsample, so responsibilities look like
mid-fit ones. Results go to ``bench_ann/results/kernels_<device>.json`` and ``.md``.

Usage (a quick run): ``python -m bench_ann.bench_kernels --shapes 1e6,1024,128 --rep 200``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_SHAPES = "1e6,1024,128;1e6,1024,96;1e7,1024,128;1e6,4096,128;1e8,1024,128"
TORCH_CHUNK = 131072


def parse_shapes(s):
    out = []
    for item in s.split(";"):
        n, k, d = item.split(",")
        out.append((int(float(n)), int(k), int(d)))
    return out


def bench(fn, rep_ms):
    """Median ms: triton's do_bench for fast ops, a few event-timed runs for ops over 100 ms."""
    import triton
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    if est < 100:
        return triton.testing.do_bench(fn, warmup=min(25, rep_ms), rep=rep_ms, return_mode="median")
    times = []
    for _ in range(3 if est < 2000 else 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_ms(fn, calls=5):
    """Host time to issue ``fn`` (ms per call, no sync inside the timing): when it approaches the GPU time that
    ``bench`` reports, the measurement is bound by Python and launch overhead, not by the kernels."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / calls


def graphed(fn):
    """``fn`` recorded as a CUDA graph (after one eager call: compilation and autotuning happen outside the
    capture); returns the replay function."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def peak_extra(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_tflops(dtype, n=8192, rep_ms=300):
    """TFLOP/s of an n x n x n ``torch.matmul`` (cuBLAS) in ``dtype`` on the GPU, median over ``rep_ms`` ms
    (:func:`bench`); float32 runs as tf32 (``allow_tf32`` is switched on)."""
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    return 2 * n ** 3 / bench(lambda: a @ b, rep_ms) / 1e9


def gemm_ceiling():
    """(tf32, bf16) GEMM ceilings in TFLOP/s, measured in this process."""
    return matmul_tflops(torch.float32), matmul_tflops(torch.bfloat16)


def make_data(n, d, seed=0, chunk=1 << 22):
    """SIFT-like uint8-range data, generated on the GPU chunk by chunk, then centred (in place)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    centres = torch.rand(256, d, device="cuda", generator=g) * 60
    centres *= torch.rand(256, d, device="cuda", generator=g) < 0.4
    x = torch.empty(n, d, device="cuda")
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        lab = torch.randint(0, 256, (m,), device="cuda", generator=g)
        x[i:i + m] = (centres[lab] + 15 * torch.randn(m, d, device="cuda", generator=g)).clamp_(0, 255).round_()
    mean = torch.zeros(d, dtype=torch.float64, device="cuda")
    for i in range(0, n, chunk):
        mean += x[i:i + chunk].sum(0, dtype=torch.float64)
    mean = (mean / n).float()
    for i in range(0, n, chunk):
        x[i:i + chunk] -= mean
    return x


def add_shape_args(ap):
    """The A/B scripts' problem size: --n (1000000 or 1e6), --k, --d."""
    ap.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)


def add_timing_args(ap, rep: int = 60, out: str = "."):
    """The A/B scripts' timing and output: --rounds (interleaved rounds), --rep (do_bench ms per measurement),
    --out (the result folder)."""
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=rep, help="do_bench ms per measurement")
    ap.add_argument("--out", default=out)


def ab_problem(n, k, d, kernels, with_order=True):
    """The A/B scripts' problem: centred SIFT-like x (n, d) (:func:`make_data`), its bound max |x|, the
    :func:`make_params` parameters (means, spherical and diag variances, log-weights) and the kernels' component
    order of the means (None when not ``with_order``)."""
    x = make_data(n, d)
    bound = max(-float(x.min()), float(x.max()))
    means, var_sph, var_diag, lw = make_params(x, k, kernels)
    perm = kernels.component_order(means) if with_order else None
    return x, bound, means, var_sph, var_diag, lw, perm


def make_params(x, k, kernels, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sub = x[: min(len(x), 1 << 20)]
    c = sub[torch.randint(0, len(sub), (k,), device="cuda", generator=g)].clone()
    for _ in range(3):
        lab, _, cnt, sums = kernels.kmeans_step(sub, c, precision="ieee")
        nz = cnt > 0
        c[nz] = sums[nz] / cnt[nz, None]
    lab, mind, cnt, _ = kernels.kmeans_step(sub, c, precision="ieee")
    cnt64 = cnt.double().clamp_min(1)
    d = x.shape[1]
    sq = torch.zeros(k, d, dtype=torch.float64, device="cuda").index_add_(0, lab, (sub - c[lab]).double() ** 2)
    var_diag = (sq / cnt64[:, None]).clamp_min(1.0).float()
    var_sph = (sq.sum(1) / cnt64 / d).clamp_min(1.0).float()
    lw = torch.log(cnt64 / cnt64.sum()).float()
    return c.contiguous(), var_sph, var_diag, lw


def sorted_inputs(x, means, var, lw, precision, bound, perm, kernels):
    """The sparse E-step's inputs on X (n, D): parameters prepared under the component permutation ``perm`` (K,),
    the row order from one E-step's argmax, and pass 1's position-ordered logZ (n,) and gap (cdiv(n, FLAG_ROWS),)
    buffers. Returns ``(params, order, lzp, gaps)``."""
    import triton
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    n = x.shape[0]
    params = kernels.prepare(means, var, lw, precision, bound, comp_perm=perm)
    best = kernels.estep(x, means, var, lw, precision=precision, params=params, return_best=True)[4]
    lzp = torch.empty(n, device=x.device)
    gaps = torch.empty(triton.cdiv(n, kestep.FLAG_ROWS), dtype=torch.int64, device=x.device)
    return params, kernels.row_order(best, perm), lzp, gaps


def ref_stats(x, means, var, lw, tb, chunk=65536):
    nk = sx = sq = 0
    for i in range(0, len(x), chunk):
        st = tb.estep(x[i:i + chunk].double(), means.double(), var.double(), lw.double())
        nk, sx, sq = nk + st.nk, sx + st.sx, sq + st.sq
    return nk, sx, sq


def rel_err(got, ref):
    return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref))


def autotuned_configs():
    """The config each autotuned kernel chose, per autotune key (K, D, flags...): to reproduce a run."""
    out = {}
    for mod, names in (("estep", ("_logz_kernel", "_estep_stats_kernel")), ("kmeans", ("_kmeans_assign_kernel",)),
                       ("assign", ("_topk_kernel",))):
        m = importlib.import_module(f"flashgmm_faiss.kernels.{mod}")
        for name in names:
            kern = getattr(m, name, None)
            for key, cfg in getattr(kern, "cache", {}).items():
                out[f"{name}{tuple(key)}"] = str(cfg)
    return out


def markdown(metas, note=None):
    """One markdown table for one or several result files of the same device (``note``: a paragraph after the
    list of runs, e.g. which code version each run measured)."""
    m0 = metas[0]
    lines = [f"# Kernel benchmark on {m0['device']}", "",
             f"torch {m0['torch']}, triton {m0['triton']}. Runs (each row below comes from one of them):", ""]
    for m in metas:
        c = m["gemm_ceiling_tflops"]
        lines.append(f"- {m['date']}: `{m['command']}` (GEMM ceilings measured in that run: tf32 {c['tf32']:.0f}, "
                     f"bf16 {c['bf16']:.0f} TFLOP/s)")
    if note:
        lines += ["", note]
    lines += ["",
              "TFLOP/s counts the GEMM work the method must do (spherical E-step 3 GEMMs of 2NKD, for ours and for "
              "torch alike; diag 6; k-means 1). The 'tf32' mode runs its products on fp16 tensor cores (tf32-precision "
              "operands, see kernels/estep.py), so its 'frac of ceiling' against the tf32 GEMM rate can exceed 1; "
              "bf16 rows divide by the bf16 rate. rel err is the max over Nk, Sx, Sq of ||got - ref|| / ||ref|| against float64 on "
              f"the first {m0.get('err_rows', 1 << 20)} rows; extra MiB is the peak allocation beyond X and the "
              "parameters. 'ours EM iter' runs the fused E-step over chunks of 4194304 rows (or --chunk, noted), "
              "accumulates in float64 and does the M-step in torch.", "",
              "| N | K | D | method | cov | prec | ms | TFLOP/s | frac of ceiling | extra MiB | rel err | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in metas:
        chunk_note = ""
        if "--chunk" in m["command"]:
            rows_per_call = m["command"].split("--chunk ")[1].split()[0]
            chunk_note = f" (chunk {rows_per_call}" + (", no row copy)" if "--no-copy" in m["command"] else ")")
        for r in m["rows"]:
            f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
            note = r["note"] + (chunk_note if r["method"] in ("ours EM iter", "ours k-means") else "")
            lines.append(f"| {r['N']:.0e} | {r['K']} | {r['D']} | {r['method'].strip()} | {r['cov']} | "
                         f"{r['precision']} | {f(r['ms'], '%.3f')} | {f(r['tflops'], '%.1f')} | "
                         f"{f(r['frac_ceiling'], '%.2f')} | {f(r['extra_mib'], '%.1f')} | {f(r['rel_err'], '%.1e')} | "
                         f"{note} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="'N,K,D;N,K,D;...' (N may be written 1e6)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms per measurement")
    ap.add_argument("--chunk", type=int, default=1 << 22, help="rows per fused E-step call in the EM iteration")
    ap.add_argument("--err-rows", type=int, default=1 << 20, help="rows of the float64 error subsample")
    ap.add_argument("--methods", default="all",
                    help="comma list among ours_estep,ours_em,ours_estep_sorted,ours_em_sorted,torch_chunked,"
                         "torch_compile,torch_material,torch_kmeans,ours_kmeans (default all)")
    ap.add_argument("--precisions", default="tf32,bf16")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--breakdown", action="store_true",
                    help="also time pass 1 of the E-step alone, and the E-step without block skipping")
    ap.add_argument("--no-copy", action="store_true",
                    help="EM iteration without the kernels' 16-bit row copy (copy_rows=False): for huge chunks")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no benchmark: write one markdown table from these result files to --merge-md")
    ap.add_argument("--merge-md", default=None)
    ap.add_argument("--merge-note", default=None, help="a paragraph for the merged table (which run is which code)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the EM-iteration and k-means rows replayed as CUDA graphs (no host launch "
                         "overhead)")
    args = ap.parse_args(argv)
    if args.merge:
        metas = [json.loads(Path(p).read_text()) for p in args.merge]
        Path(args.merge_md).write_text(markdown(metas, args.merge_note))
        return

    import triton
    from flashgmm_faiss import _torch_backend as tb
    from flashgmm_faiss import kernels
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")   # the package re-exports estep(), the function

    print(f"# pass 1 software-pipelined: {kestep.PIPELINE_LOGZ}", flush=True)

    methods = set(args.methods.split(",")) if args.methods != "all" else {
        "ours_estep", "ours_em", "ours_estep_sorted", "ours_em_sorted", "ours_estep_transient", "ours_em_transient",
        "torch_chunked", "torch_compile", "torch_material", "torch_kmeans", "ours_kmeans"}
    precisions = args.precisions.split(",")
    dev_name = torch.cuda.get_device_name()
    free_total = torch.cuda.mem_get_info()[1]
    ceil_tf32, ceil_bf16 = gemm_ceiling()
    print(f"# {dev_name}: GEMM ceiling tf32 {ceil_tf32:.0f} TFLOP/s, bf16 {ceil_bf16:.0f} TFLOP/s", flush=True)
    rows = []

    def record(shape, method, cov, prec, ms, gemms, mem, err, note=""):
        n, k, d = shape
        fl = gemms * 2.0 * n * k * d
        tflops = fl / ms / 1e9 if ms else None
        ceil = ceil_bf16 if prec == "bf16" else ceil_tf32
        row = dict(N=n, K=k, D=d, method=method, cov=cov, precision=prec, ms=ms, tflops=tflops,
                   frac_ceiling=(tflops / ceil) if tflops else None, extra_mib=mem, rel_err=err, note=note)
        rows.append(row)
        print(f"{n:>11} {k:>5} {d:>4} {method:<20} {cov:<9} {prec:<5} "
              f"{(f'{ms:10.3f}' if ms else '         -')} {(f'{tflops:7.1f}' if tflops else '      -')} "
              f"{(f'{tflops / ceil:6.2f}' if tflops else '     -')} {(f'{mem:9.1f}' if mem is not None else '        -')} "
              f"{(f'{err:9.2e}' if err is not None else '        -')} {note}", flush=True)

    def write_results():
        """The rows so far (and the configs the autotuner chose) to kernels_<device>[_<tag>].json and .md."""
        meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                    autotuned=autotuned_configs(), pipelined_pass1=kestep.PIPELINE_LOGZ, skip_log2=kestep.SKIP_LOG2,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    command=" ".join([os.path.basename(sys.executable), "-m", "bench_ann.bench_kernels"]
                                     + sys.argv[1:]),
                    gemm_ceiling_tflops=dict(tf32=ceil_tf32, bf16=ceil_bf16), rows=rows, err_rows=args.err_rows)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = dev_name.lower().replace("nvidia ", "").replace(" ", "_") + (f"_{args.tag}" if args.tag else "")
        (out / f"kernels_{slug}.json").write_text(json.dumps(meta, indent=1))
        (out / f"kernels_{slug}.md").write_text(markdown([meta]))
        print(f"wrote {out}/kernels_{slug}.json and .md", flush=True)

    print(f"{'N':>11} {'K':>5} {'D':>4} {'method':<20} {'cov':<9} {'prec':<5} {'ms':>10} {'TFLOP/s':>7} "
          f"{'ceil':>6} {'extraMiB':>9} {'rel_err':>9} note", flush=True)
    for shape in parse_shapes(args.shapes):
        n, k, d = shape
        need = n * d * 4
        if need > 0.9 * free_total:
            record(shape, "all", "-", "-", None, 0, None, None, f"skipped: X needs {need / 2**30:.0f} GiB")
            continue
        torch.cuda.empty_cache()
        x = make_data(n, d)
        # |x| bound, known to the estimator from its validation pass (chunked: no copy of X)
        bound = max(max(-float(t.min), float(t.max))
                    for t in (torch.aminmax(x[i:i + (1 << 22)]) for i in range(0, n, 1 << 22)))
        means, var_sph, var_diag, lw = make_params(x, k, kernels)
        xe = x[: min(n, args.err_rows)]
        chunk = args.chunk

        def em_iter(var, prec, orders=None, perm=None, refresh=1, transient=False):
            """One EM iteration over the chunks; with ``orders`` (a dict chunk start -> RowOrder, updated in
            place) the rows are visited in the previous iteration's order, and every ``refresh``-th iteration the
            next order is built (argmax in pass 1, one argsort per chunk); ``transient``: each chunk's E-step sorts
            its rows itself (``sort_rows=True``, components in the order ``perm``)."""
            if orders is not None:
                orders["it"] = orders.get("it", -1) + 1
                rebuild = orders["it"] % refresh == 0
            nk = torch.zeros(k, dtype=torch.float64, device="cuda")
            sx = torch.zeros(k, d, dtype=torch.float64, device="cuda")
            sq = torch.zeros_like(var, dtype=torch.float64)
            ll = 0.0
            params = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)   # once per iteration
            for i in range(0, n, chunk):
                if orders is not None:
                    st = kernels.estep(x[i:i + chunk], means, var, lw, precision=prec, params=params,
                                       copy_rows=not args.no_copy, order=orders.get(i), return_best=rebuild)
                    if rebuild:   # in place, as the estimator does: the order buffers keep their addresses
                        # (a CUDA graph of the cycle reads them)
                        orders[i] = kernels.row_order(st[4], perm, out=orders.get(i))
                elif transient:
                    st = kernels.estep(x[i:i + chunk], means, var, lw, precision=prec, params=params, sort_rows=True)
                else:
                    st = kernels.estep(x[i:i + chunk], means, var, lw, precision=prec, params=params,
                                       copy_rows=not args.no_copy)
                nk += st[1]
                sx += st[2]
                sq += st[3]
                ll = ll + st[0].sum(dtype=torch.float64)
            nk_c = nk.clamp_min(1e-10)
            new_means = sx / nk_c[:, None]
            shift = (new_means - means.double()) ** 2
            if var.ndim == 1:
                new_var = (sq / nk_c - shift.sum(1)) / d
            else:
                new_var = sq / nk_c[:, None] - shift
            new_var = new_var.clamp_min(1e-6)
            return torch.log(nk / n), new_means.float(), new_var.float(), ll

        for cov, var in (("spherical", var_sph), ("diag", var_diag)):
            gem = 3 if cov == "spherical" else 6
            ref = ref_stats(xe, means, var, lw, tb) if methods & {"ours_estep", "ours_em", "ours_estep_sorted",
                                                                   "ours_em_sorted", "ours_estep_transient",
                                                                   "ours_em_transient"} else None
            for prec in precisions:
                if "ours_estep" in methods:
                    if n <= chunk:
                        fn = lambda: kernels.estep(x, means, var, lw, precision=prec, x_absmax=bound)  # noqa: E731
                        err = rel_err(kernels.estep(xe, means, var, lw, precision=prec)[1:], ref)
                        ms = bench(fn, args.rep)
                        record(shape, "ours E-step", cov, prec, ms, gem, peak_extra(fn), err)
                        if args.breakdown:  # pass 1 alone (logZ), and the E-step without block skipping
                            params = kestep.prepare(means, var, lw, prec, bound)
                            fn1 = lambda: kestep.launch_logz(x, params, k, var.ndim == 2, prec)  # noqa: E731
                            record(shape, "  pass 1 (logZ)", cov, prec, bench(fn1, args.rep), gem // 3, None, None)
                            fn0 = lambda: kernels.estep(x, means, var, lw, precision=prec, x_absmax=bound,  # noqa: E731
                                                        skip_log2=0)
                            record(shape, "  E-step no skipping", cov, prec, bench(fn0, args.rep), gem, None, None)
                    else:
                        record(shape, "ours E-step", cov, prec, None, gem, None, None,
                               f"N > chunk: see EM iter ({chunk} rows per call)")
                if "ours_em" in methods:
                    fn = lambda: em_iter(var, prec)  # noqa: E731
                    ms = bench(fn, args.rep)
                    err = rel_err(kernels.estep(xe, means, var, lw, precision=prec)[1:], ref)
                    record(shape, "ours EM iter", cov, prec, ms, gem, peak_extra(fn), err)
                    if args.graphs:
                        record(shape, "ours EM iter graph", cov, prec, bench(graphed(fn), args.rep), gem, None, err,
                               "CUDA graph replay of the same iteration")
                if "ours_estep_sorted" in methods or "ours_em_sorted" in methods:
                    t0 = time.perf_counter()
                    perm = kernels.component_order(means)
                    torch.cuda.synchronize()
                    note = f"component order {1e3 * (time.perf_counter() - t0):.2f} ms once (first call)"
                    params_s = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm)
                    best_e = kernels.estep(xe, means, var, lw, precision=prec, params=params_s, return_best=True)[4]
                    err = rel_err(kernels.estep(xe, means, var, lw, precision=prec, params=params_s,
                                                order=kernels.row_order(best_e, perm))[1:], ref)
                if "ours_estep_sorted" in methods and n <= chunk:
                    best = kernels.estep(x, means, var, lw, precision=prec, params=params_s, return_best=True)[4]
                    order = kernels.row_order(best, perm)
                    fn = lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_s,  # noqa: E731
                                               order=order)
                    ms = bench(fn, args.rep)
                    record(shape, "ours E-step sorted", cov, prec, ms, gem, peak_extra(fn), err, note)
                    if args.breakdown:
                        lzp = torch.empty(n, device="cuda")
                        gaps = torch.empty(triton.cdiv(n, kestep.FLAG_ROWS), dtype=torch.int64, device="cuda")
                        fn1 = lambda: kestep.launch_logz(x, params_s, k, var.ndim == 2, prec,  # noqa: E731
                                                         order=order, lzp=lzp, gaps=gaps)
                        record(shape, "  pass 1 sorted", cov, prec, bench(fn1, args.rep), gem // 3, None, None)
                        nkb = triton.cdiv(k, kestep.FLAG_K)
                        kept = float(kestep._work_lists(gaps, nkb)[1].sum()) / (gaps.numel() * nkb)
                        fb = lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_s,  # noqa: E731
                                                   order=order, return_best=True)
                        record(shape, "  E-step sorted + best", cov, prec, bench(fb, args.rep), gem, None, None,
                               "with the argmax for the next order")
                        record(shape, "  pairs kept", cov, prec, None, 0, None, None,
                               f"{kept:.3f} of (64-row tile, 64-component block) pairs in pass 2")
                        fo = lambda: kernels.row_order(best, perm)  # noqa: E731
                        record(shape, "  row_order", "-", "-", bench(fo, args.rep), 0, None, None)
                if "ours_estep_transient" in methods or "ours_em_transient" in methods:
                    perm_t = kernels.component_order(means)
                    params_t = kernels.prepare(means, var, lw, prec, bound, comp_perm=perm_t)
                    err_t = rel_err(kernels.estep(xe, means, var, lw, precision=prec, params=params_t,
                                                  sort_rows=True)[1:], ref)
                    if "ours_estep_transient" in methods and n <= chunk:
                        fn = lambda: kernels.estep(x, means, var, lw, precision=prec, params=params_t,  # noqa: E731
                                                   sort_rows=True)
                        record(shape, "ours E-step transient", cov, prec, bench(fn, args.rep), gem, peak_extra(fn),
                               err_t, "rows sorted inside the call (sort_rows=True)")
                    if "ours_em_transient" in methods:
                        fn = lambda: em_iter(var, prec, perm=perm_t, transient=True)  # noqa: E731
                        record(shape, "ours EM iter transient", cov, prec, bench(fn, args.rep), gem, peak_extra(fn),
                               err_t, f"host issue time {host_ms(fn):.2f} ms per iteration")
                        if args.graphs:
                            record(shape, "ours EM iter transient graph", cov, prec, bench(graphed(fn), args.rep),
                                   gem, None, err_t, "CUDA graph replay of the same iteration")
                if "ours_em_sorted" in methods:
                    for refresh in (1, 4, 8):
                        orders = {}
                        em_iter(var, prec, orders, perm)          # the first order
                        # one timed call = one whole refresh cycle (the rebuilding iteration included), divided by
                        # its length: the amortised cost (a median over single iterations would hide the rebuilds)

                        def fn(refresh=refresh, orders=orders):
                            for _ in range(refresh):
                                em_iter(var, prec, orders, perm, refresh)
                        ms = bench(fn, args.rep * refresh) / refresh
                        host = host_ms(fn) / refresh
                        name = "ours EM iter sorted" + ("" if refresh == 1 else f"/{refresh}")
                        record(shape, name, cov, prec, ms, gem, peak_extra(fn), err,
                               f"row order rebuilt every {'' if refresh == 1 else f'{refresh}th '}iteration "
                               f"(mean over the cycle); host issue time {host:.2f} ms per iteration; {note}")
                        if args.graphs:   # the whole cycle as one graph (the benchmark's parameters do not move,
                            # so the order the captured rebuild reads is as good as a fresh one)
                            ms = bench(graphed(fn), args.rep * refresh) / refresh
                            record(shape, name + " graph", cov, prec, ms, gem, None, err,
                                   "CUDA graph replay of the same cycle (mean per iteration)")

        torch.backends.cuda.matmul.allow_tf32 = True

        def torch_chunked(fn_chunk):
            nk = sx = sq = 0
            for i in range(0, n, TORCH_CHUNK):
                st = fn_chunk(x[i:i + TORCH_CHUNK], means, var_sph, lw)
                nk, sx, sq = nk + st[1].double(), sx + st[2].double(), sq + st[3].double()
            return nk, sx, sq

        slow = n >= 50_000_000
        if "torch_chunked" in methods:
            fn = lambda: torch_chunked(tb.estep)  # noqa: E731
            ref = ref_stats(xe, means, var_sph, lw, tb)
            err = rel_err([sum(t) for t in zip(*[tb.estep(xe[i:i + TORCH_CHUNK], means, var_sph, lw)[1:]
                                                  for i in range(0, len(xe), TORCH_CHUNK)])], ref)
            ms = bench(fn, args.rep)
            record(shape, "torch chunked", "spherical", "tf32", ms, 3, peak_extra(fn), err)
        if "torch_compile" in methods and n <= 10_000_000:
            try:
                comp = torch.compile(tb.estep, dynamic=False)
                fn = lambda: torch_chunked(comp)  # noqa: E731
                ms = bench(fn, args.rep)
                record(shape, "torch.compile chunk", "spherical", "tf32", ms, 3, peak_extra(fn), None)
            except Exception as e:  # noqa: BLE001
                record(shape, "torch.compile chunk", "spherical", "tf32", None, 3, None, None,
                       f"failed: {type(e).__name__}")
        if "torch_material" in methods:
            need_m = 4 * n * k * 4 + need
            if need_m < 0.8 * torch.cuda.mem_get_info()[0]:
                fn = lambda: tb.estep(x, means, var_sph, lw)  # noqa: E731
                ms = bench(fn, args.rep)
                record(shape, "torch materialising", "spherical", "tf32", ms, 3, peak_extra(fn), None)
            else:
                record(shape, "torch materialising", "spherical", "tf32", None, 3, None, None,
                       f"skipped: needs ~{need_m / 2**30:.0f} GiB")
        if "torch_kmeans" in methods:
            def tk():
                cnt = sums = 0
                for i in range(0, n, TORCH_CHUNK):
                    _, _, c_, s_ = tb.kmeans_step(x[i:i + TORCH_CHUNK], means)
                    cnt, sums = cnt + c_, sums + s_
                return cnt, sums
            ms = bench(tk, args.rep)
            record(shape, "torch k-means", "-", "tf32", ms, 1, peak_extra(tk), None)
        if "ours_kmeans" in methods:
            def ok():
                cnt = sums = 0
                for i in range(0, n, chunk):
                    _, _, c_, s_ = kernels.kmeans_step(x[i:i + chunk], means, precision="tf32", x_absmax=bound)
                    cnt, sums = cnt + c_, sums + s_
                return cnt, sums
            ms = bench(ok, args.rep)
            record(shape, "ours k-means", "-", "tf32", ms, 1, peak_extra(ok), None,
                   f"host issue time {host_ms(ok):.2f} ms per step")
            if args.graphs:
                record(shape, "ours k-means graph", "-", "tf32", bench(graphed(ok), args.rep), 1, None, None,
                       "CUDA graph replay of the same step (the fit's warm start replays one)")
            if args.breakdown and n <= chunk:   # the assignment kernel alone (the rest is sort + segment sums)
                fa = lambda: kernels.assign_labels(x, means, precision="tf32", x_absmax=bound)  # noqa: E731
                record(shape, "  k-means assign", "-", "tf32", bench(fa, args.rep), 1, None, None)
        del x, xe
        torch.cuda.empty_cache()
        write_results()   # after every shape: a run cut short (a time limit) keeps the shapes it finished

    write_results()


if __name__ == "__main__":
    main()
