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

PRECISIONS = ("tf32", "bf16", "ieee")
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
    precision : {"tf32", "bf16", "ieee"}, default="tf32"
        GEMM precision inside the kernels. ``"tf32"``: fp32 inputs, split-bf16 tensor-core products with fp32
        accumulation (relative error of Nk, Sx, Sq ~1e-4 against float64 on centred SIFT-like data: better
        than a plain tf32 product, which gives ~3e-3 there; see ``kernels/estep.py``). ``"bf16"``: one bf16
        product per GEMM (~2e-2 on the same data; fastest). ``"ieee"``: exact fp32 products (slowest; the mode
        the CPU interpreter tests use).
    """

    def __init__(self, precision: str = "tf32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision

    def __repr__(self) -> str:
        return f"TritonBackend(precision={self.precision!r})"

    @staticmethod
    def _k():
        from . import kernels  # lazy: Triton (and TRITON_INTERPRET) only matter once a kernel runs
        return kernels

    def log_prob(self, x, means, var, log_weights):
        """Weighted log densities (n, K): the n x K matrix is the point, so this stays in torch."""
        return _tb.log_prob(x, means, var, log_weights)

    def estep(self, x, means, var, log_weights) -> EStepStats:
        if x.shape[1] > MAX_D:
            return _tb.estep(x, means, var, log_weights)
        return EStepStats(*self._k().estep(x, means, var, log_weights, precision=self.precision))

    def score(self, x, means, var, log_weights):
        if x.shape[1] > MAX_D:
            return _tb.score(x, means, var, log_weights)
        return self._k().score(x, means, var, log_weights, precision=self.precision)

    def kmeans_step(self, x, centroids):
        if x.shape[1] > MAX_D:
            return _tb.kmeans_step(x, centroids)
        return self._k().kmeans_step(x, centroids, precision=self.precision)

    def assign(self, x, means, var, log_weights, tau: float, max_assign: int):
        if x.shape[1] > MAX_D or min(int(max_assign), means.shape[0]) > MAX_ASSIGN:
            return _tb.assign(x, means, var, log_weights, tau, max_assign)
        return self._k().assign(x, means, var, log_weights, tau, max_assign, precision=self.precision)
