"""Deduplicating IVF search with distance-computation (DCO) counts, recall, and nprobe sweeps.

DCO is the number of vector-to-vector distances a query costs:

* ``scan``: distances computed while scanning the probed posting lists. Copies of a multi-assigned vector are
  each scanned, so they are counted -- this is what FAISS reports in ``faiss.cvar.indexIVF_stats.ndis``.
* ``routing``: distances to coarse centroids to choose the lists (``nlist`` per query for a flat quantizer).

Everything works the same for a :class:`~flashgmm_faiss.ivf.GMMIVFIndex` and for a plain FAISS ``IndexIVF``
(k-means or spilled), so baselines and GMM indexes are measured by one code path.
"""
from __future__ import annotations

import numbers
import time
from typing import NamedTuple

import faiss
import numpy as np

from ._validation import as_float32_matrix, check_positive_int
from .ivf import GMMIVFIndex, _as_ivf, list_sizes, max_copies


class DCO(NamedTuple):
    """Per-query distance computations: ``scan`` and ``routing`` are arrays of shape (nq,), int64."""

    scan: np.ndarray
    routing: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.scan + self.routing


def _routing_cost(ivf, nq: int) -> np.ndarray:
    q = faiss.downcast_index(ivf.quantizer)
    if isinstance(q, faiss.IndexHNSW):
        cost = faiss.cvar.hnsw_stats.ndis / max(nq, 1)
        return np.full(nq, int(round(cost)), dtype=np.int64)
    return np.full(nq, ivf.nlist, dtype=np.int64)


def dedup_topk(D: np.ndarray, I: np.ndarray, k: int, larger_is_better: bool = False):
    """Keep the best occurrence of each id per row and return the top k.

    D, I : arrays of shape (nq, kk) (kk >= k), as returned by FAISS (-1 ids are padding).
    Returns D, I of shape (nq, k), padded with (+inf or -inf, -1).
    """
    nq, kk = I.shape
    key = -D if larger_is_better else D
    key = np.where(I < 0, np.inf, key)
    order = np.lexsort((key, I), axis=1)  # by id, then by distance
    Is = np.take_along_axis(I, order, axis=1)
    Ks = np.take_along_axis(key, order, axis=1)
    dup = np.zeros_like(Is, dtype=bool)
    dup[:, 1:] = Is[:, 1:] == Is[:, :-1]
    dup |= Is < 0
    Ks = np.where(dup, np.inf, Ks)
    Is = np.where(dup, -1, Is)
    best = np.argsort(Ks, axis=1, kind="stable")[:, :k]
    Ko = np.take_along_axis(Ks, best, axis=1)
    Io = np.take_along_axis(Is, best, axis=1)
    if kk < k:
        Ko = np.pad(Ko, ((0, 0), (0, k - kk)), constant_values=np.inf)
        Io = np.pad(Io, ((0, 0), (0, k - kk)), constant_values=-1)
    Do = (-Ko if larger_is_better else Ko).astype(np.float32)
    return Do, Io.astype(np.int64)


def search_with_dco(index, xq, k: int = 10, nprobe: int = 1, *, copies: int | None = None):
    """Deduplicated IVF search that also counts distance computations.

    Parameters
    ----------
    index : GMMIVFIndex or faiss.IndexIVF
    xq : array of shape (nq, d) -- queries (normalised here for an angular GMMIVFIndex)
    k : int >= 1 -- neighbours per query
    nprobe : int >= 1 -- posting lists scanned per query (at most nlist are)
    copies : int >= 1, optional
        The largest number of copies of one vector in the index; read from the index when omitted (for a plain
        FAISS index that costs a pass over its ids: pass it when calling in a loop). It must be at least the true
        largest copy count: results are always deduplicated when it is given, so an underestimate cannot return
        duplicates, but it can miss true neighbours or pad rows with -1 (FAISS is asked for too few candidates).

    Returns
    -------
    D : ndarray (nq, k), float32 -- distances (squared L2, or inner products for an IP index), best first
    I : ndarray (nq, k), int64 -- ids, each at most once per row; -1 pads when fewer than k were scanned
    dco : DCO -- per-query ``scan`` (copies included) and ``routing`` distance computations

    Notes
    -----
    A vector stored c times can fill c slots of FAISS's top list, so FAISS is asked for
    ``k * min(copies, nprobe)`` results, which provably contains the k best distinct vectors of the scanned
    lists; the duplicates are then removed. Only when ``copies`` is omitted and the index has no copies (read from
    it) are FAISS's results returned as they are.
    """
    ivf = _as_ivf(index)
    k = check_positive_int(k, "k")
    nprobe = check_positive_int(nprobe, "nprobe")
    if copies is not None:
        copies = check_positive_int(copies, "copies")
    xq = _queries(index, ivf, xq)
    c = max_copies(index) if copies is None else copies
    return _search(ivf, xq, k, nprobe, c, dedup=copies is not None or c > 1)


