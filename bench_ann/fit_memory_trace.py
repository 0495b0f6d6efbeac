"""Where a GPU fit's peak device memory comes from: each new peak of ``torch.cuda.max_memory_allocated`` is
charged to the innermost of the package's functions (estimator steps, backend methods, repairs, kernel launchers)
that was running when it was reached.

Runs one ``GaussianMixture`` fit on ``bench_fit``'s SIFT-like rows (resident on the GPU) after the same fit once
(compilation, autotuning), prints every function that raised the peak with its peak beyond X, and writes
``fit_memory_trace.json``. Used to check ``working_memory`` plans (``tests/test_gmm_gpu.py``'s budget test).

    python -m bench_ann.fit_memory_trace --n 2500000 --k 1024 --cov diag --working-memory 64 --out DIR
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from pathlib import Path

import torch

TRACED = {
    "flashgmm_faiss.gmm:GaussianMixture": ("_initial_means", "_kmeans", "_kmeans_variances", "_global_variances",
                                           "_em_step", "_farthest_rows", "_reseed_components", "_collapsed_components",
                                           "_mean_log_likelihood", "_set_params"),
    "flashgmm_faiss._triton_backend:TritonBackend": ("fit_estep", "estep", "score", "assign", "kmeans_step",
                                                     "m_step", "_split", "_repaired_estep", "_torch_estep",
                                                     "_kernel_estep", "_estep", "_params"),
    "flashgmm_faiss._collapsed": ("collapsed_lse", "repair_estep", "repair_score", "repair_assign", "split"),
    "flashgmm_faiss.kernels": ("estep", "score", "kmeans_step", "prepare", "assign"),
}


class PeakTrace:
    """Wraps functions so that each new device-memory peak is charged to the innermost one running."""

    def __init__(self, base: int):
        self.base = base
        self.peak = 0
        self.charged = {}   # name -> the highest peak (bytes beyond base) reached while it ran

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not torch.cuda.is_current_stream_capturing():   # no sync inside a CUDA-graph capture
                torch.cuda.synchronize()
                p = torch.cuda.max_memory_allocated() - self.base
                if p > self.peak:
                    self.peak = p
                    self.charged[name] = max(self.charged.get(name, 0), p)
            return out
        return traced


def install(trace: PeakTrace):
    import importlib
    undo = []
    for where, names in TRACED.items():
        mod_name, _, cls_name = where.partition(":")
        owner = importlib.import_module(mod_name)
        if cls_name:
            owner = getattr(owner, cls_name)
        for name in names:
            fn = owner.__dict__.get(name) if cls_name else getattr(owner, name, None)
            if fn is None:
                continue
            if isinstance(fn, staticmethod):
                wrapped = staticmethod(trace.wrap(f"{where}.{name}", fn.__func__))
            else:
                wrapped = trace.wrap(f"{where}.{name}", fn)
            setattr(owner, name, wrapped)
            undo.append((owner, name, fn))
    return undo


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_500_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--cov", default="diag")
    ap.add_argument("--working-memory", type=float, default=64)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from bench_ann.bench_fit import sift_like
    from flashgmm_faiss import GaussianMixture
    X = sift_like(a.n, a.d, a.clusters, seed=3)
    kw = dict(covariance_type=a.cov, kmeans_iter=2, max_iter=3, tol=0.0, backend="triton", device="cuda", seed=0,
              working_memory=a.working_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GaussianMixture(a.k, **kw).fit(X)     # compile and autotune (Triton's benchmark allocates 244 MiB once)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trace = PeakTrace(torch.cuda.memory_allocated())
        install(trace)
        g = GaussianMixture(a.k, **kw).fit(X)
        torch.cuda.synchronize()
    peak = trace.peak / 2**20
    rows = sorted(trace.charged.items(), key=lambda kv: kv[1])
    print(f"peak beyond X: {peak:.1f} MiB (working_memory={a.working_memory}); {g._impl.order_stats}")
    for name, b in rows:
        print(f"  {b / 2**20:8.1f} MiB  {name}")
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python -m bench_ann.fit_memory_trace", *(sys.argv[1:] if argv is None else argv)]),
           "peak_mib": peak, "charged_mib": {k: v / 2**20 for k, v in rows}, "order_stats": g._impl.order_stats}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "fit_memory_trace.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
