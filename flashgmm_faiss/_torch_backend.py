"""Plain torch implementation of the per-chunk GMM and k-means operations.

This module is three things at once:

* the CPU fallback (and a correct GPU fallback) of :class:`flashgmm_faiss.GaussianMixture`;
* the reference the Triton kernels in ``flashgmm_faiss.kernels`` are tested against;
* the *contract* every backend implements. The Triton backend (``flashgmm_faiss._triton_backend``) exposes the
  same functions with the same signatures, shapes and meaning.

All functions work on one chunk of rows that already lives on the compute device, as float32:

* ``x``           : (n, D) float32, contiguous. The caller has already subtracted the data centre
                    (see ``GaussianMixture.center_``), which keeps fp32 distance expansions accurate on
                    uncentred data such as SIFT (values 0..255).
* ``means``       : (K, D) float32, in the same centred frame.
* ``var``         : (K,) float32 for ``"spherical"`` or (K, D) float32 for ``"diag"``: the covariance type is
                    read from ``var.ndim``. Variances are already floored (``reg_covar``) by the caller.
* ``log_weights`` : (K,) float32, log mixture weights.

They return per-chunk float32 results; the caller accumulates sufficient statistics across chunks in float64,
so nothing here ever sees more than one chunk and memory stays O(chunk * K + K * D).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_2PI = math.log(2.0 * math.pi)


class EStepStats(NamedTuple):
    """Sufficient statistics of one E-step over a chunk of n rows.

    log_norm : (n,)  log sum_k w_k N(x_i | mu_k, var_k), i.e. the per-sample log-likelihood (logZ).
    nk       : (K,)  sum_i r_ik.
    sx       : (K,D) sum_i r_ik x_i.
    sq       : (K,) sum_i r_ik ||x_i - mu_k||^2 (spherical) or (K,D) sum_i r_ik (x_i - mu_k)^2 (diag), measured
               around the *current* means, which avoids the E[x^2] - mu^2 cancellation in the M-step.

    The torch backend returns them in the data's dtype; the Triton backend returns log_norm in float32 and the
    three statistics in float64 (its fixed-order float64 sums of per-slab partials, unrounded: the M-step's dtype).
    """

    log_norm: torch.Tensor
    nk: torch.Tensor
    sx: torch.Tensor
    sq: torch.Tensor


def _sq_dist(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(n, K) squared Euclidean distances through one GEMM, clamped at 0."""
    x2 = (x * x).sum(1, keepdim=True)
    m2 = (means * means).sum(1)
    return (x2 - 2.0 * (x @ means.T) + m2).clamp_min_(0.0)


def _spherical_log_prob(dist: torch.Tensor, d: int, var: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    return log_weights - 0.5 * (d * (LOG_2PI + torch.log(var))) - 0.5 * dist / var


def log_prob(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Weighted log densities log w_k + log N(x_i | mu_k, var_k), shape (n, K)."""
    d = x.shape[1]
    if var.ndim == 1:
        return _spherical_log_prob(_sq_dist(x, means), d, var, log_weights)
    prec = 1.0 / var
    quad = (x * x) @ prec.T - 2.0 * (x @ (means * prec).T) + (means * means * prec).sum(1)
    quad = quad.clamp_min_(0.0)
    return log_weights - 0.5 * (d * LOG_2PI + torch.log(var).sum(1)) - 0.5 * quad


def _centred(x: torch.Tensor, center) -> torch.Tensor:
    return x if center is None else x - center


def estep(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor,
          center=None) -> EStepStats:
    """One E-step over a chunk: log-likelihoods and responsibility-weighted sufficient statistics.

    ``center`` (D,), when given, is subtracted from the rows first (means are in the centred frame)."""
    x = _centred(x, center)
    spherical = var.ndim == 1
    if spherical:  # the distances serve both the logits and sum r ||x - mu||^2: one GEMM saved
        dist = _sq_dist(x, means)
        lp = _spherical_log_prob(dist, x.shape[1], var, log_weights)
    else:
        lp = log_prob(x, means, var, log_weights)
    log_norm = torch.logsumexp(lp, dim=1)
    r = torch.exp(lp.sub_(log_norm[:, None]))
    nk = r.sum(0)
    sx = r.T @ x
    if spherical:
        sq = (r * dist).sum(0)
    else:
        sq = (r.T @ (x * x)) - 2.0 * means * sx + nk[:, None] * means * means
        sq = sq.clamp_min_(0.0)
    return EStepStats(log_norm, nk, sx, sq)


def score(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor, center=None):
    """Per-row log-likelihood and most responsible component (rows minus ``center`` when given).

    Returns (log_norm (n,) float32, best (n,) int64).
    """
    x = _centred(x, center)
    lp = log_prob(x, means, var, log_weights)
    return torch.logsumexp(lp, dim=1), lp.argmax(dim=1)


def kmeans_step(x: torch.Tensor, centroids: torch.Tensor, center=None):
    """Assign each row (minus ``center`` when given) to its nearest centroid and return per-cluster sums.

    Returns (labels (n,) int64, min_sq_dist (n,), counts (K,), sums (K, D) of the centred rows), floats in the
    dtype of x.
    """
    x = _centred(x, center)
    dist = _sq_dist(x, centroids)
    min_dist, labels = dist.min(dim=1)
    k = centroids.shape[0]
    counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, torch.ones_like(min_dist))
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    return labels, min_dist, counts, sums


def assign(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor,
           tau: float, max_assign: int, center=None):
    """Multi-assignment of a chunk: per row, the components with responsibility > tau, best first.

    The most responsible component is always kept, even when its responsibility is <= tau, and at most
    ``max_assign`` components are kept per row.

    Returns a chunk-local CSR triple:
    counts (n,) int64, lists (nnz,) int64 and resp (nnz,) float32, rows concatenated in order, and within a
    row the components sorted by decreasing responsibility. Rows minus ``center`` when given.
    """
    lp = log_prob(_centred(x, center), means, var, log_weights)
    log_norm = torch.logsumexp(lp, dim=1, keepdim=True)
    r = torch.exp(lp - log_norm)
    m = min(int(max_assign), r.shape[1])
    if m > 1:   # no more columns than the row with the most components above tau needs (uncapped: K -> a few)
        m = min(m, max(1, int((r > tau).sum(1).max())))
    top_r, top_k = torch.topk(r, m, dim=1, sorted=True)
    keep = top_r > tau
    keep[:, 0] = True
    counts = keep.sum(1)
    return counts.to(torch.int64), top_k[keep].to(torch.int64), top_r[keep].to(torch.float32)
