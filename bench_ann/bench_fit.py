"""End-to-end ``GaussianMixture.fit`` on one GPU: torch backend vs fused Triton backend.

Unlike ``bench_kernels.py`` (one E-step in isolation), this times the estimator users call: chunk streaming,
centring, float64 accumulation, M-step and re-seeding included. For each backend it reports the median seconds of
a k-means warm-start iteration and of an EM iteration, the peak GPU memory beyond X, and the final mean
log-likelihood (both backends start from the same k-means++ seeds, so the values should agree).

    python -m bench_ann.bench_fit --n 1000000 --k 1024 --d 128 --em-iter 20 --out bench_ann/results

The data are synthetic SIFT-like rows (``sift_like``: tight, well separated clusters, where the sparse E-step skips
most of the work) unless ``--data FILE`` names a vector file (``--normalize`` for angular sets), e.g. GloVe:

    python -m bench_ann.bench_fit --data glove_6B_50d.f32.npy --normalize --k 1024 --diag --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flashgmm_faiss import GaussianMixture
from flashgmm_faiss._triton_backend import TritonBackend
from flashgmm_faiss.io import read_vectors


GENERATE_ROWS = 1 << 24   # sift_like draws larger data sets in pieces of this many rows (no 2 n d temporaries)


def sift_like(n, d, k, seed=0, device="cuda"):
    """Uncentred clustered data in 0..255 (like SIFT), generated on the device: (n, d) float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.rand(k, d, generator=g, device=device) * 180 + 20
    scale = torch.rand(k, generator=g, device=device) * 15 + 5
    if n <= GENERATE_ROWS:   # one draw (the data of the earlier results)
        labels = torch.randint(0, k, (n,), generator=g, device=device)
        X = centers[labels] + torch.randn(n, d, generator=g, device=device) * scale[labels, None]
        return X.clamp_(0, 255)
    X = torch.empty((n, d), dtype=torch.float32, device=device)
    for s in range(0, n, GENERATE_ROWS):
        part = X[s:s + GENERATE_ROWS]
        labels = torch.randint(0, k, (part.shape[0],), generator=g, device=device)
        torch.randn(part.shape, generator=g, device=device, out=part)
        part.mul_(scale[labels, None]).add_(centers[labels]).clamp_(0, 255)
    return X


def interleaved_fits(x, k, cov, variants, rounds, em_iter=30, kmeans_iter=10, precision="tf32"):
    """Whole ``GaussianMixture`` fits of x (n, d) on the GPU (K=k, covariance ``cov``, ``precision``, tol 0,
    defaults otherwise) for A/B scripts: ``variants`` maps a name to a callable that switches that variant on. One
    warm-up fit per variant (compilation, autotuning), then ``rounds`` rounds of one fit per variant, interleaved.
    Returns {name: {"ms": [...], "kmeans_ms": [...], "log_likelihood": [...]}}: per fit the median ms per EM
    iteration over iterations 2..end, per k-means iteration over 2..end, and the final mean log-likelihood."""
    res = {name: {"ms": [], "kmeans_ms": [], "log_likelihood": []} for name in variants}
    for warm in (True, False):
        for _ in range(1 if warm else rounds):
            for name, use in variants.items():
                use()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = GaussianMixture(k, covariance_type=cov, kmeans_iter=1 if warm else kmeans_iter,
                                        max_iter=7 if warm else em_iter, tol=0.0, device="cuda", seed=0,
                                        precision=precision).fit(x)
                if not warm:
                    r = res[name]
                    r["ms"].append(1e3 * statistics.median(h["seconds"] for h in g.history_[1:]))
                    r["kmeans_ms"].append(1e3 * statistics.median(h["seconds"] for h in g.kmeans_history_[1:]))
                    r["log_likelihood"].append(g.history_[-1]["log_likelihood"])
    return res


