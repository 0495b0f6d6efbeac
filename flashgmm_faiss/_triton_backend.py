"""Triton backend: the contract of :mod:`flashgmm_faiss._torch_backend` on the fused kernels.

``GaussianMixture(backend="triton", precision=...)`` builds one :class:`TritonBackend` and calls its methods
on each chunk (float32, contiguous, centred, on the GPU); the methods have exactly the signatures, shapes and
meaning of the same-named functions in ``_torch_backend``. The kernels live in ``flashgmm_faiss.kernels``
(``kernels/`` in the source tree); they are imported lazily so that importing this module costs nothing and
never touches Triton unless a method runs.

Rows wider than the kernels' single-tile limit (D > 256) fall back to the torch implementation, run on pieces of
the chunk of at most ``TritonBackend.torch_bytes`` of device memory (``torch_piece_rows``: the chunks are sized for
the kernels' O(rows D) buffers, not for O(rows K) ones), as is the recomputation of collapsed components
(:mod:`flashgmm_faiss._collapsed`). ``assign`` runs the top-M kernel for copy caps up to
``kernels.assign.TOPK_MAX_ASSIGN`` and the threshold kernel for larger caps and no cap (O(rows + entries) memory).

Sparse E-step during a fit: ``GaussianMixture.fit`` calls :meth:`TritonBackend.begin_em_iteration` before each EM
iteration and :meth:`TritonBackend.fit_estep` with the chunk's first row as its key. The backend keeps one
:class:`kernels.RowOrder` per chunk (8 bytes per row: rows sorted by their most likely component's block, then by
their block bits, see ``order_key``) and one component permutation (:func:`kernels.component_order`, computed once
per fit); the orders are rebuilt every ``ORDER_REFRESH`` iterations from an E-step that also returns each row's most
likely component and block bits, and a rebuilt order is copied into its chunk's existing buffers (the order tensors
keep their addresses for the whole fit, so that an EM iteration can be replayed as a CUDA graph, see
:meth:`TritonBackend.graph_key`). Under an order the E-step skips the (row tile, component block) pairs whose
responsibilities pass 1 bounds below 2^-24 ("tf32", "bf16") or 2^-40 ("ieee", "bf16x3") (``kernels/estep.py``,
``SKIP_LOG2``): the statistics are those of the dense E-step up to those terms; a stale order only costs speed. A
chunk that gets no kept order (the fit's memory plan leaves no room for 8 bytes per row, e.g. N=1e8 in 64 MiB) sorts
its rows inside each E-step instead (``kernels.estep``'s ``sort_rows``: a transient order sorted by block bit sets,
~50 bytes per row of the chunk while it runs), unless ``TritonBackend.sort_rows`` is False (then it runs the dense
E-step). Diag fits do so whatever the memory (``TritonBackend.kept_orders``): for them kept orders are slower.
"""
from __future__ import annotations

import torch

from . import _collapsed
from . import _torch_backend as _tb
from ._chunk_plan import ROW_ORDER_BYTES, TORCH_BYTES
from ._torch_backend import EStepStats

