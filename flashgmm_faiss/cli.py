"""Command line: ``flashgmm-faiss demo | build | search | sweep | info``.

* ``demo`` runs the whole pipeline on the bundled SIFT10K ("siftsmall", texmex) data: FAISS k-means IVF against
  GMM-IVF with and without multi-assignment, an nprobe sweep, a recall@10-vs-DCO table, a PNG plot and a JSON
  file. No download.
* ``build`` / ``search`` / ``sweep`` work on user files: .npy, .fvecs/.bvecs/.ivecs, .fbin/.u8bin/.i8bin/.ibin and
  ann-benchmarks HDF5 (``train`` / ``test`` / ``neighbors``), see :mod:`flashgmm_faiss.io`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data
def load_siftsmall():
    """The bundled texmex SIFT10K set: xb (10000, 128) float32, xq (100, 128) float32, gt (100, 100) int64."""
    from importlib.resources import files

    with np.load(files("flashgmm_faiss").joinpath("data/siftsmall.npz")) as z:
        return z["xb"].astype(np.float32), z["xq"].astype(np.float32), z["gt"].astype(np.int64)


def _is_hdf5(path) -> bool:
    return Path(path).suffix.lower() in (".hdf5", ".h5")


def _read(path, hdf5_dataset: str):
    from .io import read_vectors

    if _is_hdf5(path):
        return read_vectors(path, dataset=hdf5_dataset)
    return read_vectors(path)


def _metric_of(path, given):
    if given:
        return given
    if _is_hdf5(path):
        from .io import read_ann_hdf5

        return read_ann_hdf5(path).metric
    return "l2"


# ---------------------------------------------------------------------------------------------- output
def format_table(results: dict, k: int = 10) -> str:
    """Markdown table: one row per nprobe, one column per method with recall@k and scan DCO per query."""
    methods = list(results)
    nprobes = sorted({r["nprobe"] for m in methods for r in results[m]["sweep"]})
    head = "| nprobe | " + " | ".join(f"{m} R@{k} / DCO" for m in methods) + " |"
    sep = "|---:|" + "---:|" * len(methods)
    lines = [head, sep]
    for p in nprobes:
        cells = []
        for m in methods:
            row = next((r for r in results[m]["sweep"] if r["nprobe"] == p), None)
            cells.append("" if row is None else f"{row['recall_at_10']:.3f} / {row['dco_scan_per_query']:.0f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweeps(results: dict, path, title: str, k: int = 10) -> bool:
    """recall@k vs scan DCO per query (log x) for each method; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: skipping the plot (pip install 'flashgmm-faiss[plot]').")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for m, res in results.items():
        rows = sorted(res["sweep"], key=lambda r: r["dco_scan_per_query"])
        x = [r["dco_scan_per_query"] for r in rows]
        y = [r["recall_at_10"] for r in rows]
        label = f"{m} (inflation {res['inflation']:.2f})" if "inflation" in res else m
        ax.plot(x, y, marker="o", ms=4, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("distance computations per query (list scan, copies counted; log scale)")
    ax.set_ylabel(f"recall@{k} (fraction of true {k}-NN found in top {k})")
    ax.set_title(title + "\n(up and to the left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _environment() -> dict:
    import faiss
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu}"
    return {"device": dev, "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(["flashgmm-faiss"] + sys.argv[1:])}


# ---------------------------------------------------------------------------------------------- demo
def run_demo(out_dir="flashgmm_demo", K=64, seed=0, max_iter=100, quiet=False) -> dict:
    """Train k-means IVF and GMM-IVF on the bundled siftsmall data, sweep nprobe, write JSON + PNG.

    Returns the results dict (also written to ``out_dir/demo_siftsmall.json``).
    """
    import faiss

    from . import GaussianMixture, build_gmm_ivf
    from .evaluation import dco_at_recall, sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xb, xq, gt = load_siftsmall()
    d = xb.shape[1]
    nprobes = [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if p <= K] + ([K] if K > 64 else [])
    say = (lambda *a: None) if quiet else _log
    say(f"[demo] siftsmall: xb {xb.shape}, xq {xq.shape}, gt {gt.shape}; K={K}; nprobe sweep {nprobes}")
    results = {}

    say("[1/6] FAISS k-means IVF (IndexIVFFlat, 20 k-means iterations) ...")
    t0 = time.perf_counter()
    km = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, K)
    km.cp.seed = seed
    km.cp.niter = 20
    km.train(xb)
    km.add(xb)
    results["kmeans"] = {"build_seconds": time.perf_counter() - t0, "inflation": 1.0,
                         "sweep": sweep(km, xq, gt, 10, nprobes)}
    say(f"      built in {results['kmeans']['build_seconds']:.1f}s")

    say(f"[2/6] GMM (spherical, 10 k-means + up to {max_iter} EM iterations) ...")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm = GaussianMixture(K, max_iter=max_iter, seed=seed, verbose=0 if quiet else 1).fit(xb)
    fit_s = time.perf_counter() - t0
    say(f"      fitted in {fit_s:.1f}s, {gmm.n_iter_} EM iterations, log-likelihood {gmm.lower_bound_:.3f}")

    variants = [("gmm-single", {"max_assign": 1}), ("gmm-multi", {}), ("gmm-multi-cap2", {"max_assign": 2}),
                ("gmm-soar@1.6", {"assignment": "soar", "spill_budget": 1.6})]
    for step, (name, kw) in enumerate(variants, start=3):
        say(f"[{step}/{2 + len(variants)}] {name}: add + sweep ...")
        t0 = time.perf_counter()
        index = build_gmm_ivf(xb, gmm=gmm, **kw)
        results[name] = {"build_seconds": fit_s + time.perf_counter() - t0, "inflation": index.inflation,
                         "max_copies": index.max_copies, "assignment": index.assignment,
                         "tau": index.tau_ if index.assignment == "tau" else None,
                         "max_assign": kw.get("max_assign"), "spill_budget": kw.get("spill_budget"),
                         "copies_histogram": index.copies_histogram.tolist(),
                         "sweep": sweep(index, xq, gt, 10, nprobes)}

    table = format_table(results)
    targets = (0.9, 0.95, 0.99)
    summary = ["| method | inflation | " + " | ".join(f"scan DCO @ R@10={t}" for t in targets) + " |",
               "|---|---:|" + "---:|" * len(targets)]
    for m, res in results.items():
        cells = []
        for t in targets:
            v = dco_at_recall(res["sweep"], t)
            cells.append("not reached" if v is None else f"{v:.0f}")
        summary.append(f"| {m} | {res['inflation']:.2f} | " + " | ".join(cells) + " |")
    payload = {"dataset": "siftsmall (texmex SIFT10K, bundled)", "K": K, "k": 10, "seed": seed,
               "environment": _environment(), "methods": results}
    json_path = out / "demo_siftsmall.json"
    json_path.write_text(json.dumps(payload, indent=1))
    png_path = out / "demo_siftsmall.png"
    plotted = plot_sweeps(results, png_path, f"siftsmall (10k x 128), K={K}: recall@10 vs DCO")
    print(f"\nrecall@10 / scan DCO per query (siftsmall, K={K}, {len(xq)} queries)\n")
    print(table)
    print("\nscan DCO per query needed to reach a recall@10 target (log-interpolated)\n")
    print("\n".join(summary))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if plotted else ""))
    return payload


