"""One-off (v45): does the Triton backend's PrecisionWarning stay silent on the benchmark's SIFT-like data and fire
on the collapsed-duplicates reproducer? Run from the repository root on a GPU machine:

    python bench_ann/results/v45_refresh/precision_warning_check.py
"""
import warnings

import numpy as np
import torch

from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture
from flashgmm_faiss.gmm import PrecisionWarning, expansion_error_bound


def fit(x, k, cov, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = GaussianMixture(k, covariance_type=cov, backend="triton", device="cuda", **kw).fit(x)
    xc = x.cpu().numpy() if torch.is_tensor(x) else x
    bound = expansion_error_bound(np.abs(xc - g.center_).max(0), g.means_ - g.center_, g.covariances_)
    fired = [str(m.message)[:120] for m in w if issubclass(m.category, PrecisionWarning)]
    return bound, fired


x = sift_like(1 << 20, 128, 2000)
for cov in ("spherical", "diag"):
    bound, fired = fit(x, 1024, cov, kmeans_iter=10, max_iter=20)
    print(f"SIFT-like N=2^20 K=1024 {cov}: max bound {bound.max():.3g} nats, warned: {fired or 'no'}", flush=True)
rng = np.random.default_rng(0)
base = rng.standard_normal((100, 32)).astype(np.float32) * 5
xr = np.vstack([np.repeat(base, 30, 0), rng.standard_normal((1000, 32)).astype(np.float32) * 5])
for cov in ("spherical", "diag"):
    bound, fired = fit(xr, 64, cov, max_iter=50)
    print(f"duplicates reproducer {cov}: max bound {bound.max():.3g} nats, warned: {fired or 'no'}", flush=True)
