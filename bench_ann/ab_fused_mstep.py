"""A/B of the EM iteration's glue around the two E-step passes: the M-step as one kernel (``kernels/mstep.py``)
and the E-step's float64 totals taken from the first chunk (no zero fills and additions), against the earlier torch
forms, in whole ``GaussianMixture`` fits timed interleaved in one process.

A profile of a fit's EM iteration (H100, N=1e6, K=1024, D=128; ``bench_ann/results/v33_gpu_tests/profile/``) had
~57-72 kernels per iteration, ~17 of them the M-step's few-microsecond torch operations on (K, D) float64 tensors
and 8 the zero fills and additions of the per-chunk totals. Variants:

* ``before``: zero-filled totals plus additions (``_estep_pass_zeros`` below, the code before this change) and the
  torch M-step (``TritonBackend.fused_m_step = False``);
* ``totals``: the first chunk's totals, torch M-step;
* ``fused``: the first chunk's totals and the fused M-step (the shipped defaults).

Each fit: 10 k-means + ``--em-iter`` EM iterations, tol 0, defaults otherwise (sparse E-step, CUDA graphs,
lookahead); the median ms per EM iteration over iterations 2..end (and per k-means iteration over 2..10, for the
issue's EM / k-means ratio), ``--rounds`` interleaved rounds, and each fit's final log-likelihood (diag: the same
in every variant, bit for bit, as the kernel's diag M-step is the torch form's; spherical: its feature sums may
differ in the last bit).

    python -m bench_ann.ab_fused_mstep --n 1e6 --k 1024 --rounds 3 --peak-n 2.5e6 --out DIR

``--peak-n`` also measures each variant's peak memory beyond X in ``working_memory=64`` (the GPU memory test's
fit): the first chunk's totals and the statistics dropped before the next chunk's E-step lower it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from flashgmm_faiss import GaussianMixture
from flashgmm_faiss._triton_backend import TritonBackend

from .bench_fit import interleaved_fits, sift_like

SHIPPED_ESTEP_PASS = GaussianMixture._estep_pass


def _estep_pass_zeros(self, data, m32, v32, lw32):
    """``GaussianMixture._estep_pass`` before this change: zero-filled float64 totals, one addition per chunk."""
    ordered = hasattr(self._impl, "fit_estep")
    k, d = m32.shape
    nk = torch.zeros(k, dtype=torch.float64, device=m32.device)
    sx = torch.zeros(k, d, dtype=torch.float64, device=m32.device)
    sq = torch.zeros(v32.shape, dtype=torch.float64, device=m32.device)
    ll_sum = torch.zeros((), dtype=torch.float64, device=m32.device)
    for start, x, kw in self._stream(data):
        st = (self._impl.fit_estep(start, x, m32, v32, lw32, **kw) if ordered
              else self._impl.estep(x, m32, v32, lw32, **kw))
        nk += st.nk.double()
        sx += st.sx.double()
        sq += st.sq.double()
        ll_sum += st.log_norm.sum(dtype=torch.float64)
    return nk, sx, sq, ll_sum


VARIANTS = {"before": (_estep_pass_zeros, False), "totals": (SHIPPED_ESTEP_PASS, False),
            "fused": (SHIPPED_ESTEP_PASS, True)}


def _use(name):
    GaussianMixture._estep_pass, TritonBackend.fused_m_step = VARIANTS[name]


def peaks(n, k, d):
    """Peak MiB beyond X of a fit in ``working_memory=64`` (the GPU test
    ``test_working_memory_peak_stays_within_the_budget``: N=2.5e6 SIFT-like rows, several chunks with transient row
    orders, 2 k-means + 3 EM iterations) per variant and covariance type."""
    x = sift_like(n, d, 2000, seed=3)
    out = {}
    for cov in ("spherical", "diag"):
        kw = dict(covariance_type=cov, kmeans_iter=2, max_iter=3, tol=0.0, backend="triton", device="cuda", seed=0,
                  working_memory=64)
        for name in VARIANTS:
            _use(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                GaussianMixture(k, **{**kw, "max_iter": 1, "kmeans_iter": 1}).fit(x[:1_600_000])
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                GaussianMixture(k, **kw).fit(x)
                torch.cuda.synchronize()
            out[f"{cov} {name}"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
            print(f"peak {cov} {name}: {out[f'{cov} {name}']} MiB beyond X (working_memory=64)", flush=True)
    _use("fused")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--em-iter", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--covs", default="spherical,diag")
    ap.add_argument("--peak-n", type=lambda v: int(float(v)), default=0,
                    help="also measure each variant's peak memory in working_memory=64 on this many rows (2.5e6: "
                         "the GPU test's problem)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    x = sift_like(a.n, a.d, a.k)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(a), "ms": {}, "kmeans_ms": {},
           "log_likelihood": {}}
    for cov in a.covs.split(","):
        fits = interleaved_fits(x, a.k, cov, {name: (lambda name=name: _use(name)) for name in VARIANTS}, a.rounds,
                                a.em_iter)
        for name, r in fits.items():
            key = f"{cov} {name}"
            res["ms"][key], res["kmeans_ms"][key], res["log_likelihood"][key] = (r["ms"], r["kmeans_ms"],
                                                                                 r["log_likelihood"])
            print(f"{key:16s} median {statistics.median(res['ms'][key]):.3f} ms per EM iteration "
                  f"{[round(t, 3) for t in res['ms'][key]]}, k-means iteration "
                  f"{statistics.median(res['kmeans_ms'][key]):.3f} ms; final log-likelihood "
                  f"{res['log_likelihood'][key]}", flush=True)
    _use("fused")
    if a.peak_n:
        res["peak_mib_working_memory_64"] = peaks(a.peak_n, a.k, a.d)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "ab_fused_mstep.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