def _queries(index, ivf, xq) -> np.ndarray:
    """(nq, d) float32 queries, checked against the index's d, unit-normalised for an angular GMMIVFIndex."""
    if isinstance(index, GMMIVFIndex):
        return index._prep(xq, "xq")
    return as_float32_matrix(xq, "xq", d=ivf.d)


def _search(ivf, xq: np.ndarray, k: int, nprobe: int, c: int, dedup: bool):
    """:func:`search_with_dco` on checked arguments: ``c`` copies at most, ``dedup`` False only when the index is
    known to hold one copy of each id."""
    nprobe = min(nprobe, ivf.nlist)
    kk = k * max(1, min(c, nprobe))
    nq = xq.shape[0]

    faiss.cvar.hnsw_stats.reset()
    Dq, Iq = ivf.quantizer.search(xq, nprobe)
    routing = _routing_cost(ivf, nq)
    sizes = list_sizes(ivf)
    scan = np.where(Iq >= 0, sizes[np.maximum(Iq, 0)], 0).sum(1).astype(np.int64)

    old_nprobe = ivf.nprobe
    ivf.nprobe = nprobe
    try:
        faiss.cvar.indexIVF_stats.reset()
        D, I = ivf.search_preassigned(xq, kk, Iq, Dq)
        ndis = int(faiss.cvar.indexIVF_stats.ndis)
    finally:
        ivf.nprobe = old_nprobe
    if ndis != int(scan.sum()) and ivf.max_codes == 0:
        raise RuntimeError(f"DCO bookkeeping mismatch: FAISS scanned {ndis} codes, list sizes say {int(scan.sum())}.")
    larger = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    if dedup or kk > k:
        D, I = dedup_topk(D, I, k, larger_is_better=larger)
    else:  # FAISS pads with +-FLT_MAX: use +-inf, as dedup_topk does
        D = np.where(I < 0, -np.inf if larger else np.inf, D).astype(np.float32)
    return D, I, DCO(scan, routing)


def _check_gt(nq: int, gt, k: int) -> np.ndarray:
    gt = np.asarray(gt)
    if gt.ndim != 2 or gt.shape[0] != nq:
        raise ValueError(f"gt must be 2-D with one row per query ({nq}), got shape {gt.shape}.")
    if gt.shape[1] < k:
        raise ValueError(f"recall@{k} needs at least {k} columns in gt ({gt.shape[1]}).")
    return gt


def recall_at_k(I, gt, k: int = 10) -> float:
    """Recall@k: the fraction of the true k nearest neighbours found among the first k results, averaged.

    I : (nq, >=k) result ids; gt : (nq, >=k) ground-truth ids, nearest first; k : int >= 1.
    """
    k = check_positive_int(k, "k")
    I = np.asarray(I)
    gt = np.asarray(gt)
    if I.ndim != 2 or gt.ndim != 2 or I.shape[0] != gt.shape[0]:
        raise ValueError(f"I and gt must be 2-D with one row per query, got {I.shape} and {gt.shape}.")
    if I.shape[1] < k or gt.shape[1] < k:
        raise ValueError(f"recall@{k} needs at least {k} columns in I ({I.shape[1]}) and gt ({gt.shape[1]}).")
    hits = 0
    for row_i, row_g in zip(I[:, :k], gt[:, :k]):
        hits += np.intersect1d(row_i[row_i >= 0], row_g).size
    return hits / (k * I.shape[0])


