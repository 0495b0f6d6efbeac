"""GMM means as FAISS IVF coarse centroids, multi-assignment add, deduplicating search, save/load.

Two levels of API:

* :func:`build_gmm_ivf` and :class:`GMMIVFIndex`: the one-call path. The index is a real
  ``faiss.IndexIVFFlat`` (``GMMIVFIndex.faiss_index``) whose quantizer holds the GMM means; vectors are added to
  every list whose responsibility exceeds ``tau`` (default 1/K; 0 for K = 1, where every vector has one list), the
  best list always included, at most ``max_assign`` copies. Search deduplicates the copies and returns the true
  top-k among the scanned vectors.
* :func:`train_ivf_with_gmm`, :func:`add_multi_assigned`, :func:`add_preassigned`: the same operations on any
  FAISS ``IndexIVF`` (``IVF1024,PQ16``, ``IVF4096_HNSW32,Flat``, ...), so the GMM can replace k-means inside an
  index built with ``faiss.index_factory``. They refuse a :class:`GMMIVFIndex` and its ``faiss_index`` (use
  ``GMMIVFIndex.add``, which keeps the index's ids and copy counts), and refuse ids already stored in the index.

Vocabulary follows ``faiss/contrib``: xb (database), xq (queries), xt (training), nlist = K, nprobe.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
import weakref

import faiss
import numpy as np

from ._validation import as_float32_matrix, check_ids, check_positive_int, check_shape, default_tau, is_real_number
from .gmm import GaussianMixture, NotFittedError

METRICS = ("l2", "angular")
# "tau": the paper's rule (every component with responsibility > tau, best first, optional cap).
# "soar": SOAR spilling adapted to L2 on the GMM means: primary = nearest mean, at most one secondary chosen by the
#         SOAR loss, optionally only for the vectors with the most negative loss gap up to ``spill_budget``.
ASSIGNMENTS = ("tau", "soar")
_ADD_BATCH = 1 << 16  # source rows per add_core call: bounds the memory of replicated rows
_SIDECAR_SUFFIX = ".gmm.npz"
_DEFAULT_SOAR_LAMBDA = 0.75
# address of a live GMMIVFIndex's faiss_index (its C++ object) -> that GMMIVFIndex, so that the low-level add
# functions can refuse it even when handed the bare faiss index
_OWNERS: "weakref.WeakValueDictionary[int, GMMIVFIndex]" = weakref.WeakValueDictionary()


# ---------------------------------------------------------------------------------------------- helpers
def _as_ivf(index) -> "faiss.IndexIVF":
    """Return the faiss.IndexIVF inside ``index`` (a GMMIVFIndex, an IndexIVF or an IndexIDMap-free wrapper)."""
    if isinstance(index, GMMIVFIndex):
        return index.faiss_index
    if not isinstance(index, faiss.Index):
        raise TypeError(f"expected a faiss IndexIVF or a GMMIVFIndex, got {type(index).__name__}.")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise TypeError(f"{type(index).__name__} is not an IVF index: multi-assignment and DCO counting need a "
                        "faiss.IndexIVF (for example faiss.index_factory(d, 'IVF1024,Flat')).")
    if ivf is not index and not isinstance(index, faiss.IndexIVF):
        raise TypeError(f"{type(index).__name__} wraps an IVF index behind a transform; pass the inner IndexIVF "
                        "and apply the transform to the vectors yourself.")
    return ivf


def _address(index):
    """The C++ address of a SWIG-wrapped faiss object (equal for every Python proxy of it), or None."""
    try:
        return int(index.this)
    except (AttributeError, TypeError, ValueError):
        return None


def _owner_of(index):
    """The live GMMIVFIndex whose ``faiss_index`` is the C++ object behind ``index``, or None."""
    addr = _address(index)
    owner = None if addr is None else _OWNERS.get(addr)
    if owner is not None and _address(owner.faiss_index) == addr:
        return owner
    return None


def _plain_ivf(index, caller: str) -> "faiss.IndexIVF":
    """:func:`_as_ivf` for the low-level add functions: refuses a GMMIVFIndex and the faiss_index of a live one,
    whose ids, ntotal, copy counts and angular normalisation only ``GMMIVFIndex.add`` keeps up to date."""
    what = None
    if isinstance(index, GMMIVFIndex):
        what = "a GMMIVFIndex"
    elif isinstance(index, faiss.Index) and _owner_of(index) is not None:
        what = "the faiss_index of a GMMIVFIndex"
    ivf = None if what else _as_ivf(index)
    if ivf is not None and _owner_of(ivf) is not None:
        what = "an index that wraps the faiss_index of a GMMIVFIndex"
    if what:
        raise TypeError(f"{caller} does not take {what}: adding behind its back skips its bookkeeping (ids, ntotal, "
                        "max_copies, angular normalisation) and can store duplicate ids. Call index.add(xb, ids) on "
                        "the GMMIVFIndex instead.")
    return ivf


def _is_number(value) -> bool:
    """A finite real number (Python or numpy, not a bool)."""
    return is_real_number(value) and math.isfinite(float(value))


def _check_gmm(gmm) -> None:
    if not (hasattr(gmm, "assign") and hasattr(gmm, "predict")):
        raise TypeError(f"gmm must be a flashgmm_faiss.GaussianMixture, got {type(gmm).__name__}.")
    if not hasattr(gmm, "means_"):
        raise NotFittedError("gmm is not fitted yet: call gmm.fit(xt) (or train_ivf_with_gmm) first.")


def _check_index_options(assignment, tau, max_assign, spill_budget, soar_lambda, *, cli: bool = False):
    """Validate the multi-assignment settings (before any fit).

    Returns (tau, max_assign, spill_budget, soar_lambda) with tau, spill_budget as float or None and soar_lambda
    a float (0.75 when not given). ``cli=True`` names the command-line flags in the messages.
    """
    if cli:
        n = {"tau": "--tau", "max_assign": "--max-assign", "spill_budget": "--spill-budget",
             "soar_lambda": "--soar-lambda", "assignment": "--assignment", "soar": "--assignment soar",
             "tau_rule": "--assignment tau (the default)"}
    else:
        n = {"tau": "tau", "max_assign": "max_assign", "spill_budget": "spill_budget", "soar_lambda": "soar_lambda",
             "assignment": "assignment", "soar": "assignment='soar'", "tau_rule": "assignment='tau' (the default)"}
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"{n['assignment']} must be one of {ASSIGNMENTS}, got {assignment!r}.")
    if tau is not None and (not _is_number(tau) or not 0.0 <= float(tau) < 1.0):
        raise ValueError(f"{n['tau']} must be a number in [0, 1) (a responsibility threshold; leave it unset for "
                         f"the default 1/K), got {tau!r}.")
    if max_assign is not None:
        max_assign = check_positive_int(max_assign, n["max_assign"])
    if spill_budget is not None and (not _is_number(spill_budget) or not 1.0 <= float(spill_budget) <= 2.0):
        raise ValueError(f"{n['spill_budget']} is a target inflation in [1, 2] (postings per vector, e.g. 1.6), "
                         f"got {spill_budget!r}.")
    if soar_lambda is not None and (not _is_number(soar_lambda) or float(soar_lambda) < 0):
        raise ValueError(f"{n['soar_lambda']} must be a finite number >= 0, got {soar_lambda!r}.")
    if assignment == "soar" and (tau is not None or max_assign not in (None, 2)):
        raise ValueError(f"{n['tau']} and {n['max_assign']} apply to {n['tau_rule']}; {n['soar']} stores at most 2 "
                         f"copies, limited by {n['spill_budget']}: drop them.")
    if assignment == "tau" and (spill_budget is not None or soar_lambda is not None):
        given = " and ".join(n[k] for k, v in (("spill_budget", spill_budget), ("soar_lambda", soar_lambda))
                             if v is not None)
        verb = "apply" if " and " in given else "applies"
        raise ValueError(f"{given} only {verb} to {n['soar']}; with "
                         f"{n['tau_rule']} the copies are set by {n['tau']} and {n['max_assign']}: pass "
                         f"{n['soar']} or drop {given}.")
    return (None if tau is None else float(tau), max_assign, None if spill_budget is None else float(spill_budget),
            _DEFAULT_SOAR_LAMBDA if soar_lambda is None else float(soar_lambda))


def list_sizes(index) -> np.ndarray:
    """Posting-list lengths of an IVF index, shape (nlist,), int64 (copies included)."""
    ivf = _as_ivf(index)
    inv = ivf.invlists
    return np.array([inv.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def posting_ids(index) -> np.ndarray:
    """All ids stored in the posting lists, concatenated list by list, shape (n_postings,), int64."""
    ivf = _as_ivf(index)
    inv = ivf.invlists
    parts = []
    for i in range(ivf.nlist):
        sz = inv.list_size(i)
        if sz:
            ptr = inv.get_ids(i)
            parts.append(faiss.rev_swig_ptr(ptr, sz).copy())
            inv.release_ids(i, ptr)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def max_copies(index) -> int:
    """Largest number of posting lists any single id appears in (1 for a single-assignment index)."""
    if isinstance(index, GMMIVFIndex):
        return index.max_copies
    ids = posting_ids(index)
    if ids.size == 0:
        return 1
    return int(np.unique(ids, return_counts=True)[1].max())


def normalize_rows(x: np.ndarray, name: str = "X") -> np.ndarray:
    """Unit-norm copy of x (n, d) float32; refuses zero rows, which have no direction."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        row = int(np.nonzero(norms[:, 0] == 0)[0][0])
        raise ValueError(f"{name} row {row} is the zero vector, which has no direction under metric='angular': "
                         "remove it or use metric='l2'.")
    return (x / norms).astype(np.float32)


