"""Recall@10 against distance computations (DCO) for k-means IVF, GMM-IVF and spilling baselines.

One command per data set::

    python -m bench_ann.sweep --dataset glove-6b-50d --K 1024 --seeds 0 1 2

Every method is a ``faiss.IndexIVFFlat`` over an ``IndexFlatL2`` quantizer holding its centroids (k-means
centroids or GMM means), filled with :func:`flashgmm_faiss.ivf.add_preassigned` from a CSR assignment, and
measured by the same :func:`flashgmm_faiss.evaluation.sweep` (deduplicated search; scan DCO counts every copy,
total DCO adds the ``K`` routing distances). Angular data are unit-normalised and searched in L2.

Build-time choices, identical for every method of a seed:

* training sample: at most ``max_points_per_centroid * K`` rows (FAISS's rule, 256 by default) of the learn set
  when the data set has one (SIFT1M), else of the base, drawn without replacement with
  ``numpy.random.default_rng(seed)``;
* ``kmeans``: ``faiss.Kmeans(niter=kmeans_niter)`` (default 100: the same number of passes as the GMM's
  10 k-means + 90 EM iterations) -- its centroids also serve every k-means-based rule (SOAR, naive spilling,
  kmeans-tau, km-resp-spill);
* ``gmm``: ``GaussianMixture(K, kmeans_iter=10, max_iter=90)`` (spherical, tol 1e-4: the paper's recipe); its fit
  is shared by ``gmm-single``, ``gmm-tau``, ``gmm-tau-cap2``, ``gmm-resp-spill@*`` and ``soar-gmm@*``.
  ``gmm-warm-em`` (the paper's 10 + 90 recipe) is exactly this fit with tau = 1/K, i.e. ``gmm-tau``: it is
  recorded as an alias, not measured twice;
* ``gmm-nowarm``: ``GaussianMixture(K, kmeans_iter=0, max_iter=100, init="k-means++")``.

Budgeted (``@TARGET``) methods spend the same index size as TARGET: ``@gmm-tau`` / ``@gmm-tau-cap2`` take the
inflation measured for that method on the same seed, ``@1.6`` is a fixed budget. None of this looks at queries.

Query-time: nprobe in 1, 2, 3, 4, 6, 8, 12, ... (powers of two and their 1.5x midpoints, ``--grid pow2`` for powers
of two only) up to K, stopping after the first nprobe with recall@10 >= ``--stop-recall`` (0.999).

Outputs, in ``--out`` (default ``bench_ann/results``): ``raw/<dataset>_K<K>_seed<s>.json`` per seed (merged
method by method when rerun), then :mod:`bench_ann.summarize` writes ``<dataset>_K<K>.json/.csv/.md`` and
:mod:`bench_ann.plot` the ``.png`` plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from data_scripts.prepare import read_idx_images
from flashgmm_faiss.evaluation import sweep as eval_sweep
from flashgmm_faiss.io import read_vectors
from flashgmm_faiss.ivf import add_preassigned, normalize_rows
from flashgmm_faiss.spilling import (
    csr_stats,
    fit_spherical_variance,
    nearest_assign,
    responsibility_spill_assign,
    second_nearest_assign,
    second_responsibility,
    soar_l2_assign,
    tau_assign_spherical,
)

SHARED_DATA = Path(os.environ.get("FLASHGMM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_K = {"siftsmall": 64, "bigann10k": 64, "mnist": 256, "glove-6b-50d": 1024, "sift1m": 1024,
             "glove-100": 1024, "deep10m": 4096}

# name -> (centroids, rule, params). Rules: see build_assignment.
METHODS = {
    "kmeans": ("kmeans", "nearest", {}),
    "gmm-single": ("gmm", "gmm-assign", {"max_assign": 1}),
    "gmm-tau": ("gmm", "gmm-assign", {}),
    "gmm-tau-cap2": ("gmm", "gmm-assign", {"max_assign": 2}),
    "soar-l2": ("kmeans", "soar", {"lam": 0.75, "n_candidates": 10}),
    "naive-spill@gmm-tau": ("kmeans", "naive", {"budget": "gmm-tau"}),
    "naive-spill@gmm-tau-cap2": ("kmeans", "naive", {"budget": "gmm-tau-cap2"}),
    "soar-l2@gmm-tau-cap2": ("kmeans", "soar", {"lam": 0.75, "n_candidates": 10, "budget": "gmm-tau-cap2"}),
    "gmm-resp-spill@gmm-tau-cap2": ("gmm", "resp-spill", {"budget": "gmm-tau-cap2"}),
    "soar-l2@1.6": ("kmeans", "soar", {"lam": 0.75, "n_candidates": 10, "budget": 1.6}),
    "naive-spill@1.6": ("kmeans", "naive", {"budget": 1.6}),
    "gmm-resp-spill@1.6": ("gmm", "resp-spill", {"budget": 1.6}),
    "km-resp-spill@1.6": ("kmeans", "resp-spill", {"budget": 1.6}),
    "soar-gmm@1.6": ("gmm", "soar", {"lam": 0.75, "n_candidates": 10, "budget": 1.6}),
    "soar-gmm": ("gmm", "soar", {"lam": 0.75, "n_candidates": 10}),
    "soar-resp@1.6": ("kmeans", "soar", {"lam": 0.75, "n_candidates": 10, "budget": 1.6, "priority": "resp"}),
    "kmeans-tau": ("kmeans", "tau-spherical", {}),
    "gmm-nowarm-tau": ("gmm-nowarm", "gmm-assign", {}),
    "gmm-nowarm-single": ("gmm-nowarm", "gmm-assign", {"max_assign": 1}),
}
ALIASES = {"gmm-warm-em": "gmm-tau"}
# gmm-resp-spill@gmm-tau-cap2 is gmm-tau-cap2 by construction (the rows whose 2nd responsibility exceeds 1/K are
# exactly the rows with the largest 2nd responsibilities, as many as gmm-tau-cap2 spills): not run by default.
DEFAULT_METHODS = [m for m in METHODS if m != "gmm-resp-spill@gmm-tau-cap2"]


# ---------------------------------------------------------------------------------------------- data
def _exact_gt(xb, xq, k=100):
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)[1].astype(np.int64)


def load_local(name: str, root: Path = SHARED_DATA) -> dict:
    """Fallback loader for the local real sets in ``../shared/data`` (used when no ``NAME.hdf5`` exists).
    Same splits as ``data_scripts.prepare``: returns dict(xb, xq, gt, metric, source)."""
    root = Path(root)
    if name == "siftsmall":
        xb = np.load(root / "siftsmall/siftsmall_base.u8.npy").astype(np.float32)
        xq = read_vectors(root / "siftsmall/siftsmall_query.fvecs", mmap=False)
        gt = read_vectors(root / "siftsmall/siftsmall_groundtruth.ivecs", mmap=False).astype(np.int64)
        return dict(xb=xb, xq=xq, gt=gt, metric="l2", source=str(root / "siftsmall"))
    if name == "bigann10k":
        xb = np.load(root / "bigann10k/bigann10k_base.u8.npy").astype(np.float32)
        xq = np.load(root / "bigann10k/bigann10k_query.u8.npy").astype(np.float32)
        gt = np.load(root / "bigann10k/bigann10k_groundtruth.i32.npy").astype(np.int64)
        return dict(xb=xb, xq=xq, gt=gt, metric="l2", source=str(root / "bigann10k"))
    if name == "mnist":
        xb = read_idx_images(root / "mnist/train-images-idx3-ubyte.gz").astype(np.float32)
        xq = read_idx_images(root / "mnist/t10k-images-idx3-ubyte.gz").astype(np.float32)
        return dict(xb=xb, xq=xq, gt=_exact_gt(xb, xq), metric="l2", source=str(root / "mnist"))
    if name == "glove-6b-50d":
        x = np.load(root / "glove-6b-50d/glove_6B_50d.f32.npy")
        perm = np.random.default_rng(0).permutation(x.shape[0])
        xb, xq = x[np.sort(perm[10_000:])], x[np.sort(perm[:10_000])]
        xb, xq = _unit(xb), _unit(xq)
        return dict(xb=xb, xq=xq, gt=_exact_gt(xb, xq), metric="angular", source=str(root / "glove-6b-50d"))
    raise FileNotFoundError(f"no local fallback for {name!r}: create data/{name}.hdf5 with "
                            f"python -m data_scripts.prepare --dataset {name} --out data")


def _unit(x):
    return normalize_rows(np.asarray(x, dtype=np.float32))


def load_data(name: str, data_dir=None) -> dict:
    """``NAME.hdf5`` through :func:`flashgmm_faiss.io.load_dataset` when it exists (path, ``--data-dir``,
    ``$FLASHGMM_DATA`` or ``./data``), otherwise the local fallback. Angular data come back unit-normalised."""
    try:
        from flashgmm_faiss.io import load_dataset

        ds = load_dataset(name, data_dir=data_dir)
    except (ImportError, FileNotFoundError):
        return load_local(name)
    xb = np.ascontiguousarray(ds.get_database(), dtype=np.float32)
    xq = ds.get_queries()
    gt = ds.get_groundtruth()
    xt = None if ds.xt is None else np.ascontiguousarray(ds.xt, dtype=np.float32)  # e.g. SIFT1M's learn set
    if ds.metric == "angular":
        xb, xq = _unit(xb), _unit(xq)
        xt = None if xt is None else _unit(xt)
    return dict(xb=xb, xq=xq, gt=gt, xt=xt, metric=ds.metric, source=str(ds.path))


# ---------------------------------------------------------------------------------------------- fits
def _cache_path(cache_dir, dataset, K, seed, what, sig):
    return Path(cache_dir) / f"{dataset}_K{K}_seed{seed}_{what}_{sig}.npz"


def fit_centroids(what: str, xt, K: int, seed: int, args, dataset: str) -> dict:
    """Fit (or load from the cache) one set of centroids. Returns dict with centroids and, for GMMs, the mixture
    parameters, plus fit_seconds and fit facts (iterations, convergence)."""
    if what == "kmeans":
        sig = f"n{xt.shape[0]}_it{args.kmeans_niter}"
    elif what == "gmm":
        sig = f"n{xt.shape[0]}_km{args.gmm_kmeans_iter}_em{args.gmm_em_iter}" + ("" if args.device == "cpu" else
                                                                                 f"_{args.device}")
    else:
        sig = f"n{xt.shape[0]}_km0_em{args.gmm_kmeans_iter + args.gmm_em_iter}" + ("" if args.device == "cpu" else
                                                                                   f"_{args.device}")
    path = _cache_path(args.cache, dataset, K, seed, what, sig) if args.cache else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if k != "info"}
            out.update(json.loads(str(z["info"])))
        out["from_cache"] = str(path)
        _log(f"  [{what}] loaded from {path} (fit took {out['fit_seconds']:.1f}s)")
        return out
    t0 = time.perf_counter()
    if what == "kmeans":
        km = faiss.Kmeans(xt.shape[1], K, niter=args.kmeans_niter, seed=seed, max_points_per_centroid=10 ** 9,
                          verbose=False)
        km.train(xt)
        out = {"centroids": km.centroids.copy(), "iterations": args.kmeans_niter,
               "objective": float(km.obj[-1]) / xt.shape[0]}
    else:
        from flashgmm_faiss.gmm import GaussianMixture

        warm = what == "gmm"
        g = GaussianMixture(K, covariance_type="spherical", kmeans_iter=args.gmm_kmeans_iter if warm else 0,
                            max_iter=args.gmm_em_iter if warm else args.gmm_kmeans_iter + args.gmm_em_iter,
                            init="k-means++", seed=seed, device=args.device,
                            backend="torch" if args.device == "cpu" else "auto", verbose=1)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g.fit(xt)
        out = {"centroids": g.means_, "covariances": g.covariances_, "weights": g.weights_,
               "center": g.center_, "em_iterations": int(g.n_iter_), "converged": bool(g.converged_),
               "kmeans_iterations": g.kmeans_iter, "log_likelihood": float(g.lower_bound_)}
    out["fit_seconds"] = time.perf_counter() - t0
    _log(f"  [{what}] fitted in {out['fit_seconds']:.1f}s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
        info = {k: v for k, v in out.items() if not isinstance(v, np.ndarray)}
        np.savez(path, info=np.array(json.dumps(info)), **arrays)
    return out


def _gmm_from(fit: dict):
    from flashgmm_faiss.gmm import GaussianMixture

    K, d = fit["centroids"].shape
    g = GaussianMixture(K, covariance_type="spherical", device="cpu", backend="torch")
    g.means_ = np.asarray(fit["centroids"], dtype=np.float32)
    g.covariances_ = np.asarray(fit["covariances"], dtype=np.float32)
    g.weights_ = np.asarray(fit["weights"], dtype=np.float32)
    g.center_ = np.asarray(fit["center"], dtype=np.float64)
    g.n_features_in_ = d
    return g


# ---------------------------------------------------------------------------------------------- methods
def build_assignment(name: str, fit: dict, xb, xt, inflations: dict):
    """CSR assignment of method ``name`` given its centroid fit. ``inflations`` holds the inflation already
    measured for other methods of the same seed (for budgets)."""
    _, rule, params = METHODS[name]
    params = dict(params)
    budget = params.pop("budget", None)
    if isinstance(budget, str):
        if budget not in inflations:
            raise ValueError(f"{name} needs the inflation of {budget}: run {budget} in the same invocation or "
                             "before (it is read from the per-seed results).")
        budget = inflations[budget]
    c = fit["centroids"]
    info = {"budget_inflation": budget}
    if rule == "nearest":
        off, li = nearest_assign(xb, c)
    elif rule == "gmm-assign":
        off, li, _ = _gmm_from(fit).assign(xb, tau=params.get("tau"), max_assign=params.get("max_assign"))
        info["tau"] = params.get("tau") or 1.0 / c.shape[0]
    elif rule == "soar":
        mi = None if budget is None else min(float(budget), 2.0)
        prio = None
        if params.get("priority") == "resp":  # spill the SOAR candidates with the most ambiguous membership first
            var, w = (fit["covariances"], fit["weights"]) if "covariances" in fit else fit_spherical_variance(xt, c)
            prio = -second_responsibility(xb, c, var, w)
        off, li = soar_l2_assign(xb, c, lam=params["lam"], n_candidates=params["n_candidates"], max_inflation=mi,
                                 priority=prio)
        info.update(lam=params["lam"], n_candidates=params["n_candidates"])
    elif rule == "naive":
        stats = inflations.get("_max_copies_" + str(METHODS[name][2]["budget"]), 2)
        max_copies = max(2, int(np.ceil(budget)), int(stats))
        off, li = second_nearest_assign(xb, c, budget, max_copies=min(max_copies, c.shape[0]))
        info["max_copies_allowed"] = max_copies
    elif rule == "resp-spill":
        if "covariances" in fit:
            var, w = fit["covariances"], fit["weights"]
        else:
            var, w = fit_spherical_variance(xt, c)
        off, li = responsibility_spill_assign(xb, c, var, min(float(budget), 2.0), weights=w)
    elif rule == "tau-spherical":
        var, w = fit_spherical_variance(xt, c)
        off, li = tau_assign_spherical(xb, c, var, weights=w)
        info["tau"] = 1.0 / c.shape[0]
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return off, li, info


def make_index(centroids, xb, offsets, lists):
    K, d = centroids.shape
    q = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(q, d, K, faiss.METRIC_L2)
    index.own_fields = True
    q.this.disown()
    q.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.is_trained = True
    add_preassigned(index, xb, offsets, lists)
    return index


def nprobe_grid(K: int, grid: str):
    out, p = set(), 1
    while p < K:
        out.add(p)
        if grid == "half" and p >= 2:
            out.add(p * 3 // 2)
        p *= 2
    out.add(K)
    return sorted(x for x in out if x <= K)


def run_sweep(index, xq, gt, K, args):
    rows = []
    for p in nprobe_grid(K, args.grid):
        rows += eval_sweep(index, xq, gt, k=10, nprobes=[p])
        r = rows[-1]
        _log(f"    nprobe={p:5d} recall@10={r['recall_at_10']:.4f} scanDCO/q={r['dco_scan_per_query']:.0f} "
             f"qps={r['qps']:.0f}")
        if r["recall_at_10"] >= args.stop_recall:
            break
    return rows


# ---------------------------------------------------------------------------------------------- bookkeeping
def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    vers = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
            "torch": torch.__version__}
    try:
        from importlib.metadata import version

        vers["flashgmm-faiss"] = version("flashgmm-faiss")
    except Exception:
        pass
    try:
        import subprocess

        vers["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        pass
    return {"device": f"CPU: {cpu}", "cpu_count": os.cpu_count(), "threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(), "versions": vers,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _raw_path(out: Path, dataset: str, K: int, seed: int) -> Path:
    return out / "raw" / f"{dataset}_K{K}_seed{seed}.json"


def run_seed(data: dict, dataset: str, K: int, seed: int, methods: list[str], args) -> dict:
    out = Path(args.out)
    path = _raw_path(out, dataset, K, seed)
    record = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    xb, xq, gt = data["xb"], data["xq"], data["gt"]
    nb = xb.shape[0]
    pool = data.get("xt") if data.get("xt") is not None else xb  # a dedicated learn set when there is one
    n_train = min(pool.shape[0], args.max_points_per_centroid * K)
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(pool.shape[0], n_train, replace=False)) if n_train < pool.shape[0] else \
        np.arange(pool.shape[0])
    xt = np.ascontiguousarray(pool[train_ids])
    record.update({"dataset": dataset, "K": K, "seed": seed, "metric": data["metric"], "source": data["source"],
                   "nb": nb, "d": int(xb.shape[1]), "nq": int(xq.shape[0]), "n_train": int(n_train),
                   "train_pool": "learn set" if pool is not xb else "base",
                   "settings": {k: v for k, v in vars(args).items() if k not in ("seeds", "methods")}})
    fits = {}
    inflations = {m: r["inflation"] for m, r in record["runs"].items()}
    inflations.update({"_max_copies_" + m: r["max_copies"] for m, r in record["runs"].items()})
    for name in methods:
        what = METHODS[name][0]
        _log(f"[{dataset} K={K} seed={seed}] {name}")
        if what not in fits:
            fits[what] = fit_centroids(what, xt, K, seed, args, dataset)
        fit = fits[what]
        t0 = time.perf_counter()
        off, li, info = build_assignment(name, fit, xb, xt, inflations)
        t_assign = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = make_index(fit["centroids"], xb, off, li)
        t_add = time.perf_counter() - t0
        st = csr_stats(off, li)
        _log(f"  inflation={st['inflation']:.3f} max_copies={st['max_copies']} assign={t_assign:.1f}s")
        t0 = time.perf_counter()
        rows = run_sweep(index, xq, gt, K, args)
        fit_info = {k: v for k, v in fit.items() if not isinstance(v, np.ndarray)}
        record["runs"][name] = {
            "method": name, "centroids": what, "rule": METHODS[name][1], "params": METHODS[name][2], **info,
            "n_postings": st["n_postings"], "inflation": st["inflation"], "max_copies": st["max_copies"],
            "copies_histogram": st["copies_histogram"],
            "index_bytes": int(st["n_postings"] * (4 * xb.shape[1] + 8) + K * xb.shape[1] * 4),
            "fit": fit_info, "fit_seconds": fit["fit_seconds"], "assign_seconds": t_assign, "add_seconds": t_add,
            "build_seconds": fit["fit_seconds"] + t_assign + t_add, "sweep_seconds": time.perf_counter() - t0,
            "stopped_at_recall": args.stop_recall if rows[-1]["recall_at_10"] >= args.stop_recall else None,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench_ann.sweep"] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}
        inflations[name] = st["inflation"]
        inflations["_max_copies_" + name] = st["max_copies"]
        del index
        record.update(environment())
        record["command"] = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench_ann.sweep"] + sys.argv[1:])
        record["aliases"] = ALIASES
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="siftsmall, mnist, glove-6b-50d, bigann10k, or a name/path "
                   "resolving to NAME.hdf5 (sift1m, glove-100, deep10m from data_scripts.prepare)")
    p.add_argument("--K", type=int, default=None, help="nlist (default per data set)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"subset of {list(METHODS)}")
    p.add_argument("--nq", type=int, default=None, help="use only nq of the queries (see --nq-mode)")
    p.add_argument("--nq-mode", choices=("random", "first"), default="random",
                   help="which nq queries: a fixed random subset (default_rng(0)), or the first nq. 'first' is "
                        "biased on ordered query sets: GloVe rows are sorted by word frequency, and the first 5,000 "
                        "MNIST test images are the easier half")
    p.add_argument("--out", default="bench_ann/results")
    p.add_argument("--data-dir", default=None, help="where NAME.hdf5 lives (default $FLASHGMM_DATA, ./data)")
    p.add_argument("--max-points-per-centroid", type=int, default=256)
    p.add_argument("--kmeans-niter", type=int, default=100)
    p.add_argument("--gmm-kmeans-iter", type=int, default=10)
    p.add_argument("--gmm-em-iter", type=int, default=90)
    p.add_argument("--device", default="cpu", help="GMM fitting device: cpu (torch backend) or cuda (Triton kernels "
                   "when available); search always runs on the FAISS CPU index")
    p.add_argument("--grid", choices=("half", "pow2"), default="half")
    p.add_argument("--stop-recall", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    p.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                   "flashgmm-faiss", "bench_fits"),
                   help="fitted centroids are cached here ('' disables)")
    p.add_argument("--no-summary", action="store_true", help="skip summarize/plot at the end")
    args = p.parse_args(argv)
    args.methods = [ALIASES.get(m, m) for m in args.methods]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)} (aliases {ALIASES})")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    dataset = Path(args.dataset).stem if args.dataset.endswith((".hdf5", ".h5")) else args.dataset
    K = args.K or DEFAULT_K.get(dataset, 1024)
    t0 = time.perf_counter()
    data = load_data(args.dataset, args.data_dir)
    if args.nq and args.nq < data["xq"].shape[0]:
        if args.nq_mode == "first":
            sel = np.arange(args.nq)
        else:
            sel = np.sort(np.random.default_rng(0).choice(data["xq"].shape[0], args.nq, replace=False))
        data["xq"], data["gt"] = data["xq"][sel], data["gt"][sel]
    _log(f"loaded {dataset}: nb={data['xb'].shape[0]} nq={data['xq'].shape[0]} d={data['xb'].shape[1]} "
         f"metric={data['metric']} from {data['source']} ({time.perf_counter() - t0:.1f}s)")
    for seed in args.seeds:
        run_seed(data, dataset, K, seed, args.methods, args)
    if not args.no_summary:
        from . import plot, summarize

        summarize.main([dataset, "--K", str(K), "--out", args.out])
        plot.main([dataset, "--K", str(K), "--out", args.out])


if __name__ == "__main__":
    main()
