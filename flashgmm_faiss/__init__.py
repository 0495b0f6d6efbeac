"""flashgmm-faiss: Gaussian Mixture Models as coarse quantizers for FAISS IVF indexes.

Main entry points (imported lazily, so ``flashgmm_faiss.io`` does not pay for torch or faiss):

* :class:`GaussianMixture` -- streaming EM (torch backend on CPU/GPU, fused Triton kernels on GPU).
* :func:`build_gmm_ivf` / :class:`GMMIVFIndex` -- a FAISS ``IndexIVFFlat`` whose coarse centroids are the GMM
  means, with multi-assignment add and deduplicating search.
* :func:`train_ivf_with_gmm`, :func:`add_multi_assigned`, :func:`add_preassigned` -- the same for any FAISS
  ``IndexIVF``.
* :func:`search_with_dco`, :func:`recall_at_k`, :func:`sweep` -- evaluation with distance-computation counts.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GaussianMixture": "gmm", "ConvergenceWarning": "gmm", "NotFittedError": "gmm",
    "GMMIVFIndex": "ivf", "build_gmm_ivf": "ivf", "train_ivf_with_gmm": "ivf", "add_multi_assigned": "ivf",
    "add_preassigned": "ivf",
    "DCO": "evaluation", "search_with_dco": "evaluation", "recall_at_k": "evaluation", "sweep": "evaluation",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flashgmm_faiss' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ImportError as e:
        if "faiss" in str(e):
            raise ImportError(f"flashgmm_faiss.{name} needs FAISS: pip install 'flashgmm-faiss[cpu]' "
                              "(or [gpu]).") from e
        raise
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