PRECISIONS = ("tf32", "bf16", "bf16x3", "ieee")
MAX_D = 256        # kernels.estep.MAX_D: one padded row per tile
# Row orders (sparse E-step): built in the first EM iteration, then rebuilt every ORDER_REFRESH-th (the argmax
# costs pass 1 ~0.2 ms and the argsort 0.11 ms per 1M rows on an H200; the orders age slowly once k-means has
# placed the means); at most TritonBackend.order_bytes of device memory for them (8 bytes per row; a rebuild needs one
# chunk's worth more while it sorts): chunks past it run the dense E-step. Only for K of MIN_SPARSE_BLOCKS..64
# blocks of kernels FLAG_K components: with fewer blocks there is little to skip, with more the kernels have no
# sparse pass.
ORDER_REFRESH = 4
# The bf16 E-step rounds each mean (as A = -2 mu / var, diag, or -2 mu, spherical) to 8 significant bits: it sees a
# component up to ~2^-9 |mu| per feature away from where the M-step put it. A component narrower than that
# (one that collapsed onto a single row, var -> reg_covar) then no longer explained its own row, got no
# responsibility, was re-seeded, collapsed again: at N=1e6, K=4096, D=128 a diag bf16 fit re-seeded 4 components
# every other iteration (NOTES.md v30), so v30 floored bf16 variances at (BF16_MEAN_RESOLUTION * mu)^2 per feature.
# Since v46 such a component is collapsed and computed on the exact path (flashgmm_faiss._collapsed): the same fit
# re-seeds nothing without the floor (v48), so the floor is off by default (TritonBackend.bf16_variance_floor).
BF16_MEAN_RESOLUTION = 2.0 ** -8
# device memory of the torch backend's E-step, score and assign on a piece of rows (upper estimates of peak
# allocations; H100, bench_ann/results/v47_torch_bytes: at most 25.2 kB per row at K=1024, D=128 against 31.7 kB
# here, 99 kB at K=4096, D=96 against 117 kB): bytes per (row, component) entry (logits, responsibilities, the
# reductions' temporaries, the float64 recomputation of collapsed components) and per (row, feature) (the gathered
# and centred rows, their squares)
TORCH_ENTRY_BYTES = 28
TORCH_FEATURE_BYTES = 24
MIN_SPARSE_BLOCKS = 4
# TritonBackend.dense_above["diag"]: a diag fit whose sparse E-step keeps more of the (tile, block) pairs runs the
# dense E-step instead. Where the two cost the same, from diag "tf32" fits on an H100 (ms per EM iteration, sparse
# on a transient order against dense without the operand copy, as the fallback runs): D=128, N=1e6, K=1024: 2.69
# at 7 % of the pairs, 8.09 at 100 %, dense 5.54 -> 0.56; D=50, N=4e5: 1.02 at 9 %, 1.85 at 97 %, dense 1.57 ->
# 0.67 (bench_ann/results/v34_dense_fallback).
DIAG_DENSE_ABOVE = 0.6