def load_rows(path, n=None, normalize=False, device="cuda", piece=1 << 20):
    """The first ``n`` rows (all when None) of a vector file (any format ``flashgmm_faiss.io.read_vectors`` reads,
    any numeric dtype) as (n, d) float32 on the device, converted in pieces of ``piece`` rows; ``normalize``:
    unit rows, as an angular data set (GloVe) is indexed."""
    x = read_vectors(path, count=n, mmap=True)
    X = torch.empty(x.shape, dtype=torch.float32, device=device)
    for s in range(0, x.shape[0], piece):
        X[s:s + piece] = torch.from_numpy(np.array(x[s:s + piece], dtype=np.float32)).to(device)
    if normalize:
        X = torch.nn.functional.normalize(X, dim=1)
    return X


def problem_rows(args):
    """X (n, d) float32 on the GPU: the rows of --data, or the synthetic ``sift_like`` problem; sets args.n and
    args.d to X's shape and returns (X, a description of the data for the result tables)."""
    if args.data:
        X = load_rows(args.data, args.n, args.normalize)
        what = f"{Path(args.data).name}{' (rows normalised)' if args.normalize else ''}"
    else:
        X = sift_like(args.n or 1_000_000, args.d or 128, args.clusters, device="cuda")
        what = f"synthetic SIFT-like ({args.clusters} clusters)"
    args.n, args.d = X.shape
    return X, what


def pairs_kept(g, X, rows=1 << 22):
    """Fraction of the (64-row tile, 64-component block) pairs that the sparse pass 2 visits at the fitted state of
    the Triton-backend fit ``g``, on the first ``rows`` rows of X visited in the order of their most likely
    component (a kept row order; diag fits sort each chunk by its block bits instead, which keeps about as many):
    how much of the E-step's work the data lets the sparse E-step skip (counted by the E-step itself,
    ``pair_counts``)."""
    from flashgmm_faiss import kernels
    x = X[:rows]
    center = x.mean(0)
    means = torch.as_tensor(g.means_, device=x.device).float() - center
    var = torch.as_tensor(g.covariances_, device=x.device).float()
    lw = torch.log(torch.as_tensor(g.weights_, device=x.device).float())
    perm = kernels.component_order(means)
    params = kernels.prepare(means, var, lw, g.precision, float(kernels.absmax(x, center)), comp_perm=perm)
    best = kernels.estep(x, means, var, lw, precision=g.precision, center=center, params=params,
                         return_best=True)[4]
    pairs = torch.zeros(2, dtype=torch.int64, device=x.device)
    kernels.estep(x, means, var, lw, precision=g.precision, center=center, params=params,
                  order=kernels.row_order(best, perm), pair_counts=pairs)
    kept, total = pairs.tolist()
    return kept / total