def pareto_frontier(rows, key: str = "dco_scan_per_query"):
    """Pareto frontier of sweep rows: (cost, recall) arrays, cost ascending and recall strictly increasing."""
    xs, ys, best = [], [], -1.0
    for x, y in sorted((r[key], r["recall_at_10"]) for r in rows):
        if y > best:
            xs.append(x)
            ys.append(y)
            best = y
    return np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)


def cost_on_frontier(xs: np.ndarray, ys: np.ndarray, target: float):
    """Cost needed to reach recall ``target`` on a frontier from :func:`pareto_frontier`, interpolating log(cost)
    linearly in recall between neighbouring points. None when the frontier never reaches ``target``; the cheapest
    point's cost when it already does."""
    if ys.size == 0 or ys[-1] < target:
        return None
    i = int(np.searchsorted(ys, target))  # first point with recall >= target
    if i == 0:
        return float(xs[0])
    t = (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return float(np.exp(np.log(xs[i - 1]) + t * (np.log(xs[i]) - np.log(xs[i - 1]))))


def dco_at_recall(rows, target: float, key: str = "dco_scan_per_query"):
    """DCO per query needed to reach recall@10 ``target`` on a :func:`sweep`'s rows (None if never reached)."""
    return cost_on_frontier(*pareto_frontier(rows, key), target)


def default_nprobes(nlist: int) -> list[int]:
    out, p = [], 1
    while p < nlist:
        out.append(p)
        p *= 2
    out.append(nlist)
    return out


def _check_nprobes(nprobes) -> list[int]:
    if isinstance(nprobes, numbers.Integral) and not isinstance(nprobes, bool):
        nprobes = [nprobes]
    elif isinstance(nprobes, (str, bytes)) or not hasattr(nprobes, "__iter__"):
        raise TypeError(f"nprobes must be an int or an iterable of ints, got {nprobes!r}.")
    out = [check_positive_int(p, "each nprobe") for p in nprobes]
    if not out:
        raise ValueError("nprobes is empty: give at least one nprobe (or None for 1, 2, 4, ..., nlist).")
    return out


def sweep(index, xq, gt, k: int = 10, nprobes=None, *, verbose: bool = False) -> list[dict]:
    """Recall@k against DCO for a list of nprobe values.

    Parameters
    ----------
    index : GMMIVFIndex or faiss.IndexIVF
    xq : array of shape (nq, d); gt : array of shape (nq, >=k), true neighbour ids
    k : int >= 1
    nprobes : int or iterable of int >= 1, default 1, 2, 4, ..., nlist
        A single int is one sweep point. Values above nlist scan every list (the row keeps the value given).

    Returns
    -------
    list of dict, one per nprobe, with ``nprobe``, ``recall_at_10`` (recall@k for the given k), ``k``,
    ``dco_scan_per_query``, ``dco_routing_per_query``, ``dco_total_per_query``, ``qps`` and ``seconds``.
    """
    ivf = _as_ivf(index)
    k = check_positive_int(k, "k")
    nprobes = default_nprobes(ivf.nlist) if nprobes is None else _check_nprobes(nprobes)
    xq = _queries(index, ivf, xq)
    gt = _check_gt(xq.shape[0], gt, k)
    c = max_copies(index)
    rows = []
    for p in nprobes:
        t0 = time.perf_counter()
        _, I, dco = _search(ivf, xq, k, p, c, dedup=c > 1)
        dt = time.perf_counter() - t0
        r = recall_at_k(I, gt, k)
        rows.append({"nprobe": p, "k": k, "recall_at_10": r,
                     "dco_scan_per_query": float(dco.scan.mean()),
                     "dco_routing_per_query": float(dco.routing.mean()),
                     "dco_total_per_query": float(dco.total.mean()),
                     "qps": xq.shape[0] / dt if dt > 0 else float("inf"), "seconds": dt})
        if verbose:
            print(f"  nprobe={p:5d} recall@{k}={r:.4f} scan DCO/q={rows[-1]['dco_scan_per_query']:.0f}", flush=True)
    return rows
