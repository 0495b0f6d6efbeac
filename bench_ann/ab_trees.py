"""A/B of whole ``GaussianMixture`` fits between two source trees (two commits), in alternating processes.

For changes that no module switch can turn off (kernel signatures, the E-step's glue), each round runs one child
process per tree, in turn, on the same GPU: the child imports ``flashgmm_faiss`` (with its ``kernels`` inside, as
installed) from its tree and this harness (``bench_ann``) from the tree it runs in, builds
``bench_fit``'s SIFT-like rows (same seed in every tree), and runs one warm-up fit (compilation, autotuning) and one
timed fit per "cov precision" of ``--fits`` (``bench_fit.interleaved_fits`` with one variant: 10 k-means + 30 EM
iterations, tol 0). The parent prints, per fit kind and tree, the median ms per EM and k-means iteration of each
round, the final log-likelihoods, and the ratio of the trees' medians over all rounds.

    mkdir /tmp/base && git archive BASE kernels flashgmm_faiss | tar -x -C /tmp/base
    cp -r /tmp/base/kernels /tmp/base/flashgmm_faiss/kernels       # and the same for this tree when not installed
    python -m bench_ann.ab_trees --trees base=/tmp/base,new=. --fits "diag tf32,spherical tf32" --rounds 3 --out DIR

Writes ``ab_trees.json`` in --out (the children's results, the command, device and date).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(args):
    sys.path.insert(0, args.tree)       # flashgmm_faiss from the tree under test (bench_ann is already this one's)
    import torch

    import flashgmm_faiss
    if Path(flashgmm_faiss.__file__).resolve().parent != Path(args.tree).resolve() / "flashgmm_faiss":
        raise RuntimeError(f"flashgmm_faiss came from {flashgmm_faiss.__file__}, not from the tree {args.tree}")

    from bench_ann.bench_fit import interleaved_fits, sift_like
    x = sift_like(args.n, args.d, args.clusters)
    out = {"device": torch.cuda.get_device_name(0), "fits": {}}
    for spec in args.fits.split(","):
        cov, precision = spec.split()
        res = interleaved_fits(x, args.k, cov, {"tree": lambda: None}, 1, em_iter=args.em_iter,
                               kmeans_iter=args.kmeans_iter, precision=precision)["tree"]
        out["fits"][spec] = {"ms": res["ms"][0], "kmeans_ms": res["kmeans_ms"][0],
                             "log_likelihood": res["log_likelihood"][0]}
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(tree: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench_ann.ab_trees", "--child", "--tree", str(tree), "--fits", args.fits,
           "--n", str(args.n), "--k", str(args.k), "--d", str(args.d), "--clusters", str(args.clusters),
           "--em-iter", str(args.em_iter), "--kmeans-iter", str(args.kmeans_iter)]
    harness = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, cwd=harness, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child in {tree} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", default=None, help="name=path,name=path (the first is the reference)")
    p.add_argument("--fits", default="diag tf32,spherical tf32", help='"cov precision" list')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--em-iter", type=int, default=30)
    p.add_argument("--kmeans-iter", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if not args.trees:
        p.error("--trees name=path,name=path is required")
    trees = {}
    for item in args.trees.split(","):
        name, _, path = item.partition("=")
        if not path or not (Path(path) / "flashgmm_faiss").is_dir():
            p.error(f"--trees: {item!r} is not name=path of a tree with flashgmm_faiss/")
        trees[name] = Path(path).resolve()
    runs = []
    for r in range(args.rounds):
        for name, tree in trees.items():
            t0 = time.perf_counter()
            res = _run_child(tree, args)
            runs.append({"round": r, "tree": name, **res})
            summary = ", ".join(f"{spec} {f['ms']:.3f} ms (k-means {f['kmeans_ms']:.3f})"
                                for spec, f in res["fits"].items())
            print(f"round {r} {name:8s} {summary}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    ref = next(iter(trees))
    table = {}
    print("\nmedian ms per EM iteration over rounds (ratio to the first tree); final log-likelihoods")
    for spec in args.fits.split(","):
        table[spec] = {}
        for name in trees:
            fits = [run["fits"][spec] for run in runs if run["tree"] == name]
            table[spec][name] = {"ms": statistics.median(f["ms"] for f in fits),
                                 "kmeans_ms": statistics.median(f["kmeans_ms"] for f in fits),
                                 "log_likelihood": sorted({f["log_likelihood"] for f in fits})}
        for name, row in table[spec].items():
            ratio = row["ms"] / table[spec][ref]["ms"]
            print(f"{spec:16s} {name:8s} {row['ms']:.3f} ms ({ratio:.3f}x)  k-means {row['kmeans_ms']:.3f} ms  "
                  f"log-likelihood {row['log_likelihood']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python -m bench_ann.ab_trees " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": runs[0]["device"] if runs else None,
                "trees": {k: str(v) for k, v in trees.items()}, "runs": runs, "table": table}
        (out / "ab_trees.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