def _new_ids(ivf, ids, n: int) -> np.ndarray:
    """Ids for ``n`` rows added to a plain IndexIVF: the user's, checked unique and not already stored, or
    consecutive after the largest stored id (which cannot collide). One pass over the stored ids when the index is
    not empty."""
    if ivf.ntotal == 0:
        return np.arange(n, dtype=np.int64) if ids is None else check_ids(ids, n)
    stored = posting_ids(ivf)
    if ids is None:
        start = int(stored.max()) + 1
        return np.arange(start, start + n, dtype=np.int64)
    ids = check_ids(ids, n)
    clash = np.isin(ids, stored)
    if clash.any():
        raise ValueError(f"{int(clash.sum())} of the ids are already in the index (first: {int(ids[clash][0])}): "
                         "ids must be unique across add calls, or deduplicated search hides one of the vectors. "
                         "Pass new ids, or omit ids to get consecutive ones after the largest stored id.")
    return ids


def _json_scalar(value):
    """json.dumps hook: numpy scalars (e.g. ``tol=np.float32(1e-3)``, ``seed=np.int64(0)``) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_trained(ivf) -> None:
    if not ivf.is_trained:
        raise ValueError("The IVF index is not trained: train it (train_ivf_with_gmm or index.train) before adding.")


def _check_csr(offsets, lists, n: int, nlist: int):
    offsets = np.asarray(offsets, dtype=np.int64)
    lists = np.asarray(lists, dtype=np.int64)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != lists.shape[0]:
        raise ValueError(f"offsets must have shape ({n + 1},), start at 0 and end at len(lists)={lists.shape[0]}.")
    counts = np.diff(offsets)
    if np.any(counts < 1):
        raise ValueError(f"row {int(np.argmax(counts < 1))} has no posting list: every vector needs at least one, "
                         "or it could never be found.")
    if lists.size and (lists.min() < 0 or lists.max() >= nlist):
        raise ValueError(f"list ids must lie in [0, nlist={nlist}).")
    return offsets, lists


def _add_csr(ivf, xb: np.ndarray, offsets: np.ndarray, lists: np.ndarray, ids: np.ndarray) -> int:
    """Store row i of ``xb`` (checked float32) under ``ids[i]`` in ``lists[offsets[i]:offsets[i + 1]]``."""
    n = xb.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    for s in range(0, n, _ADD_BATCH):
        e = min(n, s + _ADD_BATCH)
        a, b = offsets[s], offsets[e]
        r = rows[a:b]
        x_rep = np.ascontiguousarray(xb[r])
        id_rep = np.ascontiguousarray(ids[r])
        li = np.ascontiguousarray(lists[a:b])
        ivf.add_core(int(b - a), faiss.swig_ptr(x_rep), faiss.swig_ptr(id_rep), faiss.swig_ptr(li))
    return int(lists.shape[0])


def csr_from_labels(labels: np.ndarray):
    """CSR (offsets, lists) of a single assignment: one list per row."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    return np.arange(labels.shape[0] + 1, dtype=np.int64), labels