# ---------------------------------------------------------------------------------------------- build/search/sweep
def _check_build_args(a):
    """The index settings of ``build``, checked before any file is read or any GMM fitted."""
    from ._validation import check_positive_int
    from .ivf import _check_index_options

    check_positive_int(a.K, "--K")
    _check_index_options(a.assignment, a.tau, a.max_assign, a.spill_budget, a.soar_lambda, cli=True)


def cmd_build(a):
    from . import build_gmm_ivf

    _check_build_args(a)
    xb = _read(a.base, "train")
    xt = _read(a.train, "train") if a.train else None
    metric = _metric_of(a.base, a.metric)
    _log(f"[build] base {a.base}: {xb.shape} {xb.dtype}, metric={metric}, K={a.K}")
    t0 = time.perf_counter()
    index = build_gmm_ivf(np.asarray(xb), K=a.K, xt=None if xt is None else np.asarray(xt), metric=metric,
                          tau=a.tau, max_assign=a.max_assign, assignment=a.assignment,
                          spill_budget=a.spill_budget, soar_lambda=a.soar_lambda, covariance_type=a.covariance_type,
                          max_iter=a.max_iter, kmeans_iter=a.kmeans_iter, backend=a.backend, device=a.device,
                          seed=a.seed, verbose=1)
    index.save(a.out)
    st = index.stats()
    _log(f"[build] done in {time.perf_counter() - t0:.1f}s")
    print(json.dumps({k: st[k] for k in ("ntotal", "n_postings", "inflation", "max_copies", "nlist", "metric",
                                          "assignment")}))
    print(f"wrote {a.out} and {a.out}.gmm.npz")


def cmd_search(a):
    from .evaluation import recall_at_k, search_with_dco
    from .ivf import GMMIVFIndex

    index = GMMIVFIndex.load(a.index)
    xq = np.asarray(_read(a.queries, "test"))
    D, I, dco = search_with_dco(index, xq, k=a.k, nprobe=a.nprobe)
    info = {"nq": int(xq.shape[0]), "k": a.k, "nprobe": a.nprobe, "dco_scan_per_query": float(dco.scan.mean()),
            "dco_total_per_query": float(dco.total.mean())}
    if a.gt or _is_hdf5(a.queries):
        gt = np.asarray(_read(a.gt or a.queries, "neighbors"))
        info[f"recall_at_{a.k}"] = recall_at_k(I, gt, a.k)
    if a.out:
        if a.out.endswith(".npz"):
            np.savez(a.out, D=D, I=I, dco_scan=dco.scan, dco_routing=dco.routing)
        else:
            from .io import write_vectors

            write_vectors(a.out, I.astype(np.int32) if a.out.endswith((".ivecs", ".ibin")) else I)
        info["out"] = a.out
    print(json.dumps(info))


