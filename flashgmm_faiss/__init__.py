"""flashgmm-faiss: Gaussian Mixture Models as coarse quantizers for FAISS IVF indexes.

Main entry points:

* :class:`GaussianMixture` -- streaming EM (torch backend on CPU/GPU, fused Triton kernels on GPU).
* :func:`build_gmm_ivf` / :class:`GMMIVFIndex` -- a FAISS ``IndexIVFFlat`` whose coarse centroids are the GMM
  means, with multi-assignment add and deduplicating search.
* :func:`train_ivf_with_gmm`, :func:`add_multi_assigned` -- the same for any FAISS ``IndexIVF``.
* :func:`search_with_dco`, :func:`recall_at_k`, :func:`sweep` -- evaluation with distance-computation counts.
"""
from .gmm import ConvergenceWarning, GaussianMixture, NotFittedError

__version__ = "0.1.0"

__all__ = ["GaussianMixture", "ConvergenceWarning", "NotFittedError", "__version__"]

try:  # the index layer needs faiss (extra [cpu] or [gpu]); the GMM alone does not
    from .ivf import GMMIVFIndex, add_multi_assigned, add_preassigned, build_gmm_ivf, train_ivf_with_gmm
    from .evaluation import DCO, recall_at_k, search_with_dco, sweep

    __all__ += ["GMMIVFIndex", "build_gmm_ivf", "train_ivf_with_gmm", "add_multi_assigned", "add_preassigned",
                "DCO", "search_with_dco", "recall_at_k", "sweep"]
except ImportError as _e:  # pragma: no cover - depends on the install
    if "faiss" not in str(_e):
        raise