# ---------------------------------------------------------------------------------------------- generic ops
def add_preassigned(index, xb, offsets, lists, ids=None) -> int:
    """Add each row of ``xb`` to the posting lists given in CSR form.

    Parameters
    ----------
    index : faiss.IndexIVF (trained)
        Not a :class:`GMMIVFIndex` nor its ``faiss_index`` (refused with a TypeError): use ``GMMIVFIndex.add``.
    xb : array of shape (n, d)
    offsets : array of shape (n + 1,), int64
        Row i goes to ``lists[offsets[i]:offsets[i + 1]]``; every row needs at least one list.
    lists : array of shape (nnz,), int64
        Posting-list ids in [0, nlist).
    ids : array of shape (n,), int64, optional
        Unique ids, none of them already in the index (checked against the ids stored in the posting lists: one
        pass over them). Default: consecutive ids after the largest stored id.

    Returns
    -------
    int : the number of postings added (nnz).
    """
    ivf = _plain_ivf(index, "add_preassigned")
    _check_trained(ivf)
    xb = as_float32_matrix(xb, "xb", d=ivf.d)
    offsets, lists = _check_csr(offsets, lists, xb.shape[0], ivf.nlist)
    ids = _new_ids(ivf, ids, xb.shape[0])
    return _add_csr(ivf, xb, offsets, lists, ids)


