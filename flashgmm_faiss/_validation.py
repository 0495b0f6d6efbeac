"""Input checks shared by the estimator, the index and the CLI.

Every public entry point funnels its arrays through :func:`as_float32_matrix` (whole arrays that are already
in memory) or :func:`check_chunk` (one streamed chunk), so a user sees the same clear message everywhere.
"""
from __future__ import annotations

import math
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


FLOAT32_MAX = float(np.finfo(np.float32).max)   # ~3.4e38: larger finite values (float64 data) become Inf


def _bad_kind(row) -> str:
    """"NaN", "Inf" or "range" for a row that is not finite once in float32: ``row`` is a 1-D numpy array or
    torch tensor in its own dtype (a finite float64 row that is not finite in float32 exceeds float32's range)."""
    if is_torch_tensor(row):
        row = row.detach()
        if not row.dtype.is_floating_point:
            return "range"
        return "NaN" if bool(torch.isnan(row).any()) else "Inf" if bool(torch.isinf(row).any()) else "range"
    row = np.asarray(row)
    if row.dtype.kind != "f":
        return "range"
    return "NaN" if np.isnan(row).any() else "Inf" if np.isinf(row).any() else "range"


def _raise_bad_row(name: str, row: int, kind: str):
    if kind == "range":
        raise ValueError(f"{name} has values beyond float32's range (|x| > {FLOAT32_MAX:.2g}; first bad row: {row}): "
                         "the data are converted to float32. Rescale them (e.g. divide by a constant) before "
                         "fitting, adding or searching.")
    raise ValueError(f"{name} contains {kind} (first bad row: {row}). Remove or impute non-finite values "
                     "before fitting, adding or searching.")


def check_finite(x, name: str = "X", row_offset: int = 0, source_row=None) -> None:
    """Raise a ValueError naming the first row with NaN or Inf. ``x`` is a numpy array or torch tensor.

    ``source_row``, if given, is ``f(i) -> row i of the data x was converted from`` (local index, original
    dtype): read only for the first bad row, to tell values beyond float32's range (finite float64 values that
    became Inf) from NaN and Inf in the data.
    """
    if is_torch_tensor(x):
        if not x.dtype.is_floating_point or x.numel() == 0:
            return
        # min and max propagate NaN and reach +-Inf: no (n, d) mask unless something is wrong (a chunk of 2^20
        # rows of 128 features would need a 128 MiB one)
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
        bad = ~torch.isfinite(x)
        if not bool(bad.any()):
            return
        local = int(bad.any(dim=1).nonzero()[0, 0])
    else:
        if x.dtype.kind != "f":
            return
        finite = np.isfinite(x)
        if finite.all():
            return
        local = int(np.nonzero(~finite.all(axis=1))[0][0])
    _raise_bad_row(name, local + row_offset, _bad_kind(x[local] if source_row is None else source_row(local)))


def as_float32_matrix(X, name: str = "X", d: int | None = None) -> np.ndarray:
    """Return X as a C-contiguous float32 numpy array of shape (n, d), after checking it.

    Accepts numpy arrays (any real dtype, any strides), memmaps, torch tensors (detached, moved to CPU; never
    modified) and h5py datasets (read whole). Values are converted to float32: float64 is accepted (finite values
    beyond float32's range, ~3.4e38, are refused with the first such row), integers above 2^24 are rounded;
    non-contiguous input is accepted and copied.
    """
    check_shape(X, name, d)
    if is_torch_tensor(X):
        source = X.detach()
        X = source.to("cpu", torch.float32).numpy()
    else:
        source = X = X[...] if is_h5py_dataset(X) else X
    with np.errstate(over="ignore"):   # float64 beyond float32's range: check_finite names the row
        X = np.ascontiguousarray(X, dtype=np.float32)
    check_finite(X, name, source_row=lambda i: source[i])
    return X


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def is_real_number(value) -> bool:
    """A real Python or numpy number (int, float, np.integer, np.floating), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def default_tau(K: int) -> float:
    """The default responsibility threshold of multi-assignment: 1 / K, or 0 for K = 1 (a single list: every
    vector goes to it, tau plays no role)."""
    return 1.0 / K if K > 1 else 0.0


def check_real(value, name: str, minimum: float | None = None, below: float | None = None,
               finite: bool = True) -> float:
    """Return ``value`` as a Python float after checking it: a real number (Python or numpy, not a bool; else a
    TypeError), not NaN, finite if ``finite``, ``>= minimum`` and ``< below`` when given (else a ValueError)."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)) or (minimum is not None and v < minimum) \
            or (below is not None and v >= below):
        what = "a finite number" if finite else "a number"
        if minimum is not None and below is not None:
            what += f" in [{minimum:g}, {below:g})"
        elif minimum is not None or below is not None:
            what += f" >= {minimum:g}" if minimum is not None else f" < {below:g}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return v


def check_seed(seed) -> int | None:
    """Return ``seed`` as an int in [0, 2^64) or None (fresh entropy); a clear error otherwise."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer or None (a fresh seed), got {seed!r} "
                        f"({type(seed).__name__}).")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64) or None (a fresh seed), got {seed!r}.")
    return int(seed)


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