def _parse_nprobes(text: str) -> list[int]:
    try:
        nprobes = [int(p) for p in text.split(",")]
    except ValueError:
        nprobes = []
    if not nprobes or min(nprobes) < 1:
        raise ValueError(f"--nprobes must be comma-separated integers >= 1 (e.g. 1,2,4,8), got {text!r}.")
    return nprobes


def cmd_sweep(a):
    from .evaluation import sweep
    from .ivf import GMMIVFIndex

    index = GMMIVFIndex.load(a.index)
    xq = np.asarray(_read(a.queries, "test"))
    gt = np.asarray(_read(a.gt or a.queries, "neighbors"))
    nprobes = _parse_nprobes(a.nprobes) if a.nprobes else None
    rows = sweep(index, xq, gt, k=a.k, nprobes=nprobes, verbose=True)
    results = {"gmm-ivf": {"inflation": index.inflation, "sweep": rows}}
    print(format_table(results, k=a.k))
    if a.out:
        Path(a.out).write_text(json.dumps({"index": a.index, "environment": _environment(), "stats": index.stats(),
                                           "sweep": rows}, indent=1))
        print(f"wrote {a.out}")
    if a.plot:
        plot_sweeps(results, a.plot, f"{Path(a.index).name}: recall@{a.k} vs DCO", k=a.k)
        print(f"wrote {a.plot}")


def cmd_info(a):
    from .ivf import GMMIVFIndex

    index = GMMIVFIndex.load(a.index)
    st = index.stats()
    st["copies_histogram"] = st["copies_histogram"][:20]
    print(json.dumps(st, indent=1))


# ---------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashgmm-faiss", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="k-means IVF vs GMM-IVF on the bundled siftsmall data (no download)")
    d.add_argument("--out", default="flashgmm_demo", help="output folder for JSON and PNG (default: %(default)s)")
    d.add_argument("--K", type=int, default=64, help="number of lists / components (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-iter", type=int, default=100, help="EM iterations after the k-means warm start")

    b = sub.add_parser("build", help="fit a GMM and build a multi-assigned IVF index from a vector file")
    b.add_argument("--base", required=True, help="vectors to index (.npy/.fvecs/.bvecs/.fbin/.u8bin/.hdf5 'train')")
    b.add_argument("--train", help="training vectors (default: the base)")
    b.add_argument("--out", required=True, help="index path; the GMM goes to OUT.gmm.npz beside it")
    b.add_argument("--K", type=int, default=1024)
    b.add_argument("--metric", choices=("l2", "angular"), help="default: l2, or the HDF5 file's 'distance'")
    b.add_argument("--tau", type=float, default=None,
                   help="responsibility threshold in [0, 1) for --assignment tau (default 1/K; 0 for K=1)")
    b.add_argument("--max-assign", type=int, default=None, help="copy cap per vector (1 = single assignment)")
    b.add_argument("--assignment", choices=("tau", "soar"), default="tau",
                   help="tau: lists with responsibility > tau (the paper's rule); soar: SOAR-L2 spilling on the GMM "
                        "means (at most 2 copies)")
    b.add_argument("--spill-budget", type=float, default=None,
                   help="target inflation in [1, 2] for --assignment soar, e.g. 1.6")
    b.add_argument("--soar-lambda", type=float, default=None, help="SOAR's lambda for --assignment soar (default 0.75)")
    b.add_argument("--covariance-type", choices=("spherical", "diag"), default="spherical")
    b.add_argument("--max-iter", type=int, default=100)
    b.add_argument("--kmeans-iter", type=int, default=10)
    b.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    b.add_argument("--device", default=None)
    b.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("search", help="search an index built by 'build'")
    s.add_argument("--index", required=True)
    s.add_argument("--queries", required=True, help="query file (.hdf5: the 'test' dataset)")
    s.add_argument("--gt", help="ground-truth ids (.ivecs/.ibin/.npy; .hdf5: 'neighbors') to report recall")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--nprobe", type=int, default=8)
    s.add_argument("--out", help="write results: .npz (D, I, DCO) or a vector file of ids (.ivecs/.ibin/.npy)")

    w = sub.add_parser("sweep", help="recall@k vs DCO over nprobe values")
    w.add_argument("--index", required=True)
    w.add_argument("--queries", required=True)
    w.add_argument("--gt", help="ground truth (default: 'neighbors' of the queries' HDF5 file)")
    w.add_argument("--k", type=int, default=10)
    w.add_argument("--nprobes", help="comma-separated, default 1,2,4,...,K")
    w.add_argument("--out", help="JSON output")
    w.add_argument("--plot", help="PNG output")

    i = sub.add_parser("info", help="print an index's statistics (inflation, copies)")
    i.add_argument("--index", required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.out, K=args.K, seed=args.seed, max_iter=args.max_iter)
        elif args.command == "build":
            cmd_build(args)
        elif args.command == "search":
            cmd_search(args)
        elif args.command == "sweep":
            if not args.gt and not _is_hdf5(args.queries):
                raise ValueError("--gt is required unless --queries is an ann-benchmarks .hdf5 file")
            cmd_sweep(args)
        elif args.command == "info":
            cmd_info(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"flashgmm-faiss {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