def add_multi_assigned(index, xb, gmm: GaussianMixture, *, ids=None, tau=None, max_assign=None) -> dict:
    """Add ``xb`` to a trained IVF index, each vector to every list whose GMM responsibility exceeds ``tau``.

    The index's posting lists must correspond to the GMM components (as after :func:`train_ivf_with_gmm`).

    Parameters
    ----------
    index : faiss.IndexIVF
        Not a :class:`GMMIVFIndex` nor its ``faiss_index`` (refused with a TypeError): use ``GMMIVFIndex.add``.
    xb : array of shape (n, d)
    gmm : fitted GaussianMixture with n_components == nlist and n_features == d
    ids : array of shape (n,), optional
        Unique ids not already in the index (see :func:`add_preassigned`); default consecutive after the largest.
    tau : float in [0, 1), default 1 / K (0 for K = 1)
    max_assign : int >= 1, default no cap

    Returns
    -------
    dict with ``n_added``, ``n_postings``, ``inflation`` (postings per vector), ``max_copies`` and
    ``copies_histogram`` (count of vectors with 0, 1, 2, ... copies).

    Raises
    ------
    NotFittedError : the GMM is not fitted.
    """
    ivf = _plain_ivf(index, "add_multi_assigned")
    _check_gmm(gmm)
    K, d = gmm.means_.shape
    if K != ivf.nlist:
        raise ValueError(f"the GMM has {K} components but the index has nlist={ivf.nlist}.")
    if d != ivf.d:
        raise ValueError(f"the GMM has {d} features but the index has d={ivf.d}.")
    tau, max_assign, _, _ = _check_index_options("tau", tau, max_assign, None, None)
    _check_trained(ivf)
    xb = as_float32_matrix(xb, "xb", d=ivf.d)
    ids = _new_ids(ivf, ids, xb.shape[0])
    offsets, lists, _ = gmm.assign(xb, tau=tau, max_assign=max_assign)   # tau None: default_tau(K)
    nnz = _add_csr(ivf, xb, offsets, lists, ids)
    copies = np.diff(offsets)
    n = copies.shape[0]
    return {"n_added": n, "n_postings": nnz, "inflation": nnz / n, "max_copies": int(copies.max()),
            "copies_histogram": np.bincount(copies).tolist()}


