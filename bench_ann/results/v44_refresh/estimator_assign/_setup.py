"""Shared set-up of the v44 one-off scripts beside this file: bench_assign's spherical model and a wall-clock timer."""
import time
import warnings

import torch

from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture

K = 1024


def fitted_model():
    """SIFT-like rows (1e6 x 128, 2000 clusters, on the GPU) and a spherical GaussianMixture fitted on them as
    bench_assign fits it (5 k-means + 10 EM iterations, tol 0): (X (n, d) cuda float32, model)."""
    X = sift_like(1_000_000, 128, 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(K, covariance_type="spherical", kmeans_iter=5, max_iter=10, tol=0.0, backend="triton",
                            device="cuda", seed=0).fit(X)
    return X, g


def wall(fn, calls=10, warm=True):
    """Mean wall ms per call of ``fn`` over ``calls`` calls, the GPU synchronised before and after."""
    if warm:
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e3
