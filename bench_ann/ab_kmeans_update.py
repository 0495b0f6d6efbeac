"""A/B of the fused k-means step's update (``kernels/kmeans.py``) on one GPU, in interleaved rounds.

Variants: ``baseline``, an older ``kmeans.py`` given by ``--baseline`` (e.g. ``git show b55d60c:kernels/kmeans.py``:
every cluster cut into the same number of pieces, so the largest clusters' programs form the tail), and ``this
tree``'s kernels (equal ranges of the sorted order per program, int16 sort keys), also with the update launches of
``--configs``. All share the assignment kernel, which is timed alone as ``assign``.

Problems (n, K, D from ``--n --k --d``): the kernel benchmark's (``bench_kernels.ab_problem``: centred SIFT-like
rows, centroids from three k-means steps) and ``sift_like``: the fit benchmark's data (``bench_fit.sift_like``, 2000
clusters, centred here) after ``--kmeans-iter`` k-means steps from random rows, the state the warm start runs in.
For each it prints the cluster sizes (max / mean), each variant's median ms per precision (with ``--graphs`` also
of its CUDA-graph replay) and host issue time, and whether the variants agree (labels and counts equal, largest
relative difference of the sums, bitwise reruns), and writes ``ab_kmeans_update.json``.

    python -m bench_ann.ab_kmeans_update --baseline /tmp/kmeans_old.py --graphs --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench, graphed, host_ms


def load_copy(path, name):
    """A kmeans.py as module ``flashgmm_faiss.kernels.<name>`` (its relative imports resolve against this tree's
    ``flashgmm_faiss.kernels``); each copy has its own launch constants."""
    importlib.import_module("flashgmm_faiss.kernels")
    spec = importlib.util.spec_from_file_location(f"flashgmm_faiss.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sift_like_state(n, k, d, iters, kernels):
    """(x (n, d) centred, centroids (k, d)) after ``iters`` k-means steps from random rows of the fit benchmark's
    data."""
    from bench_ann.bench_fit import sift_like
    x = sift_like(n, d, 2000)
    x -= x.mean(0)
    g = torch.Generator(device="cuda").manual_seed(3)
    c = x[torch.randint(0, n, (k,), device="cuda", generator=g)].clone()
    for _ in range(iters):
        _, _, cnt, sums = kernels.kmeans_step(x, c, precision="tf32")
        nz = cnt > 0
        c[nz] = sums[nz] / cnt[nz, None]
    return x, c.contiguous()


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_timing_args(ap, rep=100)
    ap.add_argument("--baseline", default=None, help="path of an older kernels/kmeans.py to compare with")
    ap.add_argument("--configs", default="",
                    help="extra update launches of this tree, BLOCK_M x warps x stages x programs per SM, e.g. "
                         "'64x8x1x8,32x4x3x16' (the default launch is always timed)")
    ap.add_argument("--precisions", default="tf32,bf16")
    ap.add_argument("--kmeans-iter", type=int, default=10)
    ap.add_argument("--graphs", action="store_true", help="also time every variant replayed as a CUDA graph")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    kk = importlib.import_module("flashgmm_faiss.kernels.kmeans")
    variants = {"this tree": kk}
    for i, cfg in enumerate(filter(None, a.configs.split(","))):
        mod = load_copy(kk.__file__, f"kmeans_cfg{i}")
        (mod.SEGMENT_BLOCK_M, mod.SEGMENT_WARPS, mod.SEGMENT_STAGES,
         mod.SEGMENT_PROGRAMS_PER_SM) = (int(v) for v in cfg.split("x"))
        variants[cfg] = mod
    if a.baseline:
        variants["baseline"] = load_copy(a.baseline, "kmeans_baseline")
    out = {"device": torch.cuda.get_device_name(), "n": a.n, "k": a.k, "d": a.d, "baseline": a.baseline,
           "problems": {}}
    x, _, means, _, _, _, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    problems = {"bench_kernels": (x, means)}
    problems["sift_like"] = sift_like_state(a.n, a.k, a.d, a.kmeans_iter, kernels)
    for pname, (x, c) in problems.items():
        res = out["problems"].setdefault(pname, {})
        bound = float(kernels.absmax(x))
        for prec in a.precisions.split(","):
            fns = {"assign": lambda: kk.assign_labels(x, c, precision=prec, x_absmax=bound)}
            for name, mod in variants.items():
                fns[name] = (lambda mod=mod: mod.kmeans_step(x, c, precision=prec, x_absmax=bound))
            outs = {name: mod.kmeans_step(x, c, precision=prec, x_absmax=bound) for name, mod in variants.items()}
            ref = outs["this tree"]
            counts = ref[2].double()
            agree = {}
            for name, o in outs.items():
                same = torch.equal(o[0], ref[0]) and torch.equal(o[2], ref[2])
                diff = float((o[3].double() - ref[3].double()).norm() / ref[3].double().norm())
                again = variants[name].kmeans_step(x, c, precision=prec, x_absmax=bound)[3]
                agree[name] = {"labels_counts_equal": same, "sums_rel_diff": diff,
                               "bitwise_rerun": torch.equal(again, o[3])}
            if a.graphs:   # replays: the GPU time without the host's launch overhead
                fns.update({f"{name} graph": graphed(f) for name, f in list(fns.items())})
            host = {name: host_ms(f) for name, f in fns.items()}
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    times[name].append(bench(f, a.rep))
            sizes = {"max_over_mean": float(counts.max() / counts.mean()), "empty": int((counts == 0).sum())}
            res[prec] = {"cluster_sizes": sizes, "times_ms": times, "host_issue_ms": host, "agreement": agree}
            print(f"[{pname} {prec}] cluster size max/mean {sizes['max_over_mean']:.2f}, empty {sizes['empty']}",
                  flush=True)
            for name, ts in times.items():
                extra = "" if name not in agree else "  " + json.dumps(agree[name])
                print(f"  {name:<16} ms " + " ".join(f"{v:.3f}" for v in ts) + f"  host {host[name]:.3f}" + extra,
                      flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_kmeans_update.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