def train_ivf_with_gmm(index, xt, **gmm_kwargs) -> GaussianMixture:
    """Train any untrained FAISS IndexIVF with a GMM in place of its k-means.

    The GMM (``n_components = index.nlist``) is fitted on ``xt``; its means are added to the coarse quantizer, and
    ``index.train(xt)`` then trains only the rest (PQ / SQ codebooks on the residuals): FAISS skips its own k-means
    because the quantizer already holds ``nlist`` centroids. The index and ``xt`` are checked before the fit.

    Parameters
    ----------
    index : faiss.IndexIVF, untrained, with an empty quantizer
        With METRIC_INNER_PRODUCT a UserWarning says that the GMM is Euclidean (normalise the vectors).
    xt : array of shape (n_train, d)
    **gmm_kwargs : passed to :class:`GaussianMixture` (``n_components`` is taken from the index); or ``gmm=`` a
        fitted GaussianMixture with ``nlist`` components of dimension d, used instead of fitting one.

    Returns
    -------
    GaussianMixture : the fitted mixture (its ``means_`` are the index's centroids).
    """
    ivf = _as_ivf(index)
    if ivf.is_trained or ivf.quantizer.ntotal > 0:
        raise ValueError("train_ivf_with_gmm needs an untrained IndexIVF with an empty quantizer "
                         "(for example a fresh faiss.index_factory(d, 'IVF1024,PQ16')).")
    check_shape(xt, "xt", d=ivf.d)
    if "n_components" in gmm_kwargs and gmm_kwargs.pop("n_components") != ivf.nlist:
        raise ValueError(f"n_components must equal the index's nlist={ivf.nlist}.")
    gmm = gmm_kwargs.pop("gmm", None)
    if gmm is not None:
        _check_gmm(gmm)
        if gmm_kwargs:
            raise ValueError(f"pass either gmm= (already fitted) or GaussianMixture settings, not both: got "
                             f"{sorted(gmm_kwargs)}.")
        if tuple(gmm.means_.shape) != (ivf.nlist, ivf.d):
            raise ValueError(f"gmm has {gmm.means_.shape[0]} components of dimension {gmm.means_.shape[1]}, the "
                             f"index expects nlist={ivf.nlist} of dimension d={ivf.d}.")
    if ivf.metric_type != faiss.METRIC_L2:
        warnings.warn("The GMM is fitted in Euclidean space; with METRIC_INNER_PRODUCT normalise the vectors "
                      "(angular search) for the GMM lists to be meaningful.", stacklevel=2)
    if gmm is None:
        gmm = GaussianMixture(ivf.nlist, **gmm_kwargs).fit(xt)
    _install_centroids(ivf, gmm)
    ivf.train(as_float32_matrix(xt, "xt", d=ivf.d))
    return gmm


def _install_centroids(ivf, gmm: GaussianMixture):
    means = np.ascontiguousarray(gmm.means_, dtype=np.float32)
    if means.shape != (ivf.nlist, ivf.d):
        raise ValueError(f"GMM means have shape {means.shape}, the index expects ({ivf.nlist}, {ivf.d}).")
    if not ivf.quantizer.is_trained:
        ivf.quantizer.train(means)
    ivf.quantizer.add(means)


def _check_faiss_index(faiss_index, gmm) -> None:
    """A faiss_index handed to GMMIVFIndex must be a trained L2 IndexIVF whose centroids are the GMM's means."""
    K, d = gmm.means_.shape
    if not isinstance(faiss_index, faiss.IndexIVF):
        raise TypeError(f"faiss_index must be a faiss.IndexIVF (e.g. IndexIVFFlat), got "
                        f"{type(faiss_index).__name__}.")
    if faiss_index.nlist != K or faiss_index.d != d:
        raise ValueError(f"faiss_index has nlist={faiss_index.nlist} and d={faiss_index.d} but the GMM has {K} "
                         f"components of dimension {d}: they must match (one posting list per component).")
    if faiss_index.metric_type != faiss.METRIC_L2:
        raise ValueError("faiss_index must use METRIC_L2: a GMMIVFIndex searches in squared L2 (metric='angular' "
                         "normalises the vectors instead).")
    if not faiss_index.is_trained or faiss_index.quantizer.ntotal != K:
        raise ValueError("faiss_index is not trained with the GMM's means: train it with "
                         "train_ivf_with_gmm(index, xt, gmm=gmm), or leave faiss_index=None.")
    q = faiss.downcast_index(faiss_index.quantizer)
    if isinstance(q, faiss.IndexFlat):
        cents = q.reconstruct_n(0, K)
        means = np.asarray(gmm.means_, dtype=np.float32)
        if not np.allclose(cents, means, rtol=1e-6, atol=1e-6 * float(np.abs(means).max() or 1.0)):
            raise ValueError("faiss_index's coarse centroids are not this GMM's means: train it with "
                             "train_ivf_with_gmm(index, xt, gmm=gmm), or leave faiss_index=None.")


