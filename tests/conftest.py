import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLASHGMM_SHARED_DATA", REPO.parent / "shared" / "data"))


def use_triton_interpreter_without_cuda() -> bool:
    """For the kernel test modules, at import: without CUDA, set ``TRITON_INTERPRET=1`` (the kernels then run on CPU
    tensors; it must be set before ``flashgmm_faiss.kernels`` is imported, else the module is skipped); skip the
    module when Triton is missing. Returns whether CUDA is available."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if "flashgmm_faiss.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("flashgmm_faiss.kernels was imported before TRITON_INTERPRET=1 could be set",
                        allow_module_level=True)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    return has_cuda


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_collapsed_components(monkeypatch):
    """The estimator sees no collapsed component (``TritonBackend.collapsed`` all False), so that every EM iteration
    runs the kernels alone: for the tests of the iteration schedule (graph keys, lookahead discards, memory plans),
    whose small clusters collapse components onto single rows (reg_covar 1e-6), which would make those iterations
    eager and add discards. The collapsed components themselves are tested in test_collapsed.py."""
    from flashgmm_faiss._triton_backend import TritonBackend
    monkeypatch.setattr(TritonBackend, "collapsed", staticmethod(
        lambda means, var: torch.zeros(means.shape[0], dtype=torch.bool, device=means.device)))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def make_blobs(n=600, d=5, k=4, seed=0, spread=4.0, offset=0.0):
    """Gaussian blobs with unequal spherical scales: (n, d) float32 data and labels."""
    r = np.random.default_rng(seed)
    centers = r.normal(scale=spread, size=(k, d))
    scales = r.uniform(0.5, 1.5, size=k)
    labels = r.integers(k, size=n)
    X = centers[labels] + r.normal(size=(n, d)) * scales[labels, None] + offset
    return X.astype(np.float32), labels


def assert_close(actual, expected, rtol, atol=0.0, what="value"):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = np.abs(actual - expected)
    tol = atol + rtol * np.abs(expected)
    if not np.all(err <= tol):
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(f"{what}: worst element {i}: got {actual[i]!r}, expected {expected[i]!r} "
                             f"(abs err {err[i]:.3g}, allowed {tol[i]:.3g})")
