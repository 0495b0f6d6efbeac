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

Accuracy of the float32 expansion. The logits come from one GEMM expansion, sum_d p_kd (x_d^2 - 2 x_d mu_kd +
mu_kd^2) (p = 1 / var), whose float32 rounding error is about EXPANSION_ERROR * eps32 * (A_ik + C_k) nats with
A_ik = sum_d x_id^2 / (2 var_kd) and C_k = sum_d mu_kd^2 / (2 var_kd). For a component collapsed onto duplicate
rows (variance at the ``reg_covar`` floor) that is tens of nats, although the true distance is ~0. Every function
below that computes logits (:func:`log_prob`, :func:`estep`, :func:`score`, :func:`assign`) therefore bounds that
error per component over the chunk's rows (:func:`_flag_async`: the largest row and per-feature squares,
O(n D + K D)) and recomputes the logits of the components whose bound exceeds EXPANSION_TOL nats in float64 (the
same expansion: its error shrinks by 2^29), or as direct differences sum_d p_kd (x_d - mu_kd)^2 where even float64
is not enough (:func:`_exact_quad`); :func:`estep` recomputes those components' ``sq`` (which cancels alike) in
float64 too. In a normal problem no component qualifies and the cost is the bound alone; a diag fit whose variances
reach the floor in some features (SIFT: features that are 0 throughout a cluster) can have every component
recomputed, and needs it. The recomputation runs in row pieces of about one (chunk, K) float32 matrix. Choosing the
components reads K verdicts on the host (on CUDA computed and copied before the GEMMs, so the read does not wait for
them); under CUDA-graph capture (the Triton backend's torch fallback for D > 256) every component is recomputed in
float64 and the flagged ones kept, with no sync. The bound is that of IEEE float32 GEMMs: under
``torch.backends.cuda.matmul.allow_tf32`` the components left in float32 keep the TF32 error that switch asks for.
Float64 inputs (the kernels' test oracle) take the plain expansion, unchanged. :func:`kmeans_step` (no logits)
keeps the plain float32 distances.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_2PI = math.log(2.0 * math.pi)
# logits whose float32 expansion error bound exceeds EXPANSION_TOL nats are recomputed (module docstring); the
# bound's constant: the largest ratio |error| / (eps * (A + C)) measured on CPU sgemm was 6.2 (D = 2..960)
EXPANSION_TOL = 1e-3
EXPANSION_ERROR = 8.0


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


def _sq_dist(x: torch.Tensor, means: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """(n, K) squared Euclidean distances through one GEMM, clamped at 0 (``x2``: the (n, 1) squared row norms)."""
    if x2 is None:
        x2 = (x * x).sum(1, keepdim=True)
    m2 = (means * means).sum(1)
    return (x2 - 2.0 * (x @ means.T) + m2).clamp_min_(0.0)


def _spherical_log_prob(dist: torch.Tensor, d: int, var: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    return log_weights - 0.5 * (d * (LOG_2PI + torch.log(var))) - 0.5 * dist / var


class _Flagged(NamedTuple):
    """Components whose float32 logits are recomputed (:func:`_flag_async`).

    cols   : (m,) int64 indices of those components, or None: all K, under CUDA-graph capture (see ``mask``).
    mask   : (K,) bool, the flagged components (used when ``cols`` is None).
    direct : positions in ``cols`` of the components where even the float64 expansion is not accurate enough
             (computed as direct differences); empty under capture (float64 expansion only).
    """

    cols: torch.Tensor | None
    mask: torch.Tensor
    direct: tuple


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph on the current stream (no host sync allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def expansion_terms(x2_max: torch.Tensor | None, row_max, means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(K,) bound of A_ik + C_k over rows (the expansion's positive terms, module docstring): the float32 error of
    component k's expanded logits is at most about ``EXPANSION_ERROR * eps32`` times it.

    x2_max : (D,) per-feature bound of the rows' squares (diag only; None for spherical); row_max : bound of the
    rows' squared norms ||x_i||^2; means : (K, D); var : (K,) or (K, D). Shared by this backend's recomputation
    rule and the test of :mod:`flashgmm_faiss._collapsed` (the Triton backend's).
    """
    half = 0.5 / var
    if var.ndim == 1:     # A_ik + C_k <= (max_i ||x_i||^2 + ||mu_k||^2) / (2 var_k)
        return (row_max + (means * means).sum(1)) * half
    # A_ik <= min(sum_d max_i x_id^2 p_kd, max_i ||x_i||^2 max_d p_kd), p = 1 / (2 var)
    a = torch.minimum(half @ x2_max, row_max * half.amax(1))
    return a + (means * means * half).sum(1)


def _flag_async(x2: torch.Tensor, means: torch.Tensor, var: torch.Tensor):
    """Start choosing the components of a chunk whose expanded logits may be off by more than EXPANSION_TOL nats.

    Called before the chunk's GEMMs: on CUDA the (K,) verdicts travel to pinned host memory behind an event, so
    that reading them later waits for this bound only, not for the GEMMs queued after it.

    Parameters
    ----------
    x2 : (n, D) squared centred rows, or (n, 1) their sums (spherical)
    means : (K, D)
    var : (K,) or (K, D)

    Returns
    -------
    resolve : callable () -> _Flagged or None (None: no component flagged, an empty chunk or float64 inputs, which
        are never recomputed).
    """
    if x2.dtype == torch.float64 or x2.shape[0] == 0:
        return lambda: None
    row_max = x2.sum(1).max() if x2.shape[1] > 1 else x2.max()
    terms = expansion_terms(x2.amax(0) if var.ndim == 2 else None, row_max, means, var)
    mask = EXPANSION_ERROR * torch.finfo(x2.dtype).eps * terms > EXPANSION_TOL
    if _capturing(mask):    # no host sync: every component recomputed, the flagged ones kept
        flags = _Flagged(None, mask, ())
        return lambda: flags
    # 0 accurate, 1 float64 expansion, 2 direct differences
    level = mask.to(torch.int8) + (EXPANSION_ERROR * torch.finfo(torch.float64).eps * terms > EXPANSION_TOL)
    done = None
    if level.is_cuda:
        host = torch.empty(level.shape, dtype=level.dtype, pin_memory=True)
        host.copy_(level, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host = level

    def resolve():
        if done is not None:
            done.synchronize()
        cols = torch.nonzero(host).flatten()
        if cols.numel() == 0:
            return None
        direct = tuple(torch.nonzero(host[cols] == 2).flatten().tolist())
        if mask.is_cuda:
            cols = cols.pin_memory().to(mask.device, non_blocking=True)
        return _Flagged(cols, mask, direct)

    return resolve


def _flagged(x2: torch.Tensor, means: torch.Tensor, var: torch.Tensor) -> _Flagged | None:
    """:func:`_flag_async`, resolved at once."""
    return _flag_async(x2, means, var)()


def _row_pieces(n: int, k: int, m: int, d: int):
    """Row slices of a chunk for a float64 recomputation of m of its K columns: ~16 (m + D) bytes per row, at most
    about one (n, K) float32 matrix per piece."""
    step = max(1, (n * k) // (4 * (m + d)))
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def _exact_quad(x: torch.Tensor, means: torch.Tensor, prec: torch.Tensor | None, direct: tuple) -> torch.Tensor:
    """(n, m) float64 sum_d prec_kd (x_id - mu_kd)^2 (``prec`` None: squared distances) of m components.

    x (n, D) float32 rows, means (m, D), prec (m, D) float64 or None, direct: positions of the components computed
    as direct differences (no cancellation at all) instead of the float64 expansion."""
    x64, m64 = x.double(), means.double()
    x2 = x64 * x64
    if prec is None:
        out = x2.sum(1, keepdim=True) - 2.0 * (x64 @ m64.T) + (m64 * m64).sum(1)
    else:
        out = x2 @ prec.T - 2.0 * (x64 @ (m64 * prec).T) + (m64 * m64 * prec).sum(1)
    out.clamp_min_(0.0)
    for j in direct:
        diff2 = (x64 - m64[j]).square_()
        out[:, j] = diff2.sum(1) if prec is None else diff2 @ prec[j]
    return out


def _refine(out: torch.Tensor, x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, flags: _Flagged,
            finish) -> None:
    """Overwrite the flagged columns of ``out`` (n, K) in place with ``finish(quad64, cols)`` of their exact quadratic
    forms (:func:`_exact_quad`, sum_d (x - mu)^2 / var_kd for diag, the squared distances for spherical), computed in
    row pieces; ``cols`` is the (m,) index tensor, or None for all components (capture: the flagged ones are kept by
    ``flags.mask``)."""
    n, k = out.shape
    cols = flags.cols
    sub_means = means if cols is None else means[cols]
    prec = None
    if var.ndim == 2:
        prec = 1.0 / (var if cols is None else var[cols]).double()
    for rows in _row_pieces(n, k, k if cols is None else cols.numel(), x.shape[1]):
        val = finish(_exact_quad(x[rows], sub_means, prec, flags.direct), cols).to(out.dtype)
        if cols is None:
            out[rows] = torch.where(flags.mask, val, out[rows])
        else:
            out[rows, cols] = val


def _accurate_sq_dist(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(n, K) squared distances (:func:`_sq_dist`), recomputed for the components whose logits need it."""
    x2 = (x * x).sum(1, keepdim=True)
    pending = _flag_async(x2, means, var)
    dist = _sq_dist(x, means, x2)
    flags = pending()
    if flags is not None:
        _refine(dist, x, means, var, flags, lambda q, cols: q)
    return dist


def _diag_log_prob(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor):
    """Diag :func:`log_prob`: (lp (n, K), x*x (n, D), the recomputed components' :class:`_Flagged` or None)."""
    d = x.shape[1]
    prec = 1.0 / var
    x2 = x * x
    pending = _flag_async(x2, means, var)
    quad = x2 @ prec.T - 2.0 * (x @ (means * prec).T) + (means * means * prec).sum(1)
    quad = quad.clamp_min_(0.0)
    lp = log_weights - 0.5 * (d * LOG_2PI + torch.log(var).sum(1)) - 0.5 * quad
    flags = pending()
    if flags is not None:
        const = log_weights.double() - 0.5 * (d * LOG_2PI + torch.log(var.double()).sum(1))

        def finish(q, cols):
            return (const if cols is None else const[cols]) - 0.5 * q

        _refine(lp, x, means, var, flags, finish)
    return lp, x2, flags


def log_prob(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Weighted log densities log w_k + log N(x_i | mu_k, var_k), shape (n, K).

    x (n, D), means (K, D), var (K,) or (K, D), log_weights (K,). Components whose float32 expansion could be off
    by more than EXPANSION_TOL nats are recomputed (module docstring)."""
    d = x.shape[1]
    if var.ndim == 1:
        return _spherical_log_prob(_accurate_sq_dist(x, means, var), d, var, log_weights)
    return _diag_log_prob(x, means, var, log_weights)[0]


def _exact_diag_sq(x: torch.Tensor, r: torch.Tensor, means: torch.Tensor, flags: _Flagged) -> torch.Tensor:
    """(m, D) float64 sum_i r_ik (x_i - mu_k)^2 of the flagged components (all K under capture), in row pieces:
    the float64 expansion (exact up to 2^-52 of its terms), or direct differences for ``flags.direct``."""
    n, k = r.shape
    cols = flags.cols
    sub = means.double() if cols is None else means[cols].double()
    m = sub.shape[0]
    acc = torch.zeros(3, m, x.shape[1], dtype=torch.float64, device=x.device)   # sum r x^2, sum r x, sum r
    exact = torch.zeros(m, x.shape[1], dtype=torch.float64, device=x.device)
    direct = list(flags.direct)
    for rows in _row_pieces(n, k, m, x.shape[1]):
        x64 = x[rows].double()
        r64 = (r[rows] if cols is None else r[rows][:, cols]).double()
        acc[0] += r64.T @ (x64 * x64)
        acc[1] += r64.T @ x64
        acc[2] += r64.sum(0)[:, None]
        for j in direct:
            exact[j] += r64[:, j] @ (x64 - sub[j]).square_()
    sq = (acc[0] - 2.0 * sub * acc[1] + acc[2] * sub * sub).clamp_min_(0.0)
    if direct:
        sq[direct] = exact[direct]
    return sq


def _centred(x: torch.Tensor, center) -> torch.Tensor:
    return x if center is None else x - center


def estep(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_weights: torch.Tensor,
          center=None) -> EStepStats:
    """One E-step over a chunk: log-likelihoods and responsibility-weighted sufficient statistics.

    ``center`` (D,), when given, is subtracted from the rows first (means are in the centred frame)."""
    x = _centred(x, center)
    spherical = var.ndim == 1
    flags = None
    if spherical:  # the distances serve both the logits and sum r ||x - mu||^2: one GEMM saved
        dist = _accurate_sq_dist(x, means, var)
        lp = _spherical_log_prob(dist, x.shape[1], var, log_weights)
    else:
        lp, x2, flags = _diag_log_prob(x, means, var, log_weights)
    log_norm = torch.logsumexp(lp, dim=1)
    r = torch.exp(lp.sub_(log_norm[:, None]))
    nk = r.sum(0)
    sx = r.T @ x
    if spherical:
        sq = (r * dist).sum(0)
    else:
        sq = (r.T @ x2) - 2.0 * means * sx + nk[:, None] * means * means
        sq = sq.clamp_min_(0.0)
        if flags is not None:   # the same cancellation, in the M-step's variances: recomputed in float64
            exact = _exact_diag_sq(x, r, means, flags).to(sq.dtype)
            if flags.cols is None:
                sq = torch.where(flags.mask[:, None], exact, sq)
            else:
                sq[flags.cols] = exact
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
