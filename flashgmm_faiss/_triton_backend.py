"""Triton backend: the contract of :mod:`flashgmm_faiss._torch_backend` on the fused kernels.

``GaussianMixture(backend="triton", precision=...)`` builds one :class:`TritonBackend` and calls its methods
on each chunk (float32, contiguous, centred, on the GPU); the methods have exactly the signatures, shapes and
meaning of the same-named functions in ``_torch_backend``. The kernels live in ``flashgmm_faiss.kernels``
(``kernels/`` in the source tree); they are imported lazily so that importing this module costs nothing and
never touches Triton unless a method runs.

Rows wider than the kernels' single-tile limit (D > 256), and ``max_assign > 64``, fall back to the torch
implementation.
"""
from __future__ import annotations

from . import _torch_backend as _tb
from ._torch_backend import EStepStats

PRECISIONS = ("tf32", "bf16", "bf16x3", "ieee")
MAX_D = 256        # kernels.estep.MAX_D: one padded row per tile
# The fused top-M kernel keeps M entries per row in registers and merges each block in M unrolled rounds: it is
# the right tool for IVF copy caps (1..16); past that its compile time and O(n K M) merge cost exceed the torch
# path (one chunk-sized GEMM + topk), which is used instead. The kernel itself accepts up to
# kernels.assign.MAX_ASSIGN = 64.
MAX_ASSIGN = 16


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
    """

    fuses_centering = True

    def __init__(self, precision: str = "tf32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.x_absmax = None
        self._cache = None      # (tensors, their versions, bound, Params) of the last E-step parameters

    def __repr__(self) -> str:
        return f"TritonBackend(precision={self.precision!r})"

    @staticmethod
    def _k():
        from . import kernels  # lazy: Triton (and TRITON_INTERPRET) only matter once a kernel runs
        return kernels

    def log_prob(self, x, means, var, log_weights):
        """Weighted log densities (n, K): the n x K matrix is the point, so this stays in torch."""
        return _tb.log_prob(x, means, var, log_weights)

    def _params(self, means, var, log_weights):
        """The kernels' prepared parameters, reused across the chunks of one EM iteration: a hit needs the very
        same tensor objects (held by the cache, so never recycled), unmodified (``_version``), and the same bound
        of the data; anything else prepares afresh."""
        if self.x_absmax is None:
            return None
        key = (means, var, log_weights)
        versions = tuple(t._version for t in key)
        c = self._cache
        if c is not None and all(a is b for a, b in zip(c[0], key)) and c[1] == versions and c[2] == self.x_absmax:
            return c[3]
        p = self._k().prepare(means, var, log_weights, self.precision, self.x_absmax)
        self._cache = (key, versions, self.x_absmax, p)
        return p

    def estep(self, x, means, var, log_weights, center=None) -> EStepStats:
        if x.shape[1] > MAX_D:
            return _tb.estep(x, means, var, log_weights, center)
        return EStepStats(*self._k().estep(x, means, var, log_weights, precision=self.precision, center=center,
                                           x_absmax=self.x_absmax, params=self._params(means, var, log_weights)))

    def score(self, x, means, var, log_weights, center=None):
        if x.shape[1] > MAX_D:
            return _tb.score(x, means, var, log_weights, center)
        return self._k().score(x, means, var, log_weights, precision=self.precision, center=center,
                               x_absmax=self.x_absmax)

    def kmeans_step(self, x, centroids, center=None):
        if x.shape[1] > MAX_D:
            return _tb.kmeans_step(x, centroids, center)
        return self._k().kmeans_step(x, centroids, precision=self.precision, center=center, x_absmax=self.x_absmax)

    def assign(self, x, means, var, log_weights, tau: float, max_assign: int, center=None):
        if x.shape[1] > MAX_D or min(int(max_assign), means.shape[0]) > MAX_ASSIGN:
            return _tb.assign(x, means, var, log_weights, tau, max_assign, center)
        return self._k().assign(x, means, var, log_weights, tau, max_assign, precision=self.precision,
                                center=center, x_absmax=self.x_absmax)
