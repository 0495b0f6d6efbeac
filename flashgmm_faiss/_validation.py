"""Input checks shared by the estimator, the index and the CLI.

Every public entry point funnels its arrays through :func:`as_float32_matrix` (whole arrays that are already
in memory) or :func:`check_chunk` (one streamed chunk), so a user sees the same clear message everywhere.
"""
from __future__ import annotations

import numbers

import numpy as np

try:  # torch is a hard dependency, but keep the import local to this guard for clearer errors
    import torch
except ImportError:  # pragma: no cover
    torch = None


def _describe(X) -> str:
    return f"{type(X).__module__}.{type(X).__name__}"


def is_torch_tensor(X) -> bool:
    return torch is not None and isinstance(X, torch.Tensor)


def is_h5py_dataset(X) -> bool:
    mod = type(X).__module__ or ""
    return mod.startswith("h5py") and hasattr(X, "shape") and hasattr(X, "dtype")


def check_shape(X, name: str = "X", d: int | None = None) -> tuple[int, int]:
    """Check that X is a non-empty 2-D array-like (numpy, memmap, torch, h5py) and return (n, d)."""
    shape = getattr(X, "shape", None)
    if shape is None:
        raise TypeError(
            f"{name} must be a 2-D array (numpy array, np.memmap, torch.Tensor or h5py.Dataset), "
            f"got {_describe(X)}. Convert it with np.asarray(...) first."
        )
    if len(shape) != 2:
        hint = ("reshape your data with X.reshape(-1, 1) if it has a single feature "
                "or X.reshape(1, -1) if it contains a single sample") if len(shape) == 1 else \
            "flatten the trailing dimensions with X.reshape(len(X), -1)"
        raise ValueError(f"Expected 2D array for {name}, got {len(shape)}D array of shape {tuple(shape)} instead: "
                         f"{hint}.")
    n, dim = int(shape[0]), int(shape[1])
    if n == 0:
        raise ValueError(f"{name} is empty (0 rows): at least one vector is required.")
    if dim == 0:
        raise ValueError(f"{name} has 0 features (shape {tuple(shape)}): vectors must have at least one dimension.")
    if d is not None and dim != d:
        raise ValueError(f"Dimension mismatch: {name} has {dim} features per row but the model/index expects {d}.")
    dtype = X.dtype
    if is_torch_tensor(X):
        ok = dtype.is_floating_point or dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    else:
        kind = np.dtype(dtype).kind
        ok = kind in "fiu"
    if not ok:
        raise TypeError(f"{name} has dtype {dtype}; expected a real numeric dtype (float32 preferred, "
                        "float16/float64/uint8/int8 are converted to float32).")
    return n, dim


def check_finite(x, name: str = "X", row_offset: int = 0) -> None:
    """Raise a ValueError naming the first row with NaN or Inf. ``x`` is a numpy array or torch tensor."""
    if is_torch_tensor(x):
        if not x.dtype.is_floating_point or x.numel() == 0:
            return
        # min and max propagate NaN and reach +-Inf: no (n, d) mask unless something is wrong (a chunk of 2^20
        # rows of 128 features would need a 128 MiB one)
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0]) + row_offset
            kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise ValueError(f"{name} contains {kind} (first bad row: {row}). Remove or impute non-finite values "
                             "before fitting, adding or searching.")
        return
    if x.dtype.kind != "f":
        return
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.nonzero(~finite.all(axis=1))[0][0]) + row_offset
        kind = "NaN" if np.isnan(x).any() else "Inf"
        raise ValueError(f"{name} contains {kind} (first bad row: {row}). Remove or impute non-finite values "
                         "before fitting, adding or searching.")


def as_float32_matrix(X, name: str = "X", d: int | None = None) -> np.ndarray:
    """Return X as a C-contiguous float32 numpy array of shape (n, d), after checking it.

    Accepts numpy arrays (any real dtype, any strides), memmaps, torch tensors (moved to CPU) and h5py datasets
    (read whole). float64 is accepted and converted; non-contiguous input is accepted and copied.
    """
    check_shape(X, name, d)
    if is_torch_tensor(X):
        X = X.detach().to("cpu", torch.float32).numpy()
    elif is_h5py_dataset(X):
        X = X[...]
    X = np.ascontiguousarray(X, dtype=np.float32)
    check_finite(X, name)
    return X


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_ids(ids, n: int) -> np.ndarray:
    """Check user ids: n unique non-negative int64 values."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must be a 1-D array with one id per vector ({n}), got shape {ids.shape}.")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}.")
    ids = ids.astype(np.int64)
    if n and ids.min() < 0:
        raise ValueError("ids must be non-negative (-1 is FAISS's 'no result' marker).")
    if np.unique(ids).shape[0] != n:
        raise ValueError("ids must be unique: a multi-assigned index deduplicates results by id.")
    return ids
