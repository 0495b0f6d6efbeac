"""Assignment rules for IVF posting lists: single assignment, spilling (SOAR adapted to L2, naive second-nearest,
GMM-responsibility selective spilling) and tau multi-assignment on k-means centroids.

Every rule returns the assignment in CSR form, ready for :func:`flashgmm_faiss.ivf.add_preassigned`:

* ``offsets`` : ndarray of shape (n + 1,), int64 -- row i owns ``lists[offsets[i]:offsets[i + 1]]``;
* ``lists`` : ndarray of shape (nnz,), int64 -- posting-list ids, the primary list first, no duplicates per row.

The L2 rules (:func:`nearest_assign`, :func:`soar_l2_assign`, :func:`second_nearest_assign`) take the primary
list to be the nearest centroid, which is also the list that ``IndexFlatL2`` routing ranks first for a query
equal to the vector. The responsibility rules take the most responsible component as the primary.

Budgeted rules (``max_inflation`` / ``inflation``) add extra copies to the rows that need them most by the rule's
own score, until ``n_postings = round(inflation * n)``: the target is met exactly unless fewer rows are
eligible (then every eligible row gets its copies and the achieved inflation is lower).

All rules stream ``xb`` in chunks of rows, so memory is O(chunk * K + n) however large n is; inputs may be
memory-mapped arrays of any real dtype.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from ._validation import default_tau, is_real_number

__all__ = [
    "nearest_assign",
    "soar_l2_assign",
    "second_nearest_assign",
    "tau_assign_spherical",
    "responsibility_spill_assign",
    "second_responsibility",
    "fit_spherical_variance",
    "csr_stats",
]

_CHUNK_ELEMENTS = 1 << 23  # float32 elements of the largest per-chunk temporary (32 MiB)


# ---------------------------------------------------------------------------------------------- validation
def _check_centroids(centroids) -> np.ndarray:
    c = np.asarray(centroids)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"centroids must be a 2-D array of shape (K, d) with K >= 1, got shape {c.shape}.")
    c = np.ascontiguousarray(c, dtype=np.float32)
    if not np.all(np.isfinite(c)):
        raise ValueError("centroids contain NaN or Inf.")
    return c


def _check_xb(xb, d: int):
    shape = getattr(xb, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"xb must be a 2-D array of shape (n, d), got shape {shape}: reshape a single vector "
                         "with x.reshape(1, -1).")
    if shape[1] != d:
        raise ValueError(f"xb has dimension {shape[1]} but the centroids have dimension {d}.")
    if shape[0] < 1:
        raise ValueError("xb is empty: there is nothing to assign.")
    return int(shape[0])


def _chunks(n: int, row_elements: int, chunk_size=None):
    step = chunk_size or max(64, _CHUNK_ELEMENTS // max(int(row_elements), 1))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _rows(xb, s: int, e: int) -> np.ndarray:
    x = np.ascontiguousarray(xb[s:e], dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"xb rows {s}..{e - 1} contain NaN or Inf.")
    return x


def _flat_index(c: np.ndarray) -> "faiss.IndexFlatL2":
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    return index


def _knn_exact(x: np.ndarray, c: np.ndarray, index, m: int):
    """Indices (n, m) of the m nearest centroids by FAISS, and their squared distances recomputed exactly from
    the differences (FAISS's ||x||^2 - 2<x,c> + ||c||^2 expansion loses digits on uncentred data), re-sorted."""
    _, idx = index.search(x, m)
    diff = x[:, None, :] - c[idx]
    d2 = np.einsum("nmd,nmd->nm", diff, diff, dtype=np.float64)
    order = np.lexsort((idx, d2), axis=1)  # by distance, ties by list id: deterministic
    return np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(d2, order, 1)


def _inflation_budget(n: int, inflation, name: str, max_copies: int) -> int:
    if not isinstance(inflation, (int, float, np.floating, np.integer)) or not math.isfinite(float(inflation)):
        raise ValueError(f"{name} must be a finite number >= 1, got {inflation!r}.")
    if float(inflation) < 1.0:
        raise ValueError(f"{name} must be >= 1 (every vector has its primary list), got {inflation}.")
    if float(inflation) > max_copies:
        raise ValueError(f"{name}={inflation} is more than the {max_copies} copies per vector this rule can make.")
    return int(round((float(inflation) - 1.0) * n))


def _csr(primary: np.ndarray, extra: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Build CSR from primary (n,) and extra copies given as (row, rank, list) triples (rank >= 1)."""
    n = primary.shape[0]
    rows = [np.arange(n, dtype=np.int64)]
    ranks = [np.zeros(n, dtype=np.int64)]
    lists = [primary.astype(np.int64)]
    for r, k, li in extra:
        rows.append(r.astype(np.int64))
        ranks.append(k.astype(np.int64))
        lists.append(li.astype(np.int64))
    rows, ranks, lists = (np.concatenate(a) for a in (rows, ranks, lists))
    order = np.lexsort((ranks, rows))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets, lists[order]


def _select_smallest(score: np.ndarray, budget: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``budget`` smallest finite scores (ties broken by ``tiebreak`` then index)."""
    ok = np.nonzero(np.isfinite(score))[0]
    if budget >= ok.size:
        return ok
    keys = (ok, score[ok]) if tiebreak is None else (ok, tiebreak[ok], score[ok])
    return ok[np.lexsort(keys)[:budget]]


def csr_stats(offsets: np.ndarray, lists: np.ndarray) -> dict:
    """Index-size figures of a CSR assignment: n, n_postings, inflation, max_copies, copies_histogram
    (number of vectors with 0, 1, 2, ... copies)."""
    copies = np.diff(np.asarray(offsets))
    n = int(copies.shape[0])
    return {"n": n, "n_postings": int(len(lists)), "inflation": len(lists) / max(n, 1),
            "max_copies": int(copies.max()) if n else 0, "copies_histogram": np.bincount(copies).tolist()}


# ---------------------------------------------------------------------------------------------- L2 rules
def nearest_assign(xb, centroids, *, chunk_size=None):
    """Single assignment to the nearest centroid (the k-means IVF baseline).

    Parameters
    ----------
    xb : array-like of shape (n, d)
    centroids : array-like of shape (K, d)
    chunk_size : int, optional -- rows per chunk

    Returns
    -------
    offsets : ndarray of shape (n + 1,), int64 (= arange(n + 1))
    lists : ndarray of shape (n,), int64
    """
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    index = _flat_index(c)
    lists = np.empty(n, dtype=np.int64)
    for s, e in _chunks(n, c.shape[1] * 2 + c.shape[0], chunk_size):
        idx, _ = _knn_exact(_rows(xb, s, e), c, index, min(2, c.shape[0]))
        lists[s:e] = idx[:, 0]
    return np.arange(n + 1, dtype=np.int64), lists


def soar_l2_assign(xb, centroids, lam: float = 0.75, n_candidates: int = 10, max_inflation=None, *,
                   rank_by: str = "gap", priority=None, chunk_size=None, return_info: bool = False):
    """SOAR spilling adapted to L2 (as in RAIRS): at most one secondary list per vector.

    With ``r = x - c_p`` the residual to the nearest centroid ``c_p`` (the primary) and ``r' = x - c_j`` the
    residual to a candidate, the candidate loss is ``L_j = ||r'||^2 + lam * <r, r'>``. The candidates are the
    ``n_candidates`` nearest centroids after the primary, plus the primary itself, whose loss is
    ``L_p = ||r||^2 + lam * ||r||^2``. The vector is spilled to ``argmin_j L_j`` only when that loss is strictly
    below ``L_p``; otherwise it gets no copy. (Writing ``delta = c_p - c_j``, spilling happens iff
    ``(2 + lam) <r, delta> + ||delta||^2 < 0``: the vectors in a slab along the bisector of ``c_p`` and ``c_j``.)

    Parameters
    ----------
    xb : array-like of shape (n, d)
    centroids : array-like of shape (K, d)
    lam : float >= 0 -- weight of the residual correlation term (0 = plain second-nearest)
    n_candidates : int >= 1 -- secondary candidates: the nearest centroids after the primary
    max_inflation : float in [1, 2], optional
        Keep only the spills with the most negative loss gap ``L_j - L_p`` (the vectors SOAR helps most), at
        most ``round((max_inflation - 1) * n)`` of them. None keeps every spill.
    rank_by : {"gap", "relative"}
        How the budget ranks the spills: the loss gap ``L_j - L_p``, or the relative gap ``(L_j - L_p) / L_p``
        (scale-free: vectors of wide lists do not crowd out those of tight lists).
    priority : array of shape (n,), optional
        An external budget ranking (smaller = spilled first), e.g. minus the 2nd GMM responsibility
        (:func:`second_responsibility`): the budget then goes to the rows SOAR would spill that rank best by it.
    chunk_size : int, optional
    return_info : bool -- also return a dict with ``gap`` (n,) float64 (inf where no spill is possible)

    Returns
    -------
    offsets : ndarray of shape (n + 1,), int64
    lists : ndarray of shape (nnz,), int64 -- primary first, then the secondary when spilled
    """
    if not isinstance(lam, (int, float, np.floating)) or not math.isfinite(float(lam)) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}.")
    if not isinstance(n_candidates, (int, np.integer)) or n_candidates < 1:
        raise ValueError(f"n_candidates must be an integer >= 1, got {n_candidates!r}.")
    if rank_by not in ("gap", "relative"):
        raise ValueError(f"rank_by must be 'gap' or 'relative', got {rank_by!r}.")
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    K, d = c.shape
    budget = None if max_inflation is None else _inflation_budget(n, max_inflation, "max_inflation", 2)
    if priority is not None:
        priority = np.asarray(priority, dtype=np.float64)
        if priority.shape != (n,) or np.isnan(priority).any():
            raise ValueError(f"priority must be an array of shape ({n},) without NaN.")
    m = min(int(n_candidates) + 1, K)
    index = _flat_index(c)
    primary = np.empty(n, dtype=np.int64)
    second = np.full(n, -1, dtype=np.int64)
    gap = np.full(n, np.inf)
    for s, e in _chunks(n, (m + 1) * d, chunk_size):
        x = _rows(xb, s, e)
        idx, d2 = _knn_exact(x, c, index, m)
        primary[s:e] = idx[:, 0]
        if m < 2:
            continue
        r = (x - c[idx[:, 0]]).astype(np.float64)
        rc = x[:, None, :] - c[idx[:, 1:]]  # (b, m-1, d) candidate residuals r'
        dot = np.einsum("bd,bmd->bm", r, rc.astype(np.float64))
        loss = d2[:, 1:] + lam * dot
        loss_p = (1.0 + lam) * d2[:, 0]
        j = np.argmin(loss, axis=1)  # first minimum = nearest among tied candidates
        best = loss[np.arange(e - s), j]
        g = best - loss_p
        spill = g < 0
        if rank_by == "relative":
            g = g / np.maximum(loss_p, np.finfo(np.float64).tiny)
        second[s:e] = np.where(spill, idx[np.arange(e - s), j + 1], -1)
        gap[s:e] = np.where(spill, g, np.inf)
    score = gap if priority is None else np.where(np.isfinite(gap), priority, np.inf)
    chosen = _select_smallest(score, n if budget is None else budget, tiebreak=None if priority is None else gap)
    offsets, lists = _csr(primary, [(chosen, np.ones_like(chosen), second[chosen])])
    if return_info:
        return offsets, lists, {"gap": gap}
    return offsets, lists


def second_nearest_assign(xb, centroids, inflation, *, max_copies: int = 2, chunk_size=None):
    """Naive spilling: extra copies in the next-nearest lists for the vectors closest to a list boundary.

    The candidate copies are (row i, rank j) for j = 2..max_copies, scored by the squared-distance gap
    ``||x_i - c_(j)||^2 - ||x_i - c_(1)||^2``; the ``round((inflation - 1) * n)`` smallest gaps get a copy. The gap
    grows with the rank, so a row's rank-j copy is only taken after its rank-(j-1) copy (ties: lower rank first).
    The smallest-gap choice (rather than a random subset) spends the budget on the vectors that sit near a
    boundary, which is what spilling is for; it is deterministic.

    Parameters
    ----------
    xb : array-like of shape (n, d)
    centroids : array-like of shape (K, d)
    inflation : float in [1, max_copies] -- target postings per vector
    max_copies : int >= 1 -- copies per vector at most (2 = second nearest only)
    chunk_size : int, optional

    Returns
    -------
    offsets : ndarray of shape (n + 1,), int64
    lists : ndarray of shape (nnz,), int64 -- per row, nearest first
    """
    if not isinstance(max_copies, (int, np.integer)) or max_copies < 1:
        raise ValueError(f"max_copies must be an integer >= 1, got {max_copies!r}.")
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    K, d = c.shape
    m = min(int(max_copies), K)
    budget = _inflation_budget(n, inflation, "inflation", m)
    index = _flat_index(c)
    idx_all = np.empty((n, m), dtype=np.int64)
    gap = np.empty((n, m - 1))
    for s, e in _chunks(n, (m + 1) * d, chunk_size):
        idx, d2 = _knn_exact(_rows(xb, s, e), c, index, m)
        idx_all[s:e] = idx
        gap[s:e] = d2[:, 1:] - d2[:, :1]
    flat = gap.ravel()  # entry i*(m-1) + (j-1) is row i, rank j
    ranks = np.tile(np.arange(1, m, dtype=np.int64), n)
    chosen = _select_smallest(flat, budget, tiebreak=ranks)
    rows, rk = chosen // max(m - 1, 1), ranks[chosen]
    return _csr(idx_all[:, 0], [(rows, rk, idx_all[rows, rk])])


# ---------------------------------------------------------------------------------------------- responsibility rules
def fit_spherical_variance(xt, centroids, *, reg_covar: float = 1e-6, chunk_size=None):
    """Per-list spherical variance and weight of the hard nearest-centroid partition of ``xt``.

    ``variance[k] = mean over members of ||x - c_k||^2 / d + reg_covar`` (lists with fewer than 2 members get the
    pooled variance); ``weights[k]`` = member fraction (floored at 1 / n so that no list has zero prior).
    This is the spherical GMM that a k-means partition implies, with no EM step.

    Returns
    -------
    variance : ndarray of shape (K,), float64
    weights : ndarray of shape (K,), float64, summing to 1
    """
    c = _check_centroids(centroids)
    n = _check_xb(xt, c.shape[1])
    K, d = c.shape
    index = _flat_index(c)
    sse = np.zeros(K)
    cnt = np.zeros(K)
    for s, e in _chunks(n, 2 * d + K, chunk_size):
        idx, d2 = _knn_exact(_rows(xt, s, e), c, index, 1)
        np.add.at(sse, idx[:, 0], d2[:, 0])
        np.add.at(cnt, idx[:, 0], 1.0)
    pooled = sse.sum() / (n * d)
    var = np.where(cnt > 1, sse / np.maximum(cnt, 1) / d, pooled) + reg_covar
    w = np.maximum(cnt, 1.0 / n)
    return var, w / w.sum()


def _check_var_weights(variance, weights, K: int):
    var = np.asarray(variance, dtype=np.float64)
    if var.ndim == 0:
        var = np.full(K, float(var))
    if var.shape != (K,) or not np.all(np.isfinite(var)) or np.any(var <= 0):
        raise ValueError(f"variance must be a positive finite scalar or array of shape ({K},) (one spherical "
                         f"variance per centroid), got shape {var.shape}.")
    if weights is None:
        w = np.full(K, 1.0 / K)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (K,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be a non-negative finite array of shape ({K},).")
        w = w / w.sum()
    return var, w


def _responsibility_topk(x: np.ndarray, c: np.ndarray, center: np.ndarray, var: np.ndarray, logw: np.ndarray,
                         m: int):
    """Top-m responsibilities (descending) and their components for a chunk, float64 log space.

    Distances use the expansion on data centred at the centroid mean, in float64, so they are accurate on
    uncentred inputs such as SIFT."""
    xc = x.astype(np.float64) - center
    cc = c.astype(np.float64) - center
    dist = (xc * xc).sum(1, keepdims=True) - 2.0 * xc @ cc.T + (cc * cc).sum(1)
    np.maximum(dist, 0.0, out=dist)
    d = x.shape[1]
    lp = logw - 0.5 * d * np.log(var) - 0.5 * dist / var
    lp -= lp.max(1, keepdims=True)
    r = np.exp(lp)
    r /= r.sum(1, keepdims=True)
    if m < r.shape[1]:
        part = np.argpartition(-r, m - 1, axis=1)[:, :m]
    else:
        part = np.broadcast_to(np.arange(r.shape[1]), r.shape).copy()
    pr = np.take_along_axis(r, part, 1)
    order = np.lexsort((part, -pr), axis=1)
    return np.take_along_axis(pr, order, 1), np.take_along_axis(part, order, 1).astype(np.int64)


def tau_assign_spherical(xb, centroids, variance, tau=None, max_assign=None, weights=None, *, chunk_size=None):
    """tau multi-assignment under a spherical Gaussian mixture with the given means, variances and weights.

    Responsibility ``p(k | x) ∝ w_k N(x | c_k, variance_k I)``; row i goes to every list with responsibility
    ``> tau``, the most responsible first (always kept), at most ``max_assign`` lists. With k-means centroids and
    :func:`fit_spherical_variance` this is the ablation "tau = 1/K on k-means centroids"; with a fitted
    ``GaussianMixture`` (spherical) it reproduces ``gmm.assign``.

    Parameters
    ----------
    xb : array-like of shape (n, d)
    centroids : array-like of shape (K, d)
    variance : float or array of shape (K,) -- spherical variances
    tau : float in [0, 1), default 1 / K (0 for K = 1: a single list, tau plays no role)
    max_assign : int >= 1, default K
    weights : array of shape (K,), default uniform
    chunk_size : int, optional

    Returns
    -------
    offsets : ndarray of shape (n + 1,), int64
    lists : ndarray of shape (nnz,), int64 -- per row by decreasing responsibility
    """
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    K = c.shape[0]
    var, w = _check_var_weights(variance, weights, K)
    tau = default_tau(K) if tau is None else tau
    if not is_real_number(tau) or not (0.0 <= float(tau) < 1.0):
        raise ValueError(f"tau must be a number in [0, 1), got {tau!r}.")
    if max_assign is None:
        max_assign = K
    if not isinstance(max_assign, (int, np.integer)) or max_assign < 1:
        raise ValueError(f"max_assign must be an integer >= 1, got {max_assign!r}.")
    # At most floor(1/tau) components can exceed tau (responsibilities sum to 1): no need to sort more.
    m = int(min(max_assign, K, math.floor(1.0 / tau) + 1 if tau > 0 else K))
    center = c.astype(np.float64).mean(0)
    logw = np.log(np.maximum(w, 1e-300))
    counts, lists = [], []
    for s, e in _chunks(n, 3 * K, chunk_size):
        pr, li = _responsibility_topk(_rows(xb, s, e), c, center, var, logw, m)
        keep = pr > tau
        keep[:, 0] = True
        counts.append(keep.sum(1))
        lists.append(li[keep])
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=offsets[1:])
    return offsets, np.concatenate(lists).astype(np.int64)


def second_responsibility(xb, centroids, variance, weights=None, *, chunk_size=None) -> np.ndarray:
    """Second-largest responsibility of every row under a spherical mixture, shape (n,), float64 (the
    ambiguity of the row's list membership: 0 = certain, 0.5 = tied between two lists)."""
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    K = c.shape[0]
    var, w = _check_var_weights(variance, weights, K)
    if K < 2:
        return np.zeros(n)
    center = c.astype(np.float64).mean(0)
    logw = np.log(np.maximum(w, 1e-300))
    out = np.empty(n)
    for s, e in _chunks(n, 3 * K, chunk_size):
        pr, _ = _responsibility_topk(_rows(xb, s, e), c, center, var, logw, 2)
        out[s:e] = pr[:, 1]
    return out


def responsibility_spill_assign(xb, centroids, variance, inflation, weights=None, *, chunk_size=None):
    """Selective spilling by responsibility: primary = most responsible component; the vectors with the largest
    second responsibility get one copy in their second most responsible list, ``round((inflation - 1) * n)``
    copies in all.

    This is the tau rule turned into a budget: instead of a fixed threshold (whose index size depends on the data
    and can explode at low dimension), the threshold on the 2nd responsibility is set to give the target size.

    Parameters
    ----------
    xb : array-like of shape (n, d)
    centroids : array-like of shape (K, d) -- GMM means (or k-means centroids)
    variance : float or array of shape (K,) -- spherical variances
    inflation : float in [1, 2]
    weights : array of shape (K,), default uniform
    chunk_size : int, optional

    Returns
    -------
    offsets : ndarray of shape (n + 1,), int64
    lists : ndarray of shape (nnz,), int64 -- most responsible first
    """
    c = _check_centroids(centroids)
    n = _check_xb(xb, c.shape[1])
    K = c.shape[0]
    var, w = _check_var_weights(variance, weights, K)
    m = min(2, K)
    budget = _inflation_budget(n, inflation, "inflation", m)
    center = c.astype(np.float64).mean(0)
    logw = np.log(np.maximum(w, 1e-300))
    top = np.empty((n, m), dtype=np.int64)
    r2 = np.full(n, -np.inf)
    for s, e in _chunks(n, 3 * K, chunk_size):
        pr, li = _responsibility_topk(_rows(xb, s, e), c, center, var, logw, m)
        top[s:e] = li
        if m > 1:
            r2[s:e] = pr[:, 1]
    chosen = _select_smallest(-r2, budget) if m > 1 else np.zeros(0, dtype=np.int64)
    return _csr(top[:, 0], [(chosen, np.ones_like(chosen), top[chosen, 1])] if m > 1 else [])