# ---------------------------------------------------------------------------------------------- GMMIVFIndex
class GMMIVFIndex:
    """A FAISS ``IndexIVFFlat`` whose coarse centroids are GMM means, with multi-assignment.

    Parameters
    ----------
    gmm : fitted GaussianMixture
    metric : {"l2", "angular"}
        "angular" unit-normalises base and query vectors (distances returned are then 2 - 2 cos).
    tau : float in [0, 1), default 1 / K (0 for K = 1)
        Responsibility threshold for extra copies (``assignment="tau"`` only).
    max_assign : int, default no cap
        Maximum copies per vector (1 = single assignment to the most responsible component).
    faiss_index : faiss.IndexIVF, optional
        An L2 IndexIVF trained with this GMM (nlist = K, d and the flat quantizer's centroids are checked); default a
        new IndexIVFFlat. If it already holds vectors, the ids and copy counts are read from its posting lists
        (with metric="angular" they must have been normalised).
    assignment : {"tau", "soar"}
    spill_budget : float in [1, 2], optional -- target inflation (``assignment="soar"`` only)
    soar_lambda : float >= 0, default 0.75 -- SOAR's lambda (``assignment="soar"`` only)

    All settings are checked here: a setting of the other rule (``spill_budget`` or ``soar_lambda`` with "tau",
    ``tau`` or ``max_assign`` other than 2 with "soar") is refused, not ignored.

    Attributes
    ----------
    faiss_index : faiss.IndexIVFFlat
    gmm : GaussianMixture
    ntotal : int -- unique vectors added
    n_postings : int -- entries in the posting lists (copies included)
    inflation : float -- n_postings / ntotal
    max_copies : int
    copies_histogram : ndarray -- number of vectors stored 0, 1, 2, ... times

    Add vectors with :meth:`add` only: :func:`add_multi_assigned` and :func:`add_preassigned` refuse this object and
    its ``faiss_index``, because they would bypass ``ids_`` and the copy counts.
    """

    def __init__(self, gmm: GaussianMixture, metric: str = "l2", tau=None, max_assign=None, faiss_index=None, *,
                 assignment: str = "tau", spill_budget=None, soar_lambda=None, _state=None):
        _check_gmm(gmm)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
        tau, max_assign, spill_budget, soar_lambda = _check_index_options(assignment, tau, max_assign, spill_budget,
                                                                          soar_lambda)
        K, d = gmm.means_.shape
        if faiss_index is not None:
            _check_faiss_index(faiss_index, gmm)
        self.gmm = gmm
        self.metric = metric
        self.tau = tau
        self.max_assign = max_assign
        self.assignment = assignment
        self.spill_budget = spill_budget
        self.soar_lambda = soar_lambda
        self.d, self.nlist = d, K
        if faiss_index is None:
            quantizer = faiss.IndexFlatL2(d)
            faiss_index = faiss.IndexIVFFlat(quantizer, d, K, faiss.METRIC_L2)
            faiss_index.own_fields = True
            quantizer.this.disown()
            _install_centroids(faiss_index, gmm)
            faiss_index.is_trained = True
        self.faiss_index = faiss_index
        if _state is not None:  # load(): the saved bookkeeping
            self.ids_, self.copies_histogram = _state
        elif faiss_index.ntotal:  # a populated index: its posting lists are the bookkeeping
            self.ids_, counts = np.unique(posting_ids(faiss_index), return_counts=True)
            self.copies_histogram = np.bincount(counts).astype(np.int64)
        else:
            self.ids_ = np.zeros(0, dtype=np.int64)
            self.copies_histogram = np.zeros(1, dtype=np.int64)
        _OWNERS[_address(faiss_index)] = self

    # -------------------------------------------------------------- sizes
    @property
    def ntotal(self) -> int:
        return int(self.ids_.shape[0])

    @property
    def n_postings(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def inflation(self) -> float:
        return self.n_postings / self.ntotal if self.ntotal else 0.0

    @property
    def max_copies(self) -> int:
        return int(len(self.copies_histogram) - 1) if self.ntotal else 1

    @property
    def tau_(self) -> float:
        """The threshold in use: ``tau``, or 1 / K by default (0 for K = 1)."""
        return default_tau(self.nlist) if self.tau is None else float(self.tau)

    def _prep(self, x, name):
        x = as_float32_matrix(x, name, d=self.d)
        return normalize_rows(x, name) if self.metric == "angular" else x

    # -------------------------------------------------------------- add / search
    def add(self, xb, ids=None) -> "GMMIVFIndex":
        """Add vectors (multi-assigned). xb: (n, d); ids: (n,) unique int64, default consecutive."""
        xb = self._prep(xb, "xb")
        n = xb.shape[0]
        if ids is None:
            start = int(self.ids_.max()) + 1 if self.ntotal else 0
            ids = np.arange(start, start + n, dtype=np.int64)
        else:
            ids = check_ids(ids, n)
            clash = np.isin(ids, self.ids_) if self.ntotal else np.zeros(n, dtype=bool)
            if clash.any():
                raise ValueError(f"{int(clash.sum())} of the ids are already in the index (first: "
                                 f"{int(ids[clash][0])}): ids must be unique across add() calls.")
        if self.assignment == "tau":
            offsets, lists, _ = self.gmm.assign(xb, tau=self.tau_, max_assign=self.max_assign)
        else:
            from .spilling import soar_l2_assign

            offsets, lists = soar_l2_assign(xb, self.gmm.means_, lam=self.soar_lambda,
                                            max_inflation=self.spill_budget)
        offsets, lists = _check_csr(offsets, lists, n, self.nlist)
        _add_csr(self.faiss_index, xb, offsets, lists, ids)
        self.ids_ = np.concatenate([self.ids_, ids])
        hist = np.bincount(np.diff(offsets)).astype(np.int64)
        m = max(len(hist), len(self.copies_histogram))
        merged = np.zeros(m, dtype=np.int64)
        merged[:len(hist)] += hist
        merged[:len(self.copies_histogram)] += self.copies_histogram
        self.copies_histogram = merged
        return self

    def search(self, xq, k: int = 10, nprobe: int = 1):
        """Deduplicated k-NN search. xq: (nq, d). Returns D (nq, k) float32 squared L2 and I (nq, k) int64,
        padded with (inf, -1) when fewer than k vectors were scanned."""
        from .evaluation import search_with_dco

        D, I, _ = search_with_dco(self, xq, k=k, nprobe=nprobe)
        return D, I

    def search_with_dco(self, xq, k: int = 10, nprobe: int = 1):
        from .evaluation import search_with_dco

        return search_with_dco(self, xq, k=k, nprobe=nprobe)

    def stats(self) -> dict:
        return {"ntotal": self.ntotal, "n_postings": self.n_postings, "inflation": self.inflation,
                "max_copies": self.max_copies, "nlist": self.nlist, "d": self.d, "metric": self.metric,
                "assignment": self.assignment, "tau": self.tau_, "max_assign": self.max_assign,
                "spill_budget": self.spill_budget, "soar_lambda": self.soar_lambda,
                "copies_histogram": self.copies_histogram.tolist()}

    # -------------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Write ``path`` (a standard ``faiss.write_index`` file, readable by FAISS alone) and the sidecar
        ``path + '.gmm.npz'`` holding the GMM and the multi-assignment settings."""
        path = os.fspath(path)
        faiss.write_index(self.faiss_index, path)
        g = self.gmm
        meta = {"format": "flashgmm-faiss/1", "metric": self.metric, "tau": self.tau, "max_assign": self.max_assign,
                "assignment": self.assignment, "spill_budget": self.spill_budget, "soar_lambda": self.soar_lambda,
                "gmm_params": {k: v for k, v in g.get_params().items()
                               if k not in ("init", "weights_init", "covariances_init")},
                "gmm_fitted": {k: getattr(g, k, None) for k in ("converged_", "n_iter_", "lower_bound_",
                                                                 "backend_")}}
        np.savez(path + _SIDECAR_SUFFIX, means=g.means_, covariances=g.covariances_, weights=g.weights_,
                 center=g.center_, ids=self.ids_, copies_histogram=self.copies_histogram,
                 history=np.array(json.dumps(getattr(g, "history_", []), default=_json_scalar)),
                 meta=np.array(json.dumps(meta, default=_json_scalar)))

    @classmethod
    def load(cls, path: str) -> "GMMIVFIndex":
        """Read an index written by :meth:`save`."""
        path = os.fspath(path)
        side = path + _SIDECAR_SUFFIX
        if not os.path.exists(path):
            raise FileNotFoundError(f"no index file at {path}")
        if not os.path.exists(side):
            raise FileNotFoundError(f"no GMM sidecar at {side}: it is written by GMMIVFIndex.save next to the index.")
        index = faiss.read_index(path)
        with np.load(side) as z:
            meta = json.loads(str(z["meta"]))
            gmm = GaussianMixture(**meta["gmm_params"])
            gmm.means_ = z["means"]
            gmm.covariances_ = z["covariances"]
            gmm.weights_ = z["weights"]
            gmm.center_ = z["center"]
            gmm.n_features_in_ = gmm.means_.shape[1]
            gmm.history_ = json.loads(str(z["history"]))
            for k, v in meta["gmm_fitted"].items():
                setattr(gmm, k, v)
            ids = z["ids"].astype(np.int64)
            hist = z["copies_histogram"].astype(np.int64)
        gmm.device = None  # re-resolve on the loading machine
        assignment = meta.get("assignment", "tau")
        soar = {"spill_budget": meta.get("spill_budget"), "soar_lambda": meta.get("soar_lambda")} \
            if assignment == "soar" else {}  # tau files store the (unused) SOAR defaults
        return cls(gmm, metric=meta["metric"], tau=meta["tau"], max_assign=meta["max_assign"], faiss_index=index,
                   assignment=assignment, _state=(ids, hist), **soar)

    def __repr__(self) -> str:
        return (f"GMMIVFIndex(nlist={self.nlist}, d={self.d}, metric={self.metric!r}, "
                f"assignment={self.assignment!r}, ntotal={self.ntotal}, inflation={self.inflation:.3f})")


def build_gmm_ivf(xb, K: int = 1024, *, xt=None, metric: str = "l2", tau=None, max_assign=None, ids=None,
                  gmm: GaussianMixture | None = None, assignment: str = "tau", spill_budget=None,
                  soar_lambda=None, **gmm_kwargs) -> GMMIVFIndex:
    """Fit a GMM and build a multi-assigned IVF index in one call.

    Every index setting, ``xb``, ``xt`` and ``ids`` are checked before the GMM is fitted.

    Parameters
    ----------
    xb : array of shape (n, d) -- vectors to index
    K : int -- number of components = posting lists (nlist)
    xt : array of shape (n_train, d), optional -- training vectors (default xb)
    metric : {"l2", "angular"}
    tau : float in [0, 1), default 1 / K (0 for K = 1) -- responsibility threshold for copies
    max_assign : int, optional -- copy cap per vector (1 = single assignment)
    ids : array of shape (n,), optional -- unique non-negative ids (default 0 .. n - 1)
    gmm : a fitted GaussianMixture to reuse (then ``K`` and ``gmm_kwargs`` are ignored)
    assignment : {"tau", "soar"}
        "tau" (default) is the paper's rule. "soar" spills SOAR-style (L2 form, ``soar_lambda``) on the GMM means:
        at most one extra copy, only for the vectors with the most negative SOAR loss gap when ``spill_budget``
        (a target inflation in [1, 2], e.g. 1.6) is given. On GloVe-6B-50d (K=1024, budget 1.6, all 10k queries)
        this needed 1.21x fewer scan DCO than k-means at recall@10 = 0.9, against 0.87x for tau = 1/K and 1.19x
        for SOAR on k-means centroids; on MNIST and SIFT10K it was no better than k-means
        (see bench_ann/RESULTS.md).
    spill_budget : float in [1, 2], optional -- target inflation; ``assignment="soar"`` only (refused with "tau")
    soar_lambda : float >= 0, default 0.75 -- SOAR's lambda; ``assignment="soar"`` only (refused with "tau")
    **gmm_kwargs : passed to :class:`GaussianMixture`

    Returns
    -------
    GMMIVFIndex
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    _check_index_options(assignment, tau, max_assign, spill_budget, soar_lambda)
    xb = as_float32_matrix(xb, "xb")
    if metric == "angular":
        xb = normalize_rows(xb, "xb")
    if ids is not None:
        ids = check_ids(ids, xb.shape[0])
    if gmm is None:
        K = check_positive_int(K, "K")
        train = xb if xt is None else as_float32_matrix(xt, "xt", d=xb.shape[1])
        if xt is not None and metric == "angular":
            train = normalize_rows(train, "xt")
        gmm = GaussianMixture(K, **gmm_kwargs).fit(train)
    else:
        _check_gmm(gmm)
        if gmm.means_.shape[1] != xb.shape[1]:
            raise ValueError(f"Dimension mismatch: xb has {xb.shape[1]} features per row but gmm was fitted on "
                             f"{gmm.means_.shape[1]}.")
    index = GMMIVFIndex(gmm, metric=metric, tau=tau, max_assign=max_assign, assignment=assignment,
                        spill_budget=spill_budget, soar_lambda=soar_lambda)
    index.add(xb, ids=ids)
    if gmm_kwargs.get("verbose"):
        print(f"[flashgmm] built {index!r}", file=sys.stderr)
    return index