class TritonBackend:
    """Fused Triton E-step, k-means step, scoring and multi-assignment.

    Parameters
    ----------
    precision : {"tf32", "bf16", "bf16x3", "ieee"}, default="tf32"
        GEMM precision inside the kernels (see ``kernels/estep.py``). ``"tf32"``: operands rounded to tf32's
        11 significant bits, run as fp16 tensor-core products after an exact power-of-two scaling, fp32
        accumulation (relative error of Nk, Sx, Sq 3.2e-4 against float64 on centred SIFT-like data, H100).
        ``"bf16"``: bf16 operands (2.5e-3 there; same speed). ``"bf16x3"``: split-bf16 products (~6e-5, 2-3x
        slower). ``"ieee"``: exact fp32 products (slowest; the mode the CPU interpreter tests use).

    Attributes
    ----------
    fuses_centering : bool
        True: the methods take raw chunks and ``center=`` and centre inside the kernels (no centred copy).
    x_absmax : float or None
        Upper bound of ``|x - center|`` for the data being streamed (set by ``GaussianMixture.fit`` after its
        validation pass); None makes each call compute it from its chunk.
    copy_rows : bool
        The E-step's 16-bit modes write the rows' operand copy for pass 2 (fastest; 2 D bytes per row, 6 D diag).
        False: pass 2 converts the float32 rows itself (``kernels.estep``'s ``copy_rows``). Set by
        ``GaussianMixture.fit`` from its ``working_memory`` plan.
    order_bytes : int
        Bound of the sparse E-step's row orders (8 bytes per row); chunks past it sort their rows in each E-step
        (``sort_rows``) or run the dense E-step.
    sort_rows : bool
        A chunk without a kept row order runs the sparse E-step on a transient order built inside the call (True,
        the default) or the dense E-step (False).
    order_key : {"bits", "argmax"}
        How kept row orders are sorted when they are (re)built: by (the best component's block, the rows' block
        bits) ("bits", the default: a tile then mostly holds one bit set, so pass 2 visits fewer pairs) or by the
        best component ("argmax", before v19). A class attribute, so that benchmarks can switch it.
    kept_orders : tuple of str
        The covariance types whose fits keep row orders (and the operand copy) when the memory plan has room for
        them; the others sort each chunk inside every E-step (transient orders), as budget-bound fits do. Default
        ``("spherical",)``: a diag fit gains nothing from kept orders. Its E-step on them is no faster than on a
        transient order (which runs the Gluon pass 1 on Hopper GPUs) and every ``ORDER_REFRESH``-th iteration
        pays for the rebuild. On an H100 at N=1e6, K=1024, D=128 (v23, same process): 2.79 ms per diag "tf32"
        EM iteration (median) against 3.15 (3.6 averaged over iterations 4..27, rebuilds and graph captures
        included), with 61 MiB instead of 585 MiB of buffers. Spherical fits keep them: 1.21 ms (1.31 averaged
        over the 4-iteration refresh cycle) against 1.45. Diag bf16, and diag "tf32" with the Triton pass 1
        (GPUs other than Hopper): equal medians, lower means without the rebuilds. A class attribute, so that
        benchmarks can switch it.
    dense_above : dict
        Covariance type -> fraction of (row tile, component block) pairs: a fit whose sparse E-steps visit more
        than this fraction of the pairs runs the dense E-step from its next iteration on. On data whose
        posteriors stay broad the sparse E-step skips little, and its sort and gathers cost more than they save.
        The kernels count the pairs in the EM iterations 1, 2, 4, 8, ... (probes: each read once by the host and
        never issued ahead), so a fit whose posteriors broaden as EM goes on (GloVe: 63 % of the pairs in the
        first iteration, 97 % in the 16th) falls back when they do; :attr:`pairs_kept` keeps the last probe's
        fraction, ``order_stats["fallback_chunks"]`` counts the dense chunks. Default: diag above
        ``DIAG_DENSE_ABOVE``; spherical fits never fall back (on GloVe-6B-50d at 97 % of the pairs their kept
        orders' plain iterations still beat dense ones, 0.90 against 0.95 ms on an H100). A class attribute, so
        that benchmarks and tests can switch it.
    pairs_kept : float or None
        The fraction of pairs the last probe's sparse E-steps visited (None before one ran, or where
        :attr:`dense_above` has no threshold for the fit's covariance type).
    torch_bytes : int
        Bound of the device memory of one piece of the torch paths (rows wider than the kernels' tile, the
        collapsed components' recomputation), set by ``GaussianMixture.fit`` from its ``working_memory`` plan
        (``ChunkPlan.torch_bytes``); default ``_chunk_plan.TORCH_BYTES`` (2 GiB).
    exact_components : tuple of int or None
        The collapsed components of the parameters the next :meth:`fit_estep` calls get, set by
        ``GaussianMixture.fit`` for each EM iteration (read from the previous iteration's summary, so the E-step needs
        no host sync to find them); None (outside a fit) makes every call find them itself.
    """

    fuses_centering = True
    order_key = "bits"
    kept_orders = ("spherical",)
    fused_m_step = True     # m_step as one kernel; False: the torch form (for benchmarks)
    bf16_variance_floor = False     # floor bf16 variances at (BF16_MEAN_RESOLUTION mu)^2 (floor_resolution)
    dense_above = {"diag": DIAG_DENSE_ABOVE}

    def __init__(self, precision: str = "tf32", sparse: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.sparse = bool(sparse)
        self.x_absmax = None
        self.copy_rows = True
        self.order_bytes = ROW_ORDER_BYTES
        self.torch_bytes = TORCH_BYTES
        self.sort_rows = True
        self._cache = None      # (tensors, their versions, bound, perm, Params) of the last E-step parameters
        self._mstep_scalars = None      # (key, (4,) float64 device tensor) of m_step
        # counts of fit_estep calls: chunks run under an order (sparse) or without one, orders activated
        # (sorted_chunks: sparse on a transient order, see sort_rows)
        self.order_stats = {"iterations": 0, "sparse_chunks": 0, "sorted_chunks": 0, "dense_chunks": 0,
                            "refreshes": 0, "fallback_chunks": 0}
        self.pairs_kept = None
        self.exact_components = None
        self._split_cache = None    # (key, _collapsed.Split or None) of the last parameters split
        self.end_fit()

    def __repr__(self) -> str:
        return f"TritonBackend(precision={self.precision!r}, sparse={self.sparse})"

    def floor_resolution(self):
        """The variance floor's relative resolution ``res``, or None (the default): with :attr:`bf16_variance_floor`
        set and ``precision="bf16"``, ``BF16_MEAN_RESOLUTION``, the resolution of the means in the bf16 E-step's
        operands, and the M-step (``gmm.m_step`` and the fused :meth:`m_step`) floors the variances at ``(res
        mu)^2`` per feature (centred frame; spherical: their mean over the features), the smallest the E-step
        resolves. Off by default since v48: the fit that needed it (v30) re-seeds nothing without it now that
        collapsed components run on the exact path, and it moved bf16 fits off the model the other precisions
        fit (siftsmall resampled to 2^20 rows, K=1024 diag: mean log-likelihood -471 with it, -454.7 without, the
        torch backend -454.3). A class attribute, so that a user who meets re-seed cycles in bf16 can switch it
        back on."""
        return BF16_MEAN_RESOLUTION if self.precision == "bf16" and self.bf16_variance_floor else None

    def m_step(self, nk, sx, sq, ll_sum, means, var, n: int, reg_covar: float, degenerate_nk: float):
        """``gmm.m_step`` as one kernel (``kernels/mstep.py``; the floor of :meth:`floor_resolution` included), or None
        (D > 256, or ``fused_m_step`` off: the caller runs the torch form). Its float64 scalars live on the device,
        made once per (n, reg_covar) at a fit's first, eager, iteration (never inside a CUDA-graph capture)."""
        ke = self._k()
        if not self.fused_m_step or means.shape[1] > ke.mstep.MAX_D:
            return None
        res = self.floor_resolution()
        key = (n, reg_covar, degenerate_nk, res, means.device)
        if self._mstep_scalars is None or self._mstep_scalars[0] != key:
            self._mstep_scalars = key, torch.tensor([n, reg_covar, degenerate_nk, res or 0.0], dtype=torch.float64,
                                                    device=means.device)
        return ke.mstep.m_step(nk, sx, sq, ll_sum, means, var, self._mstep_scalars[1], has_floor=res is not None)

    # ------------------------------------------------------------------ row orders of a fit (sparse E-step)
    def end_fit(self):
        """Forget the row orders (frees their device memory)."""
        self._orders, self._perm = {}, None        # chunk key -> RowOrder, under the component permutation _perm
        self._since_build = 0                      # EM iterations since the orders were last (re)built
        self._refresh = False                      # this iteration rebuilds the orders
        self._iteration = 0                        # EM iterations of this fit so far
        self._unordered = False                    # a chunk of this iteration that could have had an order had none
        self._last_unordered = False               # same, previous iteration
        self._built = False                        # this iteration (re)built an order
        self._pairs = None                         # (2,) int64 device counter of (tile, block) pairs, zeroed by
        self._probe = False                        # a probe iteration (dense_above) and read at the next one's
        self._counted = False                      # begin (when _counted: a probe began and is not read yet)
        self._threshold = None                     # dense_above of the fit's covariance type
        self._dense = False                        # this fit runs the dense E-step from now on (dense_above)

    def begin_em_iteration(self):
        """Called before each EM iteration of a fit: decides whether this iteration (re)builds the row orders
        (the first iteration, then every ``ORDER_REFRESH``-th), whether it probes the sparse E-step's pairs (the
        iterations 1, 2, 4, 8, ...), and after a probe whether the fit falls back to the dense E-step
        (:attr:`dense_above`)."""
        self._decide_dense()
        self._since_build += 1
        self._refresh = not self._orders or self._since_build >= ORDER_REFRESH
        if self._refresh:
            self._since_build = 0
        self._iteration += 1
        self._last_unordered, self._unordered = self._unordered, False
        self._built = False
        it = self._iteration
        self._probe = not self._dense and (it == 1 or self._threshold is not None) and it & (it - 1) == 0
        if self._probe and self._pairs is not None:
            self._pairs.zero_()   # after the earlier iterations' counts in stream order: the window is this one
            self._counted = True
        self.order_stats["iterations"] += 1

    def _decide_dense(self):
        """After a probe iteration: read its count of (tile, block) pairs (one host sync), record the fraction kept
        (:attr:`pairs_kept`) and switch the fit to the dense E-step for good when it exceeds ``dense_above``,
        freeing the row orders. Every sparse E-step of the fit adds to the counter (inside its work-list kernel,
        so the iterations replayed as CUDA graphs count too and the probes need no graph of their own); a probe
        zeroes it at its begin, and it is read before the next iteration launches anything: the count is the
        probe's alone. A probe is never issued ahead (:meth:`blocks_lookahead`), so it is never discarded, and an
        iteration issued ahead and discarded (:meth:`restore_schedule`) finds the same decision. A probe begun
        ahead and refused leaves a zeroed counter: nothing to decide."""
        if not self._counted:
            return
        self._counted = False
        kept, total = self._pairs.tolist()
        if total:
            self.pairs_kept = kept / total
            if self.pairs_kept > self._threshold:
                self._dense, self._orders, self._pairs = True, {}, None

    _SCHEDULE = ("_since_build", "_refresh", "_iteration", "_unordered", "_last_unordered", "_built", "_probe")

    def schedule_state(self):
        """The row-order schedule and counters (not the orders), to undo an EM iteration that the estimator issued
        ahead and then discarded (:mod:`flashgmm_faiss._lookahead`); see :meth:`blocks_lookahead`."""
        return tuple(getattr(self, a) for a in self._SCHEDULE), dict(self.order_stats)

    def restore_schedule(self, state):
        """Undo the iterations begun since :meth:`schedule_state` returned ``state``: valid when none of them
        (re)built a row order (then they changed nothing else that a later E-step reads)."""
        values, stats = state
        for a, v in zip(self._SCHEDULE, values):
            setattr(self, a, v)
        self.order_stats.clear()      # in place: a CUDA-graph replay adds its increments to this very dict
        self.order_stats.update(stats)

    def blocks_lookahead(self) -> bool:
        """Whether this EM iteration (call after :meth:`begin_em_iteration`) must not be issued ahead of the host's
        read of the previous one, because discarding it could not be undone: it may (re)build row orders (in the
        first iteration, and in a refresh iteration once orders exist; when the first iteration built none, the
        chunks' sizes and the memory bound leave none to build), or it probes the pairs for the dense fallback."""
        if self._probe:
            return True
        return not self._dense and self._refresh and (bool(self._orders) or self._iteration <= 1)

    def graph_key(self):
        """What decides the Python path of this EM iteration's :meth:`fit_estep` calls (call after
        :meth:`begin_em_iteration`): ``"refresh"`` or ``"plain"`` once every chunk has its row order (or, past the
        orders' memory bound, sorts its rows in each E-step), ``"dense"`` when no chunk keeps an order (the sparse
        E-step does not apply, or every chunk sorts its rows in each E-step); None in the first iteration and while
        some chunk of the previous iteration ran the dense E-step without the order it is due to get. Two iterations
        of one fit with the same key launch the same kernels on the same buffers (for the same chunks), so the
        estimator may replay the first one's CUDA graph (``GaussianMixture(cuda_graphs=True)``); ``"fallback"``
        once the fit runs the dense E-step (:attr:`dense_above`); None while some component is collapsed
        (:attr:`exact_components`: such an iteration reads the rows to recompute on the host)."""
        if self.exact_components:
            return None                           # the collapsed components' rows are found with a host sync
        if self._dense:
            return "fallback"
        if self._iteration <= 1 or self._last_unordered:
            return None
        if not self._orders:
            return "dense"
        return "refresh" if self._refresh else "plain"

    def _sparse_ok(self, k: int) -> bool:
        return self.sparse and MIN_SPARSE_BLOCKS <= -(-k // self._k().FLAG_K) <= 64

    def keeps_orders(self, covariance_type: str) -> bool:
        """Whether a fit of this covariance type keeps row orders when its memory plan leaves room for them
        (:attr:`kept_orders`); when False, the plan gives it no row orders and no operand copy."""
        return covariance_type in self.kept_orders

    def sorts_chunks(self, k: int) -> bool:
        """Whether a fit with k components sorts, in each E-step, the chunks that keep no row order
        (:attr:`sort_rows` and the sparse E-step applies): the memory plan sizes chunks for it."""
        return self.sort_rows and self._sparse_ok(k)

    def _order_bytes(self) -> int:
        return sum(8 * o.rows.numel() for o in self._orders.values())

    def fit_estep(self, chunk, x, means, var, log_weights, center=None) -> EStepStats:
        """:meth:`estep` of the fit data's chunk ``chunk`` (a key: its first row), visited in that chunk's row order
        when one exists (sparse E-step, see the module docstring); same statistics up to terms below
        2^-SKIP_LOG2[precision]. The collapsed components are :attr:`exact_components` when set."""
        n, d = x.shape
        k = means.shape[0]
        if d > MAX_D:
            return self._torch_estep(x, means, var, log_weights, center)
        sp = self._split(means, var, log_weights, self.exact_components)
        if not self._sparse_ok(k):
            return self._estep(x, means, var, log_weights, center, sp)
        if self._dense:
            self.order_stats["fallback_chunks"] += 1
            return self._estep(x, means, var, log_weights, center, sp)
        if sp is not None and sp.torch_only:
            return self._torch_estep(x, means, var, log_weights, center)
        kvar, klw = (var, log_weights) if sp is None else (sp.var, sp.log_weights)
        ke = self._k()
        order = self._orders.get(chunk)
        if order is not None and order.rows.shape[0] != n:
            order = None                           # the chunking changed: this chunk starts afresh
        build = self._refresh and (order is not None or self._order_bytes() + 8 * n <= self.order_bytes)
        transient = order is None and not build and self.sort_rows
        if transient and self._perm is None:
            self._perm = ke.component_order(means)     # the transient orders group the components as kept ones do
        perm = self._perm if order is not None or transient else None
        params = self._params(means, kvar, klw, perm, x, center)
        if self.order_key not in ("bits", "argmax"):
            raise ValueError(f"TritonBackend.order_key must be 'bits' or 'argmax', got {self.order_key!r}")
        by_bits = build and self.order_key == "bits"
        self._threshold = self.dense_above.get("diag" if var.ndim == 2 else "spherical")
        counter = None
        if self._threshold is not None and (order is not None or transient):
            if self._pairs is None:
                self._pairs = torch.zeros(2, dtype=torch.int64, device=x.device)
            counter = self._pairs
            self._counted |= self._probe
        out = ke.estep(x, means, kvar, klw, precision=self.precision, center=center, params=params,
                       copy_rows=self.copy_rows, order=order, return_best=build, sort_rows=transient,
                       return_row_bits=by_bits, pair_counts=counter, stats_dtype=torch.float64)
        self.order_stats["sparse_chunks" if order is not None else
                         "sorted_chunks" if transient else "dense_chunks"] += 1
        # a transient order is rebuilt identically in every iteration: it does not make the next one differ
        self._unordered |= order is None and not transient
        if build:
            if self._perm is None:   # once per fit: the means move little after k-means, and a fixed
                # permutation keeps the refreshes cheap (component_order is ~80 small launches, 1.6 ms on an H200)
                self._perm = ke.component_order(means)
            # in place when the chunk has an order (after this chunk's E-step read it, in stream order)
            self._orders[chunk] = ke.row_order(out[4], self._perm, out=order, row_bits=out[5] if by_bits else None)
            self.order_stats["refreshes"] += not self._built     # iterations that (re)built orders
            self._built = True
            out = out[:4]
        return self._repaired_estep(out, x, means, var, log_weights, center, sp)

    # ------------------------------------------------------------------ collapsed components (module _collapsed)
    @staticmethod
    def collapsed(means, var):
        """(K,) bool on the device, no host sync: the components kept out of the kernels
        (:func:`flashgmm_faiss._collapsed.collapsed_mask`; means (K, D) centred, var (K,) or (K, D))."""
        return _collapsed.collapsed_mask(means, var)

    @staticmethod
    def torch_only(cols: tuple, k: int) -> bool:
        """Whether a chunk whose collapsed components are ``cols`` (of k) runs wholly in the torch backend
        (:func:`_collapsed.torch_only`): its statistics then do not depend on which components ``cols`` names."""
        return _collapsed.torch_only(len(cols), k)

    def _split(self, means, var, log_weights, cols=None):
        """The kernels' variances and log weights with the collapsed components ``cols`` (None: found from the
        parameters, one host sync) switched off (:func:`_collapsed.split`), or None when there are none. Reused for
        the very same, unmodified tensors (and ``cols``), so that the chunks of one call share the split tensors and
        hence their prepared :class:`Params`."""
        key = (means, var, log_weights)
        versions = tuple(t._version for t in key)
        c = self._split_cache
        if (c is not None and all(a is b for a, b in zip(c[0], key)) and c[1] == versions
                and (cols is None or c[2] == cols)):
            return c[3]
        if cols is None:
            cols = _collapsed.collapsed_components(means, var)
        sp = _collapsed.split(var, log_weights, tuple(cols))
        self._split_cache = (key, versions, tuple(cols), sp)
        return sp

    def _repaired_estep(self, out, x, means, var, log_weights, center, sp) -> EStepStats:
        """The kernels' E-step ``out`` (run with ``sp``'s parameters) with the collapsed components' rows recomputed
        (:func:`_collapsed.repair_estep`)."""
        if sp is None:
            return EStepStats(*out[:4])
        return EStepStats(*_collapsed.repair_estep(
            out, x, self._collapsed_rows(x, means, var, log_weights, center, sp),
            lambda xa: self._kernel_estep(xa, means, sp.var, sp.log_weights, center),
            lambda xa: self._torch_estep(xa, means, var, log_weights, center)))

    def _collapsed_rows(self, x, means, var, log_weights, center, sp) -> _collapsed.Collapsed:
        """The repairs' view of the collapsed components ``sp``: pieces and batches within ``torch_bytes``."""
        return _collapsed.Collapsed(center, means, var, log_weights, sp.cols, self.torch_bytes,
                                    self.torch_piece_rows(means.shape[0], x.shape[1]))

    def _torch_estep(self, x, means, var, log_weights, center=None) -> EStepStats:
        return EStepStats(*self._torch_pieces(_tb.estep, x, means.shape[0], means, var, log_weights, center,
                                              per_row=1))

    def _kernel_estep(self, x, means, var, log_weights, center=None):
        return self._k().estep(x, means, var, log_weights, precision=self.precision, center=center,
                               x_absmax=self.x_absmax, params=self._params(means, var, log_weights),
                               copy_rows=self.copy_rows, stats_dtype=torch.float64)

    def _estep(self, x, means, var, log_weights, center, sp) -> EStepStats:
        """The dense E-step with the collapsed components ``sp`` (:meth:`_split`) recomputed."""
        if sp is not None and sp.torch_only:
            return self._torch_estep(x, means, var, log_weights, center)
        kvar, klw = (var, log_weights) if sp is None else (sp.var, sp.log_weights)
        return self._repaired_estep(self._kernel_estep(x, means, kvar, klw, center), x, means, var, log_weights,
                                    center, sp)

    @staticmethod
    def _k():
        from . import kernels  # lazy: Triton (and TRITON_INTERPRET) only matter once a kernel runs
        return kernels

    def log_prob(self, x, means, var, log_weights):
        """Weighted log densities (n, K): the n x K matrix is the point, so this stays in torch."""
        return _tb.log_prob(x, means, var, log_weights)

    def _params(self, means, var, log_weights, perm=None, x=None, center=None):
        """The kernels' prepared parameters (components in the kernel order ``perm``), reused across the chunks of
        one EM iteration: a hit needs the very same tensor objects (held by the cache, so never recycled),
        unmodified (``_version``), the same bound of the data and the same permutation; anything else prepares
        afresh. Without a bound of the fit data: None (the kernels bound each chunk), or with a permutation, the
        parameters prepared for the chunk ``x``."""
        ke = self._k()
        if self.x_absmax is None:
            if perm is None:
                return None
            return ke.prepare(means, var, log_weights, self.precision, ke.absmax(x, center), comp_perm=perm)
        key = (means, var, log_weights)
        versions = tuple(t._version for t in key)
        c = self._cache
        if (c is not None and all(a is b for a, b in zip(c[0], key)) and c[1] == versions and c[2] == self.x_absmax
                and c[3] is perm):
            return c[4]
        p = ke.prepare(means, var, log_weights, self.precision, self.x_absmax, comp_perm=perm)
        self._cache = (key, versions, self.x_absmax, perm, p)
        return p

    def torch_piece_rows(self, k: int, d: int) -> int:
        """Rows of one piece of the torch paths for K=k components and d features: at most ``torch_bytes``."""
        return max(1, self.torch_bytes // (TORCH_ENTRY_BYTES * max(1, k) + TORCH_FEATURE_BYTES * d))

    def _torch_pieces(self, fn, x, k, *args, per_row=None):
        """``fn(piece, *args)`` of the torch backend on row pieces of x (:meth:`torch_piece_rows`), combined into
        one result: its first ``per_row`` fields (all when None) are per-row outputs, concatenated; the others are
        sums over rows, added as the pieces come (one set of sums alive, not one per piece)."""
        step = self.torch_piece_rows(k, x.shape[1])
        if x.shape[0] <= step:
            return fn(x, *args)
        rows, sums = [], None
        for s in range(0, x.shape[0], step):
            out = fn(x[s:s + step], *args)
            cut = len(out) if per_row is None else per_row
            rows.append(out[:cut])
            sums = list(out[cut:]) if sums is None else [a + b for a, b in zip(sums, out[cut:])]
        return tuple(torch.cat(f) for f in zip(*rows)) + tuple(sums)

    def estep(self, x, means, var, log_weights, center=None) -> EStepStats:
        if x.shape[1] > MAX_D:
            return self._torch_estep(x, means, var, log_weights, center)
        return self._estep(x, means, var, log_weights, center, self._split(means, var, log_weights))

    def score(self, x, means, var, log_weights, center=None):
        k = means.shape[0]
        if x.shape[1] > MAX_D:
            return self._torch_pieces(_tb.score, x, k, means, var, log_weights, center)
        sp = self._split(means, var, log_weights)
        if sp is None:
            return self._k().score(x, means, var, log_weights, precision=self.precision, center=center,
                                   x_absmax=self.x_absmax)
        if sp.torch_only:
            return self._torch_pieces(_tb.score, x, k, means, var, log_weights, center)
        out = self._k().score(x, means, sp.var, sp.log_weights, precision=self.precision, center=center,
                              x_absmax=self.x_absmax)
        return _collapsed.repair_score(
            out, x, self._collapsed_rows(x, means, var, log_weights, center, sp),
            lambda xa: self._torch_pieces(_tb.score, xa, k, means, var, log_weights, center))

    def kmeans_step(self, x, centroids, center=None):
        if x.shape[1] > MAX_D:
            return self._torch_pieces(_tb.kmeans_step, x, centroids.shape[0], centroids, center, per_row=2)
        return self._k().kmeans_step(x, centroids, precision=self.precision, center=center, x_absmax=self.x_absmax)

    def assign(self, x, means, var, log_weights, tau: float, max_assign: int, center=None):
        k = means.shape[0]
        cap = k if max_assign is None else max_assign

        def torch_assign(rows):
            return self._torch_pieces(_tb.assign, rows, k, means, var, log_weights, tau, cap, center)

        if x.shape[1] > MAX_D:
            return torch_assign(x)
        sp = self._split(means, var, log_weights)
        ke = self._k()
        if sp is None:
            return ke.assign(x, means, var, log_weights, tau, max_assign, precision=self.precision, center=center,
                             x_absmax=self.x_absmax)
        if sp.torch_only:
            return torch_assign(x)
        out = ke.assign(x, means, sp.var, sp.log_weights, tau, max_assign, precision=self.precision, center=center,
                        x_absmax=self.x_absmax)
        log_norm_safe = ke.score(x, means, sp.var, sp.log_weights, precision=self.precision, center=center,
                                 x_absmax=self.x_absmax)[0]
        return _collapsed.repair_assign(out, log_norm_safe, x, self._collapsed_rows(x, means, var, log_weights,
                                                                                    center, sp), tau, torch_assign)
