"""The :class:`GaussianMixture` estimator: streaming EM with a k-means warm start.

The API follows ``sklearn.mixture.GaussianMixture``: ``__init__`` only stores arguments, ``fit`` validates and
returns ``self``, fitted attributes end in ``_``. The differences are what large-scale vector search needs:

* ``fit`` streams ``X`` (numpy, memmap, torch tensor or h5py dataset) in chunks of ``chunk_size`` rows and never
  materialises the (N, K) responsibility matrix: memory is O(K * D + chunk_size * K) with the torch backend and
  O(K * D + chunk_size) with the fused Triton backend.
* Sufficient statistics are accumulated per chunk in float32 and across chunks in float64, so sums stay exact
  at N = 1e8.
* Data are centred (the global mean is subtracted on the device) before any distance expansion, which keeps
  ``||x||^2 - 2 x.mu + ||mu||^2`` accurate in float32 on uncentred data such as SIFT.
* ``assign`` returns the multi-assignment (components with responsibility > tau, best first, capped) as CSR.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
import warnings

import numpy as np
import torch

from . import _torch_backend
from ._cuda_graphs import GraphReplay
from ._chunk_plan import ROW_ORDER_BYTES, TORCH_BYTES, ChunkPlan, plan_chunks
from ._data import ChunkedMatrix
from ._lookahead import MAX_SECONDS as MAX_LOOKAHEAD_SECONDS
from ._lookahead import Launched
from ._validation import (as_float32_matrix, check_positive_int, check_real, check_seed, check_shape, default_tau,
                          is_torch_tensor)

_COVARIANCE_TYPES = ("spherical", "diag")
_BACKENDS = ("auto", "torch", "triton")
_PRECISIONS = ("tf32", "bf16", "bf16x3", "ieee")
# predict_proba materialises (n, K): refuse past this many float32 elements (1 GiB).
PREDICT_PROBA_MAX_ELEMENTS = 2 ** 28
# EM re-seeds a component whose responsibility sums to less than this many rows. Half a row, not one: a component
# that owns one isolated row has Nk = 1 only up to rounding (pass 2 recomputes the logits pass 1 reduced, so the
# row's responsibility can come out at 1 - 2^-24), and "< 1" re-seeded such a component (NOTES.md v30).
DEGENERATE_NK = 0.5


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before an iteration whose log-likelihood gain fell under ``tol`` without
    re-seeding a degenerate component; the message says which condition failed."""


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before ``fit``."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        from . import _triton_backend  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False; "
                         "use device='cpu' (the torch backend runs there).")
    return device


def resolve_backend(backend: str, device: torch.device, precision: str = "tf32", sparse_estep: bool = True):
    """Return (name, implementation) for a backend name. The implementation exposes the functions of
    :mod:`flashgmm_faiss._torch_backend` (estep, score, kmeans_step, assign, log_prob)."""
    import os

    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "torch":
        return "torch", _torch_backend
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpret:
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU "
                         "interpreter); use backend='torch' on CPU.")
    if not _triton_available():
        raise ValueError("backend='triton' was requested but triton (or flashgmm_faiss.kernels) cannot be imported; "
                         "install triton or use backend='torch'.")
    from ._triton_backend import TritonBackend

    return "triton", TritonBackend(precision=precision, sparse=sparse_estep)


def _column_stats(device: torch.device):
    """``f(x) -> (sum (D,) float64, min (D,), max (D,))`` of a float32 chunk: the fused kernel on CUDA (torch's
    CUDA reductions over rows stage 132-264 MiB per call, see ``kernels/column_stats.py``), torch elsewhere."""
    if device.type == "cuda" and _triton_available():
        from .kernels import column_stats
        return column_stats
    return lambda x: (x.sum(0, dtype=torch.float64), *torch.aminmax(x, dim=0))


def _resident(X, device: torch.device) -> bool:
    """Whether X is already a float32 tensor on ``device`` (chunks are views: no upload buffer). A device without
    an index (``"cuda"``) means the current one, as torch places tensors."""
    if not isinstance(X, torch.Tensor) or X.dtype != torch.float32 or X.device.type != device.type:
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return X.device.index == index


def _host_float64(a) -> np.ndarray:
    """``a`` (array-like or torch tensor, which may require grad: read as data) as a float64 numpy array."""
    if is_torch_tensor(a):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def m_step(nk, sx, sq, ll_sum, means, var, n, reg_covar, floor_res=None):
    """The M-step in float64 torch (the reference of ``kernels/mstep.py``): nk (K,), sx (K, D), sq (K, D) (diag: sum
    r (x - mu)^2 per feature) or (K,) (spherical), ll_sum (), means (K, D) and var (K, D) or (K,) of the E-step.
    ``floor_res`` (``TritonBackend.floor_resolution``), if given, floors the new variances at ``(floor_res
    new_mu)^2`` per feature (spherical: its mean over the features). Returns ``(means, var, weights,
    degenerate, summary)``: a component with less than DEGENERATE_NK rows' worth of responsibility keeps its
    parameters (degenerate (K,) bool); summary (2,) float64 = [ll_sum, number of degenerate components]."""
    d = means.shape[1]
    nk_safe = nk.clamp_min(1e-12)
    new_means = sx / nk_safe[:, None]
    shift = new_means - means
    if var.ndim == 1:
        new_var = (sq / nk_safe - (shift * shift).sum(1)) / d
    else:
        new_var = sq / nk_safe[:, None] - shift * shift
    new_var = new_var.clamp_min(0.0) + reg_covar
    if floor_res is not None:
        floor = (floor_res * new_means) ** 2
        new_var = torch.maximum(new_var, floor if var.ndim == 2 else floor.mean(1))
    degenerate = nk < DEGENERATE_NK  # (nearly) no responsibility: re-seed
    means = torch.where(degenerate[:, None], means, new_means)
    var = torch.where(degenerate.view(-1, *([1] * (var.ndim - 1))), var, new_var)
    summary = torch.stack([ll_sum, degenerate.sum().double()])
    return means, var, nk / n, degenerate, summary