def peak_breakdown(snapshot, top: int = 12):
    """What was live at the peak of a ``torch.cuda.memory._snapshot()`` taken with allocation history: replays
    the device's alloc / free events and returns ``{"peak_mib", "live": [{"mib", "where"}...]}``, the allocations
    live at the peak grouped by their innermost flashgmm_faiss / kernels / bench_ann frame, largest first."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    live, total, best, best_live = {}, 0, -1, {}
    for e in events:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e.get("action") in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, best_live = total, dict(live)

    def where(e):   # the innermost frame, then the innermost three of this repository
        frames = e.get("frames", [])
        ours = [f for f in frames if any(m in f.get("filename", "") for m in ("flashgmm_faiss", "bench_ann"))]
        return " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
                          for f in frames[:1] + [f for f in ours[:3] if f is not frames[0]]) or "?"
    groups = {}
    for e in best_live.values():
        groups[where(e)] = groups.get(where(e), 0) + e["size"]
    live = sorted(({"mib": v / 2**20, "where": k} for k, v in groups.items()), key=lambda r: -r["mib"])
    return {"peak_mib": max(best, 0) / 2**20, "live": live[:top]}


def config_label(backend, cov, prec, sparse, graphs):
    """'torch' or '<cov>-<precision>-<dense|sparse>[-graphs]' (the --configs names)."""
    if backend == "torch":
        return "torch"
    return f"{cov}-{prec}-{'sparse' if sparse else 'dense'}" + ("-graphs" if graphs else "")


def run(args):
    dev = torch.cuda.get_device_name(0)
    X, data = problem_rows(args)
    x_bytes = X.numel() * 4
    if args.host_data:   # a numpy array, as most users pass it: streamed, or copied once (--data-on-device)
        X = X.cpu().numpy()
    on_device = {"auto": "auto", "true": True, "false": False}[args.data_on_device]
    rows = []
    # (backend, covariance type, precision, sparse E-step, CUDA graphs): the Triton rows run with and without
    # row orders, and launched eagerly or replayed as CUDA graphs
    configs = [("torch", "spherical", "tf32", False, False)]
    for prec in ("tf32", "bf16"):
        configs += [("triton", "spherical", prec, sparse, graphs)
                    for sparse in (False, True) for graphs in (False, True)]
    if args.diag:
        configs += [("triton", "diag", prec, sparse, graphs) for prec in ("tf32", "bf16")
                    for sparse in (False, True) for graphs in (False, True)]
    if args.configs:   # e.g. "torch,spherical-tf32-sparse-graphs": labels as printed by --list-configs
        want = set(args.configs.split(","))
        configs = [c for c in configs if config_label(*c) in want]
    lookaheads = {"auto": ["auto"], "ab": [False, True]}[args.lookahead]
    configs = [c + (look,) for c in configs for look in lookaheads]
    # --skip-log2: each sparse configuration once per threshold of the sparse pass 2 (kernels' SKIP_LOG2)
    skips = [float(v) for v in args.skip_log2.split(",")] if args.skip_log2 else [None]
    configs = [c + (t,) for c in configs for t in (skips if c[3] else [None])]
    # --sort-key: each sparse configuration once per transient-order key (kernels.estep.TRANSIENT_SORT_KEY)
    sort_keys = args.sort_key.split(",") if args.sort_key else [None]
    configs = [c + (sk,) for c in configs for sk in (sort_keys if c[3] else [None])]
    # --chunk: each configuration once per chunk size (None: the estimator's plan)
    chunks = [None if v.strip().lower() in ("none", "plan") else int(float(v)) for v in str(args.chunk).split(",")]
    configs = [c + (ch,) for c in configs for ch in chunks]
    # --row-orders: each sparse configuration with kept row orders (where the plan has room) and with transient
    # ones only (every chunk sorts its rows inside each E-step, as at N=1e8 in 64 MiB): TritonBackend.kept_orders
    row_orders = args.row_orders.split(",") if args.row_orders else [None]
    configs = [c + (ro,) for c in configs for ro in (row_orders if c[3] else [None])]
    # --dense-above: each sparse configuration once per dense-fallback threshold (TritonBackend.dense_above)
    fallbacks = args.dense_above.split(",") if args.dense_above else [None]
    configs = [c + (fb,) for c in configs for fb in (fallbacks if c[3] else [None])]
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep") if skips != [None] or args.sort_key else None
    if args.no_gluon_pass1:   # as on GPUs other than Hopper: every pass 1 runs the Triton kernel
        importlib.import_module("flashgmm_faiss.kernels.estep").GLUON_PASS1 = False
    default_skips = dict(kestep.SKIP_LOG2) if kestep else None
    default_key = kestep.TRANSIENT_SORT_KEY if kestep else None
    default_order_key = TritonBackend.order_key
    default_kept = TritonBackend.kept_orders
    default_dense_above = dict(TritonBackend.dense_above)
    for backend, cov, prec, sparse, graphs, look, skip, sort_key, chunk, orders, fallback in configs:
        TritonBackend.kept_orders = {None: default_kept, "kept": ("spherical", "diag"), "transient": ()}[orders]
        TritonBackend.dense_above = (default_dense_above if fallback in (None, "default") else {} if fallback == "none"
                                     else dict.fromkeys(("spherical", "diag"), float(fallback)))
        if kestep:     # the module, not the estep() the package exports
            kestep.SKIP_LOG2 = default_skips if skip is None else dict.fromkeys(default_skips, skip)
            kestep.TRANSIENT_SORT_KEY = sort_key or default_key
            TritonBackend.order_key = sort_key or default_order_key      # kept orders: the same key
        if backend == "torch":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        with warnings.catch_warnings():   # warm-up on X: compilation, autotuning, integer specialisations
            warnings.simplefilter("ignore")
            # max_iter: past the first rebuild of the row orders, so that every kernel variant the timed fit
            # launches (sparse E-step, with and without the argmax for the next order) is compiled and autotuned
            w = GaussianMixture(args.k, covariance_type=cov, kmeans_iter=1, max_iter=7, backend=backend,
                                device="cuda", precision=prec, seed=0, chunk_size=chunk, sparse_estep=sparse,
                                cuda_graphs=graphs, data_on_device=on_device, working_memory=args.working_memory)
            w._lookahead = look
            w.fit(X[:args.warmup_rows] if args.warmup_rows else X)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()      # the warm-up's cached blocks: the reserved peak below is this fit's
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        base_reserved = torch.cuda.memory_reserved()
        if args.memory_trace:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(args.k, covariance_type=cov, kmeans_iter=args.kmeans_iter, max_iter=args.em_iter,
                                tol=0.0, backend=backend, device="cuda", precision=prec, seed=0,
                                chunk_size=chunk, sparse_estep=sparse, cuda_graphs=graphs,
                                data_on_device=on_device, working_memory=args.working_memory)
            g._lookahead = look
            g.fit(X)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        peak_reserved = torch.cuda.max_memory_reserved() - base_reserved
        plan = g._plan(X, args.n, torch.device("cuda"), args.d)
        trace = None
        if args.memory_trace:
            trace = peak_breakdown(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
            print("live at the fit's peak:", json.dumps(trace, indent=1), flush=True)
        assign_ms = {}
        if backend == "triton" and cov == "spherical" and prec == "tf32" and not sparse and not graphs:
            for cap in (2, None):  # fused top-M kernel for a copy cap; torch fallback when uncapped
                g.assign(X[:65536], max_assign=cap)  # warm-up / compile
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                g.assign(X, max_assign=cap)
                torch.cuda.synchronize()
                assign_ms[str(cap)] = 1e3 * (time.perf_counter() - t1)
        kept = pairs_kept(g, X) if backend == "triton" and sparse and not args.host_data else None
        em = [h["seconds"] for h in g.history_[1:]]  # the first iteration includes compilation
        km = [h["seconds"] for h in g.kmeans_history_[1:]]
        rows.append({"backend": backend, "covariance_type": cov, "precision": prec, "sparse_estep": sparse,
                     "cuda_graphs": graphs, "lookahead": look, "skip_log2": skip, "sort_key": sort_key,
                     "row_orders": orders, "pairs_kept": kept, "dense_above": fallback,
                     "probe_pairs_kept": getattr(g._impl, "pairs_kept", None),
                     "graph_replays": getattr(g, "graph_replays_", 0),
                     "data": data, "n": args.n, "K": args.k, "d": args.d,
                     "em_iter_ms": 1e3 * statistics.median(em),
                     # the mean includes the iterations that rebuild the row orders (sparse E-step)
                     "em_iter_mean_ms": 1e3 * statistics.fmean(em),
                     "em_iter_ms_each": [1e3 * h["seconds"] for h in g.history_],
                     "order_stats": dict(getattr(g._impl, "order_stats", {})),
                     "kmeans_iter_ms": 1e3 * statistics.median(km) if km else None,
                     "fit_seconds": total,
                     # validation pass, k-means++ seeding, the k-means variances: the fit outside its iterations
                     "other_seconds": total - sum(h["seconds"] for h in g.history_)
                     - sum(h["seconds"] for h in g.kmeans_history_), "peak_extra_mib": peak / 2**20,
                     "peak_extra_reserved_mib": peak_reserved / 2**20, "x_mib": x_bytes / 2**20,
                     "working_memory_mib": args.working_memory, "copy_rows": plan.copy_rows,
                     "order_bytes": plan.order_bytes, "peak_breakdown": trace,
                     "final_log_likelihood": g.lower_bound_, "chunk_size": chunk,
                     "chunk_rows_used": plan.rows,
                     "assign_ms_by_cap": assign_ms, "host_data": bool(args.host_data),
                     "data_on_device": args.data_on_device})
        print(rows[-1], flush=True)
    # speed-up against the torch fit of the same covariance type, where the run has one
    refs = {}
    for r in rows:
        if r["backend"] == "torch":
            refs.setdefault(r["covariance_type"], r["em_iter_mean_ms"])
    where = f"in host memory (numpy), data_on_device={args.data_on_device}" if args.host_data else "in GPU memory"
    lines = [f"# End-to-end GaussianMixture.fit on {dev}", "",
             f"Data: {data}. N={args.n}, K={args.k}, D={args.d}, {args.kmeans_iter} k-means + {args.em_iter} "
             "EM iterations, "
             f"data {where}, torch {torch.__version__}. Each fit follows a warm-up fit (compilation, "
             "autotuning); iteration times are medians over iterations 2..end; 'other s' is the fit's time outside "
             "its iterations (validation pass, k-means++ seeding, k-means variances). Peak extra: the fit's "
             "largest allocation beyond what was allocated before it (X), and (reserved) the allocator's cache "
             f"beyond it; working_memory={args.working_memory} MiB.", "",
             "| backend | cov | precision | E-step | CUDA graphs (replays) | lookahead | EM iter ms (median) | mean | "
             "speed-up vs torch (mean) | k-means iter ms | other s | fit s | peak extra MiB (reserved) | chunk rows "
             "(row copy) | pairs kept | final log-lik |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = "-" if r["backend"] == "torch" else ("sparse" if r["sparse_estep"] else "dense")
        if r["skip_log2"] is not None:
            kind += f" (2^-{r['skip_log2']:g})"
        if r["sort_key"] is not None:
            kind += f", sorted by {r['sort_key']}"
        if r["row_orders"] is not None:
            kind += f", {r['row_orders']} row orders"
        if r["dense_above"] is not None:
            probe = r["probe_pairs_kept"]
            kind += (f", dense above {r['dense_above']} (last probe kept "
                     + ("-" if probe is None else f"{100 * probe:.1f} %")
                     + (f", {r['order_stats'].get('fallback_chunks', 0)} dense chunks)"))
        graphs = f"yes ({r['graph_replays']})" if r["cuda_graphs"] else "no"
        ref = refs.get(r["covariance_type"])
        speedup = f"{ref / r['em_iter_mean_ms']:.1f}x" if ref else "-"
        lines.append(f"| {r['backend']} | {r['covariance_type']} | {r['precision']} | {kind} | {graphs} | "
                     f"{r['lookahead']} | "
                     f"{r['em_iter_ms']:.2f} | "
                     f"{r['em_iter_mean_ms']:.2f} | {speedup} | {r['kmeans_iter_ms']:.2f} | "
                     f"{r['other_seconds']:.2f} | "
                     f"{r['fit_seconds']:.2f} | {r['peak_extra_mib']:.1f} ({r['peak_extra_reserved_mib']:.0f}) | "
                     f"{r['chunk_rows_used']} ({'yes' if r['copy_rows'] else 'no'}) | "
                     + ("-" if r["pairs_kept"] is None else f"{100 * r['pairs_kept']:.1f} %")
                     + f" | {r['final_log_likelihood']:.5f} |")
    for r in rows:
        for cap, ms in r["assign_ms_by_cap"].items():
            lines.append(f"\nassign() over all N rows (triton tf32, max_assign={cap}): {ms:.1f} ms "
                         "(includes the CSR copy to host memory)")
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # K and D enter the name when they are not the defaults (1024, 128), so runs at several shapes keep their files
    stem = (f"fit_{dev.replace(' ', '_').lower()}" + (f"_{Path(args.data).stem}" if args.data else "")
            + f"_n{args.n}"
            + ("" if (args.k, args.d) == (1024, 128) else f"_k{args.k}_d{args.d}")
            + (f"_wm{args.working_memory:g}" if args.working_memory else ""))
    meta = {"device": dev, "torch": torch.__version__, "data": data, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python -m bench_ann.bench_fit " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                    for k, v in vars(args).items()),
            "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    (out / f"{stem}.md").write_text(md + f"\n\nCommand: `{meta['command']}`, {meta['date']}.\n")


def add_problem_args(p: argparse.ArgumentParser):
    """The problem (shared with profile_fit): the rows of --data, or N synthetic rows of D features in --clusters
    clusters; K components."""
    p.add_argument("--n", type=lambda v: int(float(v)), default=None,
                   help="rows (synthetic data: default 1e6; --data: the file's first N rows, default all)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--d", type=int, default=None, help="features of the synthetic data (default 128)")
    p.add_argument("--clusters", type=int, default=2000, help="clusters in the synthetic data")
    p.add_argument("--data", default=None,
                   help="a vector file (.npy, .fvecs, .bvecs, .fbin, .u8bin, .hdf5 ...) to fit instead of the "
                        "synthetic data, e.g. ../shared/data/glove-6b-50d/glove_6B_50d.f32.npy")
    p.add_argument("--normalize", action="store_true", help="unit rows (angular data sets such as GloVe)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(p)
    p.add_argument("--kmeans-iter", type=int, default=5)
    p.add_argument("--em-iter", type=int, default=10)
    p.add_argument("--chunk", default="None",
                   help="rows per chunk (GaussianMixture(chunk_size=...)); a comma list runs each configuration once "
                        "per value, 'None' being the estimator's plan, e.g. None,262144")
    p.add_argument("--diag", action="store_true")
    p.add_argument("--host-data", action="store_true", help="pass X as a numpy array (host memory)")
    p.add_argument("--data-on-device", default="auto", choices=("auto", "true", "false"),
                   help="GaussianMixture(data_on_device=...) for host data")
    p.add_argument("--configs", default=None,
                   help="comma list of configurations to run (default all): 'torch' or "
                        "'<cov>-<precision>-<dense|sparse>[-graphs]', e.g. spherical-bf16-sparse-graphs")
    p.add_argument("--working-memory", type=float, default=None,
                   help="GaussianMixture(working_memory=...) in MiB: bound of the fit's device memory beyond X")
    p.add_argument("--warmup-rows", type=int, default=None,
                   help="rows of X the warm-up fit uses (default all; kernels autotune on K, D and dtype, not N)")
    p.add_argument("--memory-trace", action="store_true",
                   help="record the timed fit's allocations and report what is live at its peak (slower)")
    p.add_argument("--skip-log2", default=None,
                   help="comma list of sparse pass-2 thresholds (default kernels.estep.SKIP_LOG2, per precision): "
                        "each sparse configuration runs once per value, for every precision")
    p.add_argument("--sort-key", default=None,
                   help="comma list of row-order keys ('bits', 'argmax'; kernels.estep.TRANSIENT_SORT_KEY for "
                        "transient orders, TritonBackend.order_key for kept ones): each sparse configuration runs "
                        "once per key")
    p.add_argument("--row-orders", default=None,
                   help="comma list of kept,transient: each sparse configuration with kept row orders (where the "
                        "memory plan has room) and/or with transient orders only (every E-step sorts its chunk); "
                        "default: TritonBackend.kept_orders (spherical kept, diag transient)")
    p.add_argument("--dense-above", default=None,
                   help="comma list of dense-fallback thresholds (TritonBackend.dense_above, for both covariance "
                        "types): a number, 'none' (never fall back) or 'default'; each sparse configuration runs "
                        "once per value")
    p.add_argument("--no-gluon-pass1", action="store_true",
                   help="run every pass 1 as the Triton kernel (kernels.estep.GLUON_PASS1 = False), as on GPUs "
                        "other than Hopper")
    p.add_argument("--lookahead", default="auto", choices=("auto", "ab"),
                   help="auto: the estimator's default (on for CUDA); ab: each configuration without, then with "
                        "lookahead (the next iteration issued before the host reads the last one's summary)")
    p.add_argument("--out", default="bench_ann/results")
    run(p.parse_args())


if __name__ == "__main__":
    main()
