"""GaussianMixture end to end on a CUDA GPU: the Triton backend against the torch backend (float32 cuBLAS)."""
import warnings

import numpy as np
import pytest
import torch

from flashgmm_faiss import GaussianMixture

from conftest import assert_close

pytestmark = pytest.mark.gpu


def _sift_like(n, d, k, seed=0):
    """Uncentred clustered data in 0..255, like SIFT descriptors."""
    r = np.random.default_rng(seed)
    centers = r.uniform(20, 200, size=(k, d))
    labels = r.integers(k, size=n)
    X = centers[labels] + r.normal(scale=r.uniform(5, 20, size=k)[labels, None], size=(n, d))
    return np.clip(X, 0, 255).astype(np.float32)


def _fit(X, backend, cov, means, weights, var, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(means.shape[0], covariance_type=cov, init=means, weights_init=weights,
                               covariances_init=var, kmeans_iter=0, tol=0.0, backend=backend,
                               device="cuda", **kw).fit(X)


@pytest.mark.parametrize("cov", ["spherical", pytest.param("diag", marks=pytest.mark.xfail(
    strict=False, reason="measured on an H200 (2026-11-21): after one EM step the worst diag variance element "
    "is 2.7% off float32 torch (46.45 vs 47.76) on uncentred SIFT-like clusters, although the norm-relative "
    "error of the statistics is 1.2e-4 (bench_kernels): the split-bf16 logits of the diag E-step are not yet "
    "accurate enough for an elementwise 1e-3 bound"))])
def test_triton_fit_matches_torch_fit(cov):
    X = _sift_like(50_000, 128, 64)
    r = np.random.default_rng(1)
    means = X[r.choice(len(X), 64, replace=False)]
    weights = np.full(64, 1 / 64)
    var = np.full(64, 400.0) if cov == "spherical" else np.full((64, 128), 400.0)
    Xg = torch.from_numpy(X).cuda()
    # one EM step: the statistics themselves (tf32-class arithmetic against float32 cuBLAS)
    ref = _fit(X, "torch", cov, means, weights, var, max_iter=1)
    got = _fit(Xg, "triton", cov, means, weights, var, max_iter=1, chunk_size=7_777)
    assert got.backend_ == "triton" and ref.backend_ == "torch"
    scale = np.abs(ref.means_).max()
    assert_close(got.means_, ref.means_, rtol=1e-3, atol=1e-4 * scale, what="means after one EM step")
    assert_close(got.covariances_, ref.covariances_, rtol=1e-3, what="variances after one EM step")
    assert_close(got.weights_, ref.weights_, rtol=1e-3, atol=1e-7, what="weights after one EM step")
    # ten EM steps: rounding differences are amplified by EM, the likelihood path must still agree
    ref = _fit(X, "torch", cov, means, weights, var, max_iter=10)
    got = _fit(Xg, "triton", cov, means, weights, var, max_iter=10)
    assert_close([h["log_likelihood"] for h in got.history_], [h["log_likelihood"] for h in ref.history_],
                 rtol=1e-4, what="log-likelihood history")
    assert_close(got.means_, ref.means_, rtol=1e-2, atol=1e-3 * scale, what="means after ten EM steps")


def test_auto_backend_and_inference_on_gpu():
    X = _sift_like(30_000, 96, 40, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(40, max_iter=15, seed=0).fit(X)  # numpy input streamed to the GPU
    assert g.backend_ == "triton"
    t = GaussianMixture(40, backend="torch", device="cuda")
    for a in ("means_", "covariances_", "weights_", "center_", "n_features_in_"):
        setattr(t, a, getattr(g, a))
    assert_close(g.score_samples(X), t.score_samples(X), rtol=1e-4, atol=1e-3, what="score_samples")
    agree = np.mean(g.predict(X) == t.predict(X))
    assert agree > 0.999, agree
    o1, l1, r1 = g.assign(X, max_assign=4)
    o2, l2, r2 = t.assign(X, max_assign=4)
    assert np.mean(np.diff(o1) == np.diff(o2)) > 0.999
    assert np.all(np.diff(o1) >= 1) and np.all(np.diff(o1) <= 4)
    assert np.mean(l1[o1[:-1]] == l2[o2[:-1]]) > 0.999