class GaussianMixture:
    """Gaussian mixture with spherical or diagonal covariances, fitted by streaming EM.

    Parameters
    ----------
    n_components : int
        Number of mixture components K (the ``nlist`` of the IVF index built from it).
    covariance_type : {"spherical", "diag"}
        One variance per component, or one per component and feature.
    max_iter : int >= 0
        Maximum number of EM iterations (after the k-means warm start). 0 runs no EM iteration: the fitted
        parameters are the starting ones (the k-means warm start's means, cluster weights and variances, or
        ``init`` / ``weights_init`` / ``covariances_init``), ``lower_bound_`` is their mean log-likelihood on X
        (one scoring pass), ``n_iter_ = 0``, ``converged_ = False`` and no ``ConvergenceWarning`` is raised.
    kmeans_iter : int
        Lloyd iterations run before EM to place the means (0 disables the warm start).
    tol : float >= 0
        EM stops when the mean per-sample log-likelihood changes by less than ``tol`` in an iteration that
        re-seeded no component. Any real number (Python or numpy scalar).
    reg_covar : float >= 0, finite
        Added to every variance: the floor that keeps collapsing components finite. (A component collapsed onto
        duplicate rows is computed exactly on the Triton backend too, see ``flashgmm_faiss._collapsed``;
        ``TritonBackend.bf16_variance_floor`` adds a bf16 floor of (2^-8 mu)^2 per feature, off by default.)
    init : {"k-means++", "random"} or array of shape (K, D)
        Seeding of the means before k-means / EM. k-means++ runs on a random subsample of at most
        ``max(50 * K, 10000)`` rows.
    backend : {"auto", "torch", "triton"}
        "auto" uses the fused Triton kernels on CUDA when they are available, the torch backend otherwise.
    device : str or torch.device, optional
        Compute device; defaults to CUDA when available.
    chunk_size : int, optional
        Rows per streamed chunk; the default bounds the per-chunk buffers (see ``working_memory``).
    seed : int in [0, 2^64) or None
        Seed for the initialisation and re-seeding. None: a fresh seed drawn from the OS entropy at each ``fit``
        (not reproducible; the one drawn is kept in ``seed_``).
    verbose : bool or int >= 0
        Print progress to stderr (1: every 10 iterations, 2: every iteration).
    precision : {"tf32", "bf16", "bf16x3", "ieee"}
        Dot-product precision of the Triton backend (ignored by the torch backend, which is float32): tf32-class
        operands (default), bf16, split-bf16 (more accurate, slower) or exact fp32; see ``kernels/estep.py``.
    weights_init : array of shape (K,), optional
    covariances_init : array of shape (K,) or (K, D), optional
        With ``init`` given as means and ``kmeans_iter=0``, EM starts exactly from these parameters.
    sparse_estep : bool, default=True
        Triton backend, 256 <= K <= 4096 (blocks of 64 components): the EM iterations visit each chunk's rows
        sorted by their most likely component (rebuilt every few iterations; 8 bytes of device memory per row,
        at most 1 GiB) and skip the (64-row tile, 64-component block) pairs whose responsibilities the kernels
        bound below 2^-24 ("tf32", "bf16") or 2^-40 ("ieee", "bf16x3"): every dropped term is below fp32's
        rounding of its row's total, and the statistics equal the dense E-step's up to those terms (6e-7 relative
        on a fit's state at N=1e6; H100 EM iteration 1.57 -> 1.36 ms against 2^-40). On data with sharp
        posteriors (D ~ 100 and more) the kernels' E-step is ~1.8x faster; a fit's EM iteration gained 1.26x at
        N=1e7 (H200, bench_ann/results/sparse_pass2), and 1.8x at N=1e6 with ``cuda_graphs`` (launch overhead
        hides it otherwise; bench_ann/results/cuda_graphs). Chunks past the orders' memory (``working_memory``)
        sort their rows inside each E-step instead (a transient order): N=1e8, K=1024, D=128 in 64 MiB, H100, EM
        iteration 349 -> 208 ms spherical, 633 -> 421 ms diag against the dense E-step at the same budget
        (bench_ann/results/v15_transient_orders); 142 ms and 319 ms since the plan sizes chunks per E-step phase
        and the orders group rows by their block bit sets (v17, v18). Kept orders sort rows by (best block, block
        bits): 1.22 ms per spherical EM iteration at N=1e6 (v19). On data with broad posteriors little is
        skipped (GloVe-6B-50d: 97 % of the pairs visited): a diag fit measures the visited fraction in its EM
        iterations 1, 2, 4, 8, ... and runs the dense E-step from then on once it exceeds 0.6
        (``TritonBackend.dense_above``; GloVe, H100: 1.84 -> 1.54 ms per EM iteration,
        bench_ann/results/v34_dense_fallback). False: always the dense E-step.
    cuda_graphs : bool, default=True
        Triton backend with X on the CUDA device (a float32 tensor there, or host data that ``data_on_device``
        copied there): the first EM iteration of each kind (plain, or rebuilding the sparse E-step's row orders)
        runs eagerly, the second is recorded as a CUDA graph (E-step over every chunk and M-step), and the later
        ones replay it instead of issuing ~60-180 launches from Python; from the third or fourth iteration on.
        Same kernels on the same buffers, so the same results bit for bit; it matters where the host, not the
        GPU, bounds an iteration (N ~ 1e6: 1.8x). The k-means warm start's iterations are replayed likewise (one
        kind). The graphs hold their own copy of one chunk's work buffers while the fit runs. False: always launch
        eagerly. Either way, on a CUDA device each iteration is issued before the host reads the previous one's
        log-likelihood and re-seed count (lookahead, ``flashgmm_faiss/_lookahead.py``), and discarded when that
        read stops the fit or re-seeds: the same fit bit for bit, without the GPU idling during the read.
    data_on_device : {"auto", True, False}, default="auto"
        X given in host memory (numpy, memmap, h5py, CPU tensor) and a CUDA device: copy it once, during the
        validation pass, into a float32 device tensor used for the whole fit, instead of uploading every chunk
        again in every k-means and EM iteration (68 ms per EM iteration for 1e6 x 128 floats on an H200 host,
        against 1.9 ms once copied).
        "auto": when the copy takes at most half of the device's free memory; True: always (a clear error when
        it does not fit); False: stream the chunks (memory O(chunk_size * D) on the device).
    working_memory : float, optional
        Bound, in MiB, of the device memory the fit uses beyond X (and beyond the host-data copy of
        ``data_on_device``): parameters, statistics and the kernels' partial sums (O(K D), estimated), the
        per-chunk buffers and the sparse E-step's row orders. The chunk gets what the O(K D) part leaves; the
        Triton backend's 16-bit row copy (fastest, 2 D bytes per row, 6 D diag) is dropped when fewer than 2^20
        rows of it fit, and the row orders (8 bytes per row) get what the chunk leaves (none: each E-step sorts its
        chunk, ~56 bytes per row while it runs, which the chunk's size allows for).
        A budget too small for the O(K D) part and a 1024-row chunk is refused with the minimum. Measured: N=1e8,
        K=1024, D=128 fits in 64 MiB (``bench_ann/results/``). None (default): 512 MiB of chunk buffers (at most
        1/8 of the free memory) and up to 1 GiB of row orders. ``chunk_size``, when given, overrides the plan's
        rows. The k-means++ seeding holds a sample of max(50 K, 10000) rows (26 MB at K=1024, D=128). The torch
        paths of the Triton backend (collapsed components, D > 256) run in pieces within what the chunk's kernels
        leave. Not counted: Triton's compilation and autotuning, which the first fit of a (K, D, precision) runs
        and whose benchmark allocates a 256 MB cache-flush buffer once.

    Attributes
    ----------
    means_ : ndarray of shape (K, D), float32
    covariances_ : ndarray of shape (K,) (spherical) or (K, D) (diag), float32
    weights_ : ndarray of shape (K,), float32
    converged_ : bool
    n_iter_ : int
        EM iterations run.
    lower_bound_ : float
        Mean per-sample log-likelihood at the last EM iteration (measured with the parameters that iteration
        started from, as in scikit-learn); with ``max_iter=0``, of the fitted (starting) parameters.
    seed_ : int
        The seed the last fit used (``seed``, or the one drawn for ``seed=None``).
    history_ : list of dict
        One dict per EM iteration: ``iteration``, ``log_likelihood``, ``seconds``, ``n_reseeded``.
    graph_replays_ : int
        k-means and EM iterations of the last fit that were CUDA graph replays (``cuda_graphs``).
    kmeans_history_ : list of dict
        One dict per warm-start iteration: ``iteration``, ``inertia`` (mean squared distance), ``seconds``.
    center_ : ndarray of shape (D,), float64
        Mean of the training data; every computation runs on centred data.
    n_features_in_ : int
    backend_ : str
        The backend that was used ("torch" or "triton").
    """

    _lookahead = "auto"   # see _lookahead_on

    def __init__(self, n_components, covariance_type="spherical", max_iter=100, kmeans_iter=10, tol=1e-4,
                 reg_covar=1e-6, init="k-means++", backend="auto", device=None, chunk_size=None, seed=0,
                 verbose=False, precision="tf32", weights_init=None, covariances_init=None, sparse_estep=True,
                 cuda_graphs=True, data_on_device="auto", working_memory=None):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.kmeans_iter = kmeans_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.init = init
        self.backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.seed = seed
        self.verbose = verbose
        self.precision = precision
        self.weights_init = weights_init
        self.covariances_init = covariances_init
        self.sparse_estep = sparse_estep
        self.cuda_graphs = cuda_graphs
        self.data_on_device = data_on_device
        self.working_memory = working_memory

    # ------------------------------------------------------------------ parameter checks
    def _check_params(self, n: int, d: int):
        K = check_positive_int(self.n_components, "n_components")
        if K > n:
            raise ValueError(f"n_components={K} is larger than the number of training vectors n={n}: "
                             "use fewer components or more training data.")
        if self.covariance_type not in _COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {_COVARIANCE_TYPES}, got {self.covariance_type!r} "
                             "(full covariances are not supported: they cost O(K * D^2)).")
        check_positive_int(self.max_iter, "max_iter", minimum=0)
        check_positive_int(self.kmeans_iter, "kmeans_iter", minimum=0)
        check_real(self.tol, "tol", minimum=0.0, finite=False)
        check_real(self.reg_covar, "reg_covar", minimum=0.0)
        check_seed(self.seed)
        v = self.verbose
        if not isinstance(v, (bool, np.bool_, numbers.Integral)) or v < 0:
            raise (ValueError if isinstance(v, numbers.Integral) else TypeError)(
                f"verbose must be a bool or an int >= 0 (0 silent, 1 progress every 10 iterations, 2 every "
                f"iteration), got {v!r}.")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}.")
        if isinstance(self.init, str):
            if self.init not in ("k-means++", "random"):
                raise ValueError(f"init must be 'k-means++', 'random' or an array of shape (K, D), got {self.init!r}.")
        else:
            m = as_float32_matrix(self.init, "init (initial means)", d=d)
            if m.shape[0] != K:
                raise ValueError(f"init has {m.shape[0]} means but n_components={K}.")
        if self.chunk_size is not None:
            check_positive_int(self.chunk_size, "chunk_size")
        wm = self.working_memory
        if wm is not None and (isinstance(wm, bool) or not isinstance(wm, (int, float)) or not wm > 0
                               or not math.isfinite(wm)):
            raise ValueError(f"working_memory must be a positive number of MiB or None, got {wm!r}.")
        return K

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Fit the mixture to X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            numpy array, np.memmap, torch tensor (read as data: detached, never modified) or h5py dataset; any
            real dtype, any strides. Values are converted to float32 chunk by chunk: they must be finite and
            within float32's range (|x| <= ~3.4e38; float64 values beyond it are refused with the first such
            row), and integers above 2^24 are rounded to float32.
        y : ignored

        Returns
        -------
        self
        """
        n, d = check_shape(X, "X")
        K = self._check_params(n, d)
        device = resolve_device(self.device)
        self.backend_, impl = resolve_backend(self.backend, device, self.precision, bool(self.sparse_estep))
        self._impl, self._device = impl, device
        plan = self._plan(X, n, device, d)
        seed = check_seed(self.seed)
        if seed is None:   # fresh entropy, drawn once: every random choice of this fit derives from it
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        self.seed_ = seed
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rng = np.random.default_rng(seed)

        # Pass 0: validate every chunk (NaN/Inf), compute the data centre in float64 and, for a backend that
        # takes a bound of the data (the Triton backend's fp16 operand scale), the range per feature.
        data = ChunkedMatrix(X, device, plan.rows, name="X")
        copy = self._device_copy(X, n, d, device)   # host data kept on the GPU for the fit, filled by this pass
        wants_bound = hasattr(impl, "x_absmax")
        total = torch.zeros(d, dtype=torch.float64, device=device)
        lo = torch.full((d,), math.inf, dtype=torch.float32, device=device)
        hi = torch.full((d,), -math.inf, dtype=torch.float32, device=device)
        stats = _column_stats(device)
        for start, x in data.chunks(check=True):
            s, mn, mx = stats(x)
            total += s
            if wants_bound:
                torch.minimum(lo, mn, out=lo)
                torch.maximum(hi, mx, out=hi)
            if copy is not None:
                copy[start:start + x.shape[0]].copy_(x)
        if copy is not None:            # from here on the fit streams views of the device copy (resident data)
            plan = self._plan(copy, n, device, d)
            data = ChunkedMatrix(copy, device, plan.rows, name="X")
        self._kmeans_rows = plan.kmeans_rows
        if hasattr(impl, "copy_rows"):  # the Triton backend's share of the plan
            impl.copy_rows, impl.order_bytes, impl.torch_bytes = plan.copy_rows, plan.order_bytes, plan.torch_bytes
        center64 = total / n
        center = center64.to(torch.float32)
        data.center = center
        self.center_ = center64.cpu().numpy()
        # |x - center| bound of the fit data: no per-chunk reduction in the kernels' launches
        if wants_bound:
            x_range = torch.maximum((hi - center).abs(), (lo - center).abs())   # (D,) |x - center| per feature
            impl.x_absmax = float(x_range.max()) * (1 + 1e-6)
        self.n_features_in_ = d
        self._log(1, f"[flashgmm] fit: n={n} d={d} K={K} cov={self.covariance_type} backend={self.backend_} "
                     f"device={device} chunk={data.chunk_size}"
                     f"{' (X copied to the device)' if copy is not None else ''}")

        means = self._initial_means(data, K, gen, rng)
        self.kmeans_history_ = []
        self.graph_replays_ = 0
        if self.kmeans_iter > 0:
            means, counts, sse = self._kmeans(data, means, rng)
            weights = counts / counts.sum()
            var = self._kmeans_variances(data, means, counts)
        else:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
            var = None
        if self.weights_init is not None:
            w = _host_float64(self.weights_init)
            if w.shape != (K,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"weights_init must be a finite non-negative array of shape ({K},).")
            weights = torch.as_tensor(w / w.sum(), device=device)
        if self.covariances_init is not None:
            shape = (K,) if self.covariance_type == "spherical" else (K, d)
            v = _host_float64(self.covariances_init)
            if v.shape != shape or not np.all(np.isfinite(v)) or np.any(v <= 0):
                raise ValueError(f"covariances_init must be a positive finite array of shape {shape}.")
            var = torch.as_tensor(v, device=device)
        if var is None:
            var = self._global_variances(data, n, d, K)
        if self.covariance_type == "diag" and var.ndim == 1:
            var = var[:, None].expand(K, d).clone()

        try:
            self._em(data, means, var, weights, n, rng)
        finally:
            if wants_bound:
                impl.x_absmax = None   # inference streams other data: bound each chunk
            if hasattr(impl, "end_fit"):
                impl.end_fit()         # the row orders of the sparse E-step belong to this fit's chunks
            if hasattr(impl, "copy_rows"):
                impl.copy_rows, impl.order_bytes, impl.torch_bytes = True, ROW_ORDER_BYTES, TORCH_BYTES   # defaults
            if hasattr(impl, "exact_components"):
                impl.exact_components = None   # other calls find their collapsed components themselves
        return self

    def _device_copy(self, X, n: int, d: int, device: torch.device):
        """An empty (n, d) float32 tensor on ``device`` to hold host data for the fit (``data_on_device``), or
        None (data already there, a CPU device, "auto" and too large, or False)."""
        mode = self.data_on_device
        if mode not in ("auto", True, False):
            raise ValueError(f"data_on_device must be 'auto', True or False, got {mode!r}")
        if mode is False or device.type != "cuda" or _resident(X, device):
            return None
        need = n * d * 4
        free = torch.cuda.mem_get_info(device)[0]
        if mode == "auto" and need > free // 2:
            self._log(1, f"[flashgmm] X ({need / 2**30:.1f} GiB as float32) is more than half of the free GPU memory "
                         f"({free / 2**30:.1f} GiB): streaming chunks from host memory every iteration")
            return None
        if need > free:
            raise MemoryError(f"data_on_device=True needs {need / 2**30:.2f} GiB for X as float32 on {device}, but "
                              f"only {free / 2**30:.2f} GiB are free; use data_on_device='auto' or False (stream the "
                              "chunks from host memory)")
        return torch.empty((n, d), dtype=torch.float32, device=device)

    def _stream(self, data: ChunkedMatrix, check: bool = False, pieces: int | None = None):
        """Yield ``(start, x, kw)``: raw chunks and ``kw = {"center": c}`` for a backend that centres inside its
        kernels (no centred copy), centred chunks and ``kw = {}`` otherwise; with ``pieces``, each chunk is cut into
        row slices of at most that many rows (the k-means steps under a ``working_memory`` plan)."""
        fused = getattr(self._impl, "fuses_centering", False) and data.center is not None
        kw = {"center": data.center} if fused else {}
        for start, x in data.chunks(check=check, centered=not fused):
            if not pieces or pieces >= x.shape[0]:
                yield start, x, kw
                continue
            for s in range(0, x.shape[0], pieces):
                yield start + s, x[s:s + pieces], kw

    def _plan(self, X, n: int, device: torch.device, d: int, fit: bool = True) -> ChunkPlan:
        """The chunking (:func:`~flashgmm_faiss._chunk_plan.plan_chunks`) for this backend, covariance type,
        ``working_memory``, where X lives and the free device memory; ``chunk_size`` overrides its rows. ``fit``
        False: the chunks of inference (``predict``, ``score_samples``, ...), as a fit that keeps row orders."""
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        sorts = hasattr(self._impl, "sorts_chunks") and self._impl.sorts_chunks(self.n_components)
        kept = not fit or not hasattr(self._impl, "keeps_orders") or self._impl.keeps_orders(self.covariance_type)
        plan = plan_chunks(self.backend_, device, n, self.n_components, d, self.covariance_type == "diag",
                           _resident(X, device), free, self.working_memory, sort_rows=sorts, kept_orders=kept)
        return plan._replace(rows=self.chunk_size) if self.chunk_size else plan

    def _chunk_rows(self, X, device: torch.device, d: int) -> int:
        """Rows per chunk of ``X`` (see :meth:`_plan`)."""
        return self._plan(X, len(X), device, d, fit=False).rows

    def fit_predict(self, X, y=None):
        return self.fit(X).predict(X)

    # ------------------------------------------------------------------ initialisation
    def _initial_means(self, data: ChunkedMatrix, K: int, gen, rng) -> torch.Tensor:
        n, d, device = data.n, data.d, data.device
        if not isinstance(self.init, str):
            m = as_float32_matrix(self.init, "init", d=d)
            return torch.as_tensor(m, device=device, dtype=torch.float64) - data.center.double()
        if self.init == "random":
            idx = rng.choice(n, size=K, replace=False)
            return (data.rows(idx) - data.center).double()
        m = seeding_sample_rows(n, K)
        idx = rng.choice(n, size=m, replace=False) if m < n else np.arange(n)
        sample = data.rows(idx).sub_(data.center)     # in place: the sample is max(50 K, 10^4) rows
        return kmeans_plusplus(sample, K, rng).double()

    def _global_variances(self, data, n, d, K):
        sq = torch.zeros(d, dtype=torch.float64, device=data.device)
        sub = max(1, 2 ** 21 // d)      # float64 temporaries of at most 16 MiB whatever the chunk size
        for _, x in data.chunks():
            for s in range(0, x.shape[0], sub):
                sq += x[s:s + sub].double().square_().sum(0)
        v = sq / n + self.reg_covar
        if self.covariance_type == "spherical":
            return v.mean().expand(K).clone()
        return v[None, :].expand(K, d).clone()

    # ------------------------------------------------------------------ k-means warm start
    @contextlib.contextmanager
    def _graphs(self, data: ChunkedMatrix, fn, counters=None):
        """Yield ``step(key, *inputs)``: a :class:`GraphReplay` of ``fn`` when iterations can be replayed as CUDA
        graphs (``cuda_graphs``, the Triton backend, X a float32 tensor on the CUDA device: chunks are views that
        keep their addresses), else ``fn(*inputs)``; on exit the replays are added to ``graph_replays_`` and the
        graphs are freed."""
        graphs = None
        if (self.cuda_graphs and hasattr(self._impl, "graph_key") and data.device.type == "cuda"
                and _resident(data.X, data.device)):
            graphs = GraphReplay(fn, counters)
        try:
            yield graphs if graphs is not None else (lambda key, *inputs: fn(*inputs))
        finally:
            if graphs is not None:
                self.graph_replays_ += graphs.replays
                graphs.reset()

    def _kmeans_step(self, data: ChunkedMatrix, means):
        """One Lloyd iteration on the device without a host sync (a CUDA graph may record it): means (K, D)
        float64 -> new means (K, D) float64 (an empty cluster keeps its centroid), counts (K,) float64, summary
        (2,) float64 [sum of squared distances, number of empty clusters], and the float32 centroids used."""
        K, d = means.shape
        c32 = means.to(torch.float32).contiguous()
        counts = torch.zeros(K, dtype=torch.float64, device=means.device)
        sums = torch.zeros(K, d, dtype=torch.float64, device=means.device)
        sse = torch.zeros((), dtype=torch.float64, device=means.device)
        for start, x, kw in self._stream(data, pieces=self._kmeans_rows):
            _, min_dist, cnt, sm = self._impl.kmeans_step(x, c32, **kw)
            counts += cnt.double()
            sums += sm.double()
            sse += min_dist.sum(dtype=torch.float64)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], means)
        summary = torch.stack([sse, (counts == 0).sum().double()])
        return means, counts, summary, c32

    def _kmeans(self, data: ChunkedMatrix, means: torch.Tensor, rng):
        n = data.n
        counts = None
        sse = math.nan
        lookahead = self._lookahead_on(data)
        # key "kmeans": every Lloyd iteration is the same kind
        with self._graphs(data, lambda m: self._kmeans_step(data, m)) as step:
            launch, discard = self._launchers(step, 2, ordered=False, key="kmeans")
            t_prev = time.perf_counter()
            pending = launch((means,)) if self.kmeans_iter > 0 else None
            for it in range(self.kmeans_iter):
                # lookahead: the next Lloyd step goes out before this one's summary is read (a fixed number of
                # steps: nothing is discarded unless a cluster empties)
                ahead = launch(pending.outputs[:1], ahead=True) if lookahead and it + 1 < self.kmeans_iter else None
                sse, n_empty = pending.summary()
                means, counts, _, c32 = pending.outputs
                n_empty = int(n_empty)
                if n_empty:   # rare: one more pass finds the rows farthest from their centroid
                    ahead = discard(ahead)   # it started from the centroids before the re-seeding
                    empty = torch.nonzero(counts == 0).flatten()
                    far = self._farthest_rows(data, n_empty,
                                              lambda x, kw: self._impl.kmeans_step(x, c32, **kw)[1],  # noqa: B023
                                              self._kmeans_rows)
                    means, counts = self._reseed_empty_clusters(means.clone(), counts.clone(), empty, far)
                now = time.perf_counter()
                self.kmeans_history_.append({"iteration": it + 1, "inertia": sse / n, "n_reseeded": n_empty,
                                             "seconds": now - t_prev})
                self._log(2 if it + 1 < self.kmeans_iter else 1,
                          f"[flashgmm] k-means {it + 1}/{self.kmeans_iter} inertia={sse / n:.6g} "
                          f"empty={n_empty} {now - t_prev:.2f}s")
                t_prev = now
                if it + 1 < self.kmeans_iter:
                    pending = ahead if ahead is not None else launch((means,))
        # (a replayed step's outputs were copied out of the graph's buffers by Launched: they outlive the graphs)
        return means, counts, sse

    def _farthest_rows(self, data: ChunkedMatrix, k: int, score_fn, pieces: int | None = None) -> "_FarthestRows":
        """One pass over the data keeping the ``k`` rows of largest ``score_fn(x, kw)`` (n,) (centred rows).

        Only run when a component must be re-seeded, so that a normal iteration pays nothing for it (a top-K per
        chunk in every iteration was part of the estimator's overhead over the kernels on a GPU)."""
        far = _FarthestRows(k=k)
        for start, x, kw in self._stream(data, pieces=pieces):
            far.update(score_fn(x, kw), start, x, kw.get("center"))
        return far

    def _reseed_empty_clusters(self, means, counts, empty, far):
        """Move empty centroids onto the rows farthest from their centroid (distinct rows, best first)."""
        rows = far.rows()
        for j, idx in enumerate(empty.tolist()):
            if j < rows.shape[0]:
                means[idx] = rows[j].double()
            counts[idx] = 1.0
        return means, counts

    def _kmeans_variances(self, data, means, counts):
        """Per-cluster variances of the hard k-means partition (one pass), floored by reg_covar.

        Spherical variances come from the k-means step's own squared distances (no extra buffer); diagonal ones
        are accumulated over sub-chunks so the temporaries stay under 16 MiB whatever the chunk size.
        """
        K, d = means.shape
        dev = data.device
        c32 = means.to(torch.float32).contiguous()
        cnt = torch.zeros(K, dtype=torch.float64, device=dev)
        spherical = self.covariance_type == "spherical"
        sq = torch.zeros(K if spherical else (K, d), dtype=torch.float64, device=dev)
        sub = max(1, 2 ** 21 // d)
        for _, x, kw in self._stream(data, pieces=self._kmeans_rows):
            labels, min_dist, c, _ = self._impl.kmeans_step(x, c32, **kw)
            cnt += c.double()
            if spherical:
                sq.index_add_(0, labels, min_dist.double())
                continue
            shift = kw.get("center")
            for s in range(0, x.shape[0], sub):
                ls = labels[s:s + sub]
                diff = x[s:s + sub] - c32[ls] if shift is None else x[s:s + sub] - shift - c32[ls]
                sq.index_add_(0, ls, (diff * diff).double())
        if spherical:
            sq = sq / d  # mean over features of the per-feature variances
            pooled = sq.sum() / max(float(cnt.sum()), 1.0)
            return torch.where(cnt > 1, sq / cnt.clamp_min(1), pooled) + self.reg_covar
        pooled = sq.sum(0) / max(float(cnt.sum()), 1.0)
        return torch.where(cnt[:, None] > 1, sq / cnt.clamp_min(1)[:, None], pooled[None, :]) + self.reg_covar

    # ------------------------------------------------------------------ EM
    def _estep_pass(self, data: ChunkedMatrix, m32, v32, lw32):
        """One E-step over all chunks: float64 ``(nk (K,), sx (K, D), sq (K,) or (K, D), log-likelihood sum ())``
        on the device, no host sync (a CUDA graph may record it)."""
        ordered = hasattr(self._impl, "fit_estep")     # Triton: per-chunk row orders (sparse E-step)
        total = None
        for start, x, kw in self._stream(data):
            if ordered:
                st = self._impl.fit_estep(start, x, m32, v32, lw32, **kw)
            else:
                st = self._impl.estep(x, m32, v32, lw32, **kw)
            part = (st.nk.double(), st.sx.double(), st.sq.double(), st.log_norm.sum(dtype=torch.float64))
            if total is None:     # the first chunk's own tensors (fresh per call): no zero fills and additions
                total = part
            else:
                for acc, p in zip(total, part):
                    acc += p
            st = part = p = None  # this chunk's statistics go before the next chunk's E-step allocates
        if total is None:         # no rows (fit refuses empty data; kept for direct calls)
            total = tuple(torch.zeros(shape, dtype=torch.float64, device=m32.device)
                          for shape in (m32.shape[:1], m32.shape, v32.shape, ()))
        return total

    def _em_step(self, data: ChunkedMatrix, means, var, weights):
        """One EM iteration on the device without a host sync (a CUDA graph may record it).

        means (K, D), var (K,) or (K, D), weights (K,): float64. Returns the M-step's ``means, var, weights``
        (float64; a component with less than DEGENERATE_NK rows' worth of responsibility keeps its parameters;
        variances floored at ``TritonBackend.floor_resolution`` when it gives one),
        ``degenerate`` (K,) bool (those components), ``summary`` (2,) float64 [log-likelihood sum, number of
        degenerate components] (Triton: (3,), then the number of the new parameters' collapsed components,
        ``TritonBackend.collapsed``), and the float32 parameters ``(m32, v32, lw32)`` the E-step ran with."""
        n = data.n
        m32 = means.to(torch.float32).contiguous()
        v32 = var.to(torch.float32).contiguous()
        lw32 = torch.log(weights.clamp_min(1e-300)).to(torch.float32)
        nk, sx, sq, ll_sum = self._estep_pass(data, m32, v32, lw32)
        fused = getattr(self._impl, "m_step", None)      # Triton: one kernel (kernels/mstep.py)
        out = fused(nk, sx, sq, ll_sum, means, var, n, self.reg_covar, DEGENERATE_NK) if fused is not None else None
        if out is None:
            res = getattr(self._impl, "floor_resolution", None)      # an opt-in bf16 floor (None by default)
            out = m_step(nk, sx, sq, ll_sum, means, var, n, self.reg_covar, res() if res is not None else None)
        collapsed = getattr(self._impl, "collapsed", None)   # Triton: components its kernels leave to torch
        if collapsed is not None:
            out = (*out[:4], torch.cat([out[4], collapsed(out[0], out[1]).sum().double()[None]]))
        return (*out, (m32, v32, lw32))

    def _launchers(self, step, summary_index: int, ordered: bool, key=None):
        """``(launch, discard)`` for an iteration loop over ``step(key, *inputs)`` (:meth:`_graphs`).

        ``launch(inputs, ahead=False)`` issues one iteration and returns its :class:`Launched`; with ``ahead`` (issued
        before the host reads the previous iteration) only if discarding it can be undone exactly, else None: an EM
        iteration (``ordered``: the Triton backend's row-order schedule) that rebuilds the row orders or probes the
        sparse E-step's pairs (``TritonBackend.blocks_lookahead``) is never issued ahead. ``discard(launched)``
        forgets one issued ahead (None passes): the backend's schedule and counters, the graph replay count and (for
        a key's first call) the graphs' run-then-capture bookkeeping are put back as before it, so that the later
        iterations launch exactly what they would have. Returns None."""
        graphs = isinstance(step, GraphReplay)

        def launch(inputs, ahead=False):
            state = self._impl.schedule_state() if ordered else None
            k = key
            if ordered:
                self._impl.begin_em_iteration()
                if ahead and self._impl.blocks_lookahead():
                    self._impl.restore_schedule(state)
                    return None
                k = self._impl.graph_key()
            replays = step.replays if graphs else 0
            first = graphs and step.first_call(k)
            out = Launched(step(k, *inputs), summary_index, own=graphs)
            out.undo = (state, (step.replays if graphs else 0) - replays, k if first else None)
            return out

        def discard(launched):
            if launched is not None:
                state, replays, first = launched.undo
                if ordered:
                    self._impl.restore_schedule(state)
                if graphs:
                    step.replays -= replays
                    if first is not None:
                        step.forget_first_call(first)
            return None

        return launch, discard

    def _lookahead_on(self, data: ChunkedMatrix) -> bool:
        """Issue each iteration before reading the previous one's summary (:mod:`._lookahead`): on CUDA, where
        reading it idles the GPU (``_lookahead`` "auto"), or always / never (True / False, for tests)."""
        if self._lookahead == "auto":
            return data.device.type == "cuda"
        return bool(self._lookahead)

    def _em(self, data: ChunkedMatrix, means, var, weights, n, rng):
        """EM iterations until ``tol`` or ``max_iter``, one host read each; sets the fitted parameters. Iterations
        the backend keys alike (``graph_key``) are replayed as CUDA graphs of :meth:`_em_step` when possible. With
        lookahead (:mod:`._lookahead`) iteration t + 1 is issued before iteration t's summary is read, and
        discarded when that summary stops the fit or re-seeds: same parameters and history as without."""
        ordered = hasattr(self._impl, "fit_estep")     # Triton: per-chunk row orders (sparse E-step)
        exact = hasattr(self._impl, "exact_components")   # Triton: collapsed components, named per iteration
        lookahead = self._lookahead_on(data)
        if exact:
            self._impl.exact_components = self._collapsed_components(means, var)
        k = means.shape[0]

        def in_torch(cols) -> bool:     # chunks with these collapsed components run wholly in torch (no kernel)
            return exact and self._impl.torch_only(cols, k)
        self.history_ = []
        self.converged_ = False
        prev = -math.inf
        ll = -math.inf
        gain = math.inf
        it = 0
        with self._graphs(data, lambda m, v, w: self._em_step(data, m, v, w),
                          getattr(self._impl, "order_stats", None)) as step:
            launch, discard = self._launchers(step, 4, ordered)

            t_prev = time.perf_counter()
            pending_in = (means, var, weights)
            pending = launch(pending_in) if self.max_iter > 0 else None
            elapsed = math.inf
            for it in range(1, self.max_iter + 1):
                ahead = None
                if lookahead and it < self.max_iter and elapsed < MAX_LOOKAHEAD_SECONDS:
                    ahead = launch(pending.outputs[:3], ahead=True)
                ll_sum, n_degenerate, *n_collapsed = pending.summary()
                cols = self._collapsed_components(*pending.outputs[:2]) if exact and n_collapsed[0] else ()
                while (cols and set(cols) - set(self._impl.exact_components)
                       and not in_torch(self._impl.exact_components)):
                    # components collapsed in this iteration: the kernels formed their means and variances from
                    # their operands' rounded rows, off the true rows by more than the new spread (they would lose
                    # their rows and be re-seeded over and over); redo the iteration with them on the exact path.
                    # Not when the iteration ran wholly in torch (most components collapsed): no rounded operands
                    ahead = discard(ahead)
                    discard(pending)
                    self._impl.exact_components = tuple(sorted(set(self._impl.exact_components) | set(cols)))
                    pending = launch(pending_in)
                    ll_sum, n_degenerate, *n_collapsed = pending.summary()
                    cols = self._collapsed_components(*pending.outputs[:2]) if n_collapsed[0] else ()
                means, var, weights, degenerate, _, used = pending.outputs
                ll, n_reseeded = ll_sum / n, int(n_degenerate)
                if not math.isfinite(ll):
                    raise FloatingPointError(
                        f"EM produced a non-finite log-likelihood at iteration {it}; try a larger reg_covar "
                        f"(now {self.reg_covar}) or check the input scale.")
                if n_reseeded:   # rare: one more pass finds the worst-explained rows under this iteration's
                    ahead = discard(ahead)       # parameters; the lookahead started before the re-seeding
                    m32, v32, lw32 = used
                    worst = self._farthest_rows(
                        data, n_reseeded, lambda x, kw: -self._impl.score(x, m32, v32, lw32, **kw)[0])  # noqa: B023
                    means, var, weights = self._reseed_components(means.clone(), var.clone(), weights.clone(),
                                                                  degenerate, worst, n)
                    if exact:
                        self._impl.exact_components = self._collapsed_components(means, var)
                elif exact and cols != self._impl.exact_components:
                    # the next iteration's collapsed components differ from those the lookahead ran with: redo it,
                    # unless both sets run it wholly in torch (the same computation whichever components they name)
                    if not (in_torch(cols) and in_torch(self._impl.exact_components)):
                        ahead = discard(ahead)
                    self._impl.exact_components = cols
                now = time.perf_counter()
                elapsed, t_prev = now - t_prev, now
                gain = ll - prev
                self.history_.append({"iteration": it, "log_likelihood": ll, "seconds": elapsed,
                                      "n_reseeded": n_reseeded})
                every = 1 if self.verbose and int(self.verbose) >= 2 else 10
                if it % every == 0 or it == 1:
                    self._log(1, f"[flashgmm] EM {it}/{self.max_iter} log-likelihood={ll:.6f} "
                                 f"gain={gain:+.3g} reseeded={n_reseeded} {elapsed:.2f}s")
                if abs(gain) < self.tol and n_reseeded == 0:
                    self.converged_ = True
                    discard(ahead)
                    break
                prev = ll
                if it < self.max_iter:
                    pending_in = (means, var, weights)
                    pending = ahead if ahead is not None else launch(pending_in)
            self._set_params(means, var, weights)
            if self.max_iter == 0:   # no EM iteration: the bound of the starting (fitted) parameters
                ll = self._mean_log_likelihood(data, means, var, weights)
                if not math.isfinite(ll):
                    raise FloatingPointError(
                        f"the starting parameters give a non-finite log-likelihood ({ll}); try a larger reg_covar "
                        f"(now {self.reg_covar}) or check the input scale.")
        self.n_iter_ = it if self.max_iter > 0 else 0
        self.lower_bound_ = ll
        if self.max_iter > 0 and not self.converged_:
            warnings.warn(self._convergence_message(gain), ConvergenceWarning, stacklevel=3)

    def _collapsed_components(self, means, var) -> tuple:
        """Triton backend: the components of these parameters (centred frame) its kernels leave to torch (one host
        read; ``TritonBackend.collapsed``)."""
        return tuple(torch.nonzero(self._impl.collapsed(means, var)).flatten().tolist())

    def _mean_log_likelihood(self, data: ChunkedMatrix, means, var, weights) -> float:
        """Mean per-sample log-likelihood of the fit data (float64 ``means``, ``var``, ``weights``, centred frame),
        in float32 parameters as an E-step computes it: one scoring pass."""
        m32 = means.to(torch.float32).contiguous()
        v32 = var.to(torch.float32).contiguous()
        lw32 = torch.log(weights.clamp_min(1e-300)).to(torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=m32.device)
        for _, x, kw in self._stream(data):
            total += self._impl.score(x, m32, v32, lw32, **kw)[0].sum(dtype=torch.float64)
        return float(total) / data.n

    def _convergence_message(self, gain: float) -> str:
        """The ConvergenceWarning's text: why the last iteration did not stop the fit. It stops at an iteration
        whose log-likelihood gain is under ``tol`` and that re-seeded no degenerate component."""
        h = self.history_
        head = f"EM did not converge in max_iter={self.max_iter} iterations"
        if h[-1]["n_reseeded"]:
            streak = next((i for i, e in enumerate(reversed(h)) if not e["n_reseeded"]), len(h))
            run = f" (re-seeding in each of the last {streak} iterations)" if streak > 1 else ""
            return (f"{head}: the last iteration re-seeded {h[-1]['n_reseeded']} degenerate component(s){run}, and "
                    f"a fit only converges at an iteration that re-seeds none (last gain {gain:.3g}, "
                    f"tol={self.tol}). Increase max_iter; if re-seeding persists, use fewer components (the data "
                    "may hold fewer groups, or distinct rows, than n_components).")
        if len(h) == 1:
            return (f"{head}: one iteration gives no log-likelihood gain to compare with tol={self.tol}; "
                    "increase max_iter.")
        return f"{head} (last |gain| {abs(gain):.3g} >= tol={self.tol}); increase max_iter or tol."

    def _reseed_components(self, means, var, weights, degenerate, worst, n):
        """Move degenerate components onto the worst-explained rows, with the median variance."""
        rows = worst.rows()
        idx = torch.nonzero(degenerate).flatten().tolist()
        med_var = var[~degenerate].median(0).values if (~degenerate).any() else var.median(0).values
        for j, k in enumerate(idx):
            if j < rows.shape[0]:
                means[k] = rows[j].double()
            var[k] = med_var
            weights[k] = 1.0 / n
        weights = weights / weights.sum()
        return means, var, weights

    def _set_params(self, means, var, weights):
        center = torch.as_tensor(self.center_, device=means.device)
        self.means_ = (means + center).to(torch.float32).cpu().numpy()
        self.covariances_ = var.to(torch.float32).cpu().numpy()
        self.weights_ = weights.to(torch.float32).cpu().numpy()
        self._dev_params = None

    # ------------------------------------------------------------------ inference
    def _check_fitted(self):
        if not hasattr(self, "means_"):
            raise NotFittedError("This GaussianMixture is not fitted yet: call fit(X) first.")

    def _inference_setup(self, X):
        self._check_fitted()
        d = self.means_.shape[1]
        n, _ = check_shape(X, "X", d=d)
        if getattr(self, "_impl", None) is None or getattr(self, "_device", None) is None:
            device = resolve_device(self.device)
            self.backend_, self._impl = resolve_backend(self.backend, device, self.precision)
            self._device = device
        device = self._device
        if getattr(self, "_dev_params", None) is None:
            center = torch.as_tensor(self.center_, device=device, dtype=torch.float64)
            means = (torch.as_tensor(self.means_, device=device, dtype=torch.float64) - center).float().contiguous()
            var = torch.as_tensor(self.covariances_, device=device, dtype=torch.float32).contiguous()
            lw = torch.log(torch.as_tensor(self.weights_, device=device, dtype=torch.float64).clamp_min(1e-300))
            self._dev_params = (center.float(), means, var, lw.float())
        center, means, var, lw = self._dev_params
        chunk = self._chunk_rows(X, device, d)
        data = ChunkedMatrix(X, device, chunk, center=center, name="X", d=d)
        return data, means, var, lw

    def score_samples(self, X) -> np.ndarray:
        """Per-sample log-likelihood log p(x).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        data, means, var, lw = self._inference_setup(X)
        out = np.empty(data.n, dtype=np.float64)
        for start, x, kw in self._stream(data, check=True):
            log_norm, _ = self._impl.score(x, means, var, lw, **kw)
            out[start:start + x.shape[0]] = log_norm.double().cpu().numpy()
        return out

    def score(self, X, y=None) -> float:
        """Mean per-sample log-likelihood of X."""
        return float(self.score_samples(X).mean())

    def predict(self, X) -> np.ndarray:
        """Most responsible component of each row: ndarray of shape (n_samples,), int64."""
        data, means, var, lw = self._inference_setup(X)
        out = np.empty(data.n, dtype=np.int64)
        for start, x, kw in self._stream(data, check=True):
            _, best = self._impl.score(x, means, var, lw, **kw)
            out[start:start + x.shape[0]] = best.cpu().numpy()
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities, ndarray of shape (n_samples, K), float32. Only for small inputs: it materialises
        (n, K); use :meth:`assign` (sparse) or :meth:`predict` for large n."""
        self._check_fitted()
        n, _ = check_shape(X, "X", d=self.means_.shape[1])
        K = self.means_.shape[0]
        if n * K > PREDICT_PROBA_MAX_ELEMENTS:
            raise ValueError(f"predict_proba would materialise a {n} x {K} matrix ({n * K * 4 / 2**30:.1f} GiB), "
                             f"over the {PREDICT_PROBA_MAX_ELEMENTS * 4 / 2**30:.0f} GiB bound: use assign(X) for "
                             "the sparse responsibilities above a threshold, or predict(X), or call predict_proba "
                             "on slices of X.")
        data, means, var, lw = self._inference_setup(X)
        out = np.empty((n, K), dtype=np.float32)
        for start, x in data.chunks(check=True):
            lp = _torch_backend.log_prob(x, means, var, lw)
            out[start:start + x.shape[0]] = torch.softmax(lp, dim=1).cpu().numpy()
        return out

    def assign(self, X, tau=None, max_assign=None):
        """Multi-assignment: for every row, the components whose responsibility exceeds ``tau``.

        The most responsible component is always included (even if its responsibility is <= tau); a row keeps at
        most ``max_assign`` components, the most responsible first.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        tau : float in [0, 1), default 1 / K (0 for K = 1, where every row has the one component)
            Any real number (Python or numpy scalar).
        max_assign : int >= 1, default K (no cap)

        Returns
        -------
        offsets : ndarray of shape (n_samples + 1,), int64
            Row i owns entries ``offsets[i]:offsets[i + 1]``.
        lists : ndarray of shape (nnz,), int64
            Component (posting list) ids, per row by decreasing responsibility.
        resp : ndarray of shape (nnz,), float32
            The responsibilities of those components.
        """
        self._check_fitted()
        K = self.means_.shape[0]
        tau = default_tau(K) if tau is None else check_real(tau, "tau", minimum=0.0, below=1.0)
        max_assign = K if max_assign is None else check_positive_int(max_assign, "max_assign")
        data, means, var, lw = self._inference_setup(X)
        offsets = np.zeros(data.n + 1, dtype=np.int64)
        lists, resp = [], []
        row = nnz = 0
        for _, x, kw in self._stream(data, check=True):
            c, li, r = self._impl.assign(x, means, var, lw, float(tau), int(max_assign), **kw)
            # the chunk's row ends on the device (a cumsum there, not on the host), then one copy each
            offsets[row + 1:row + 1 + c.shape[0]] = (torch.cumsum(c, 0) + nnz).cpu().numpy()
            lists.append(li.cpu().numpy().astype(np.int64, copy=False))
            resp.append(r.cpu().numpy().astype(np.float32, copy=False))
            row += c.shape[0]
            nnz += li.shape[0]
        if len(lists) == 1:
            return offsets, lists[0], resp[0]
        return offsets, np.concatenate(lists), np.concatenate(resp)

    # ------------------------------------------------------------------ model selection
    def _n_parameters(self) -> int:
        K, d = self.means_.shape
        cov = K if self.covariance_type == "spherical" else K * d
        return int(K * d + cov + K - 1)

    def bic(self, X) -> float:
        """Bayesian information criterion on X (lower is better)."""
        n = check_shape(X, "X", d=self.means_.shape[1] if hasattr(self, "means_") else None)[0]
        return float(-2.0 * self.score(X) * n + self._n_parameters() * math.log(n))

    def aic(self, X) -> float:
        """Akaike information criterion on X (lower is better)."""
        n = check_shape(X, "X", d=self.means_.shape[1] if hasattr(self, "means_") else None)[0]
        return float(-2.0 * self.score(X) * n + 2 * self._n_parameters())

    # ------------------------------------------------------------------ misc
    def _log(self, level: int, msg: str):
        if self.verbose and int(self.verbose) >= level:
            print(msg, file=sys.stderr, flush=True)

    def get_params(self, deep=True) -> dict:
        return {k: getattr(self, k) for k in (
            "n_components", "covariance_type", "max_iter", "kmeans_iter", "tol", "reg_covar", "init", "backend",
            "device", "chunk_size", "seed", "verbose", "precision", "weights_init", "covariances_init",
            "sparse_estep", "cuda_graphs", "data_on_device", "working_memory")}

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_impl", "_dev_params", "_device"):
            state.pop(k, None)
        return state

    def __repr__(self) -> str:
        return (f"GaussianMixture(n_components={self.n_components}, covariance_type={self.covariance_type!r}, "
                f"backend={self.backend!r})")


SEED_GRAPH_STEPS = 32   # k-means++ steps per CUDA graph (kmeans_plusplus on a GPU)


def seeding_sample_rows(n: int, K: int) -> int:
    """Rows of the sample that the k-means++ initialisation seeds K components on: max(50 K, 10^4), at most n."""
    return min(n, max(50 * K, 10000))


SEEDING_PATHS = ("pruned", "fused", "update", "torch")
PRUNED_SEEDING_MIN_K = 2048   # below, the pruned path's extra kernel per seed costs more than the rows it skips


def kmeans_plusplus(x: torch.Tensor, K: int, rng, cuda_graphs: bool = True, path: str | None = None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling, no greedy trials) on the rows of x (n, D): returns (K, D) distinct rows.

    Each seed is drawn by inverse CDF: one uniform per seed from ``rng`` (numpy, drawn up front) against the
    cumulative squared distances on x's device, so the loop never waits for the device (the numpy draw over an
    n-vector copied to the host every step cost ~0.9 ms per seed on an H100 run: 0.9 s for K=1024, more than
    the whole EM). On a GPU (``cuda_graphs``) the steps are replayed as CUDA graphs of ``SEED_GRAPH_STEPS``
    steps: the same kernels, the same seeds, without a launch per kernel. When every remaining row coincides
    with a seed (total distance 0), duplicates are replaced by unused rows at the end.

    ``path`` picks a step's kernels: ``"fused"`` (the distance update with tile sums, then the one-program draw of
    ``kernels/seeding.py``: two kernels per seed), ``"pruned"`` (the same, with the new seed's distances to the
    earlier seeds first, so that the update reads only rows the new seed may bring closer: three kernels per
    seed, the same d2 bit for bit), ``"update"`` (that update, then torch's cumulative sum and
    search), ``"torch"`` (torch only); None takes "pruned" (K >= ``PRUNED_SEEDING_MIN_K``) or "fused" for float32
    samples on a GPU with Triton, else "torch" (H100, sample of 50 K rows, D=128: "fused" 14.0 vs "pruned" 19.6 ms
    at K=1024, 201 vs 147 ms at K=4096, 2786 vs 1498 ms at K=16384; bench_ann/results/v25_seeding).
    All four draw the same seeds but for uniforms within ~1e-16 relative of a boundary (summation order)."""
    n = x.shape[0]
    if path is None:
        path = ("torch" if not (x.is_cuda and x.dtype == torch.float32 and _triton_available()) else
                "pruned" if K >= PRUNED_SEEDING_MIN_K else "fused")
    if path not in SEEDING_PATHS:
        raise ValueError(f"path must be one of {SEEDING_PATHS} or None, got {path!r}")
    u = torch.as_tensor(rng.random(K), dtype=torch.float64, device=x.device)
    first = int(rng.integers(n))
    seeds = torch.empty(K, dtype=torch.int64, device=x.device)
    seeds[0] = first
    j = torch.ones(1, dtype=torch.int64, device=x.device)    # the next seed's index, on the device
    d2 = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    if path in ("fused", "pruned"):
        from .kernels import seeding as ks
        xc = x.contiguous()
        tile_sums = torch.empty(ks.block_sums_size(n), dtype=torch.float64, device=x.device)
        last = seeds[:1].clone()          # the newest seed's row
        if path == "pruned":
            nearest = torch.zeros(n, dtype=torch.int32, device=x.device)
            gaps = torch.zeros(K, dtype=torch.float64, device=x.device)

            def update():
                ks.pruned_min_sq_dist_(d2, xc, last, tile_sums, nearest, gaps, j)
        else:
            def update():
                ks.min_sq_dist_(d2, xc, last, tile_sums)
        update()

        def step():
            ks.draw_seed_(seeds, j, last, u, d2, tile_sums)
            if path == "pruned":
                ks.seed_gaps_(gaps, xc, seeds, j, last)
            update()
    else:
        update = _seed_distance_update(x, kernel=path == "update")
        update(d2, seeds[:1])

        def step():
            cdf = torch.cumsum(d2, 0)
            # the first row whose cumulative distance exceeds u_j * total: a row with d2 = 0 is never drawn while
            # the total is positive (its cdf equals its predecessor's)
            idx = torch.searchsorted(cdf, u.index_select(0, j) * cdf[-1:], right=True).clamp_max_(n - 1)
            seeds.index_copy_(0, j, idx)
            update(d2, idx)
            j.add_(1)
    left = K - 1
    if cuda_graphs and x.is_cuda and left > 2 * SEED_GRAPH_STEPS:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):          # warm-up steps (real ones) off the capturing stream
            for _ in range(2):
                step()
        torch.cuda.current_stream(x.device).wait_stream(side)
        left -= 2
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(SEED_GRAPH_STEPS):
                step()
        for _ in range(left // SEED_GRAPH_STEPS):
            graph.replay()
        left %= SEED_GRAPH_STEPS
        del graph
    for _ in range(left):
        step()
    order = seeds.cpu().numpy()
    _, first_seen = np.unique(order, return_index=True)
    if len(first_seen) < K:   # degenerate data: fewer distinct rows at positive distance than K
        keep = order[np.sort(first_seen)]
        unused = np.setdiff1d(np.arange(n), keep)
        order = np.concatenate([keep, rng.choice(unused, size=K - len(keep), replace=False)])
    return x[torch.as_tensor(order, device=x.device)].clone()


def _seed_distance_update(x: torch.Tensor, kernel: bool):
    """``f(d2, s) -> d2``: d2 (n,) float64 <- min(d2, squared distances of the rows of x (n, D) to row s), in
    place, s (1,) int64 on x's device. The fused kernel (``kernels/seeding.py``) if ``kernel`` (float32 samples),
    else torch (both sum fp32 differences: exact zeros for rows equal to the seed)."""
    if kernel:
        from .kernels import min_sq_dist_
        xc = x.contiguous()
        return lambda d2, s: min_sq_dist_(d2, xc, s)
    return lambda d2, s: torch.minimum(d2, _sq_dist_to_row(x, x.index_select(0, s)), out=d2)


def _sq_dist_to_row(x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Squared distances (n,) float64 of the rows of x (n, D) to ``row`` (1, D), by direct differences (exact
    zeros for equal rows) without an (n, D) temporary."""
    return torch.cdist(x, row, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square().double()


class _FarthestRows:
    """Keeps the k rows with the largest score seen across chunks (for re-seeding empty components)."""

    def __init__(self, k: int):
        self.k = k
        self.scores = None
        self.vecs = None

    def update(self, score: torch.Tensor, start: int, x: torch.Tensor, center=None):
        """score (n,), x (n, D) raw rows of which ``center`` (D,) is subtracted when given."""
        m = min(self.k, score.shape[0])
        s, i = torch.topk(score.float(), m)
        v = x[i] if center is None else x[i] - center
        if self.scores is None:
            self.scores, self.vecs = s, v
        else:
            s = torch.cat([self.scores, s])
            v = torch.cat([self.vecs, v])
            m = min(self.k, s.shape[0])
            s, i = torch.topk(s, m)
            self.scores, self.vecs = s, v[i]

    def rows(self) -> torch.Tensor:
        return self.vecs if self.vecs is not None else torch.empty(0)
