"""Streaming rows of a large matrix to the compute device, one chunk at a time.

``X`` may be a numpy array, an ``np.memmap``, a torch tensor (on any device; read as data: detached, so a
tensor that requires grad is accepted, and never modified) or an h5py dataset. Only one chunk of at most
``chunk_size`` rows is converted to float32 and moved to the device at a time, so memory beyond X is
O(chunk_size * D).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ._validation import check_finite, check_shape, is_h5py_dataset, is_torch_tensor


class ChunkedMatrix:
    """A read-only view of an (n, d) matrix that yields float32 device chunks.

    Parameters
    ----------
    X : array-like of shape (n, d)
        numpy array / memmap (any real dtype, any strides), torch tensor (detached: autograd never sees the
        chunks) or h5py dataset. Never modified.
    device : torch.device
        Where chunks are delivered.
    chunk_size : int
        Rows per chunk.
    center : torch.Tensor of shape (d,) or None
        Subtracted from every chunk (on the device) when given.
    name : str
        Used in error messages.
    """

    def __init__(self, X, device: torch.device, chunk_size: int, center: torch.Tensor | None = None,
                 name: str = "X", d: int | None = None):
        self.n, self.d = check_shape(X, name, d)
        self.X = X.detach() if is_torch_tensor(X) else X   # data, not a graph input: a view, no copy
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.center = center
        self.name = name

    def __len__(self) -> int:
        return self.n

    def raw_chunk(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as an uncentred float32 tensor on the device (a view when possible)."""
        X = self.X
        if is_torch_tensor(X):
            x = X[start:stop]
            if x.device != self.device or x.dtype != torch.float32:
                x = x.to(device=self.device, dtype=torch.float32, non_blocking=True)
            return x if x.is_contiguous() else x.contiguous()
        if is_h5py_dataset(X):
            x = X[start:stop]
        else:
            x = X[start:stop]
        with np.errstate(over="ignore"):   # float64 beyond float32's range: check_finite names the row
            x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # read-only memmap: torch refuses to alias it, copy the chunk
            x = x.copy()
        t = torch.from_numpy(x)
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    def chunks(self, check: bool = False, centered: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start_row, chunk) with chunk of shape (rows, d), float32, centred if a centre was given and
        ``centered`` (backends that centre inside their kernels take the raw chunk: no centred copy)."""
        for start in range(0, self.n, self.chunk_size):
            stop = min(self.n, start + self.chunk_size)
            x = self.raw_chunk(start, stop)
            if check:   # the source rows tell float64 values beyond float32's range from Inf (failures only)
                check_finite(x, self.name, row_offset=start, source_row=lambda i, s=start: self.X[s + i])
            if centered and self.center is not None:
                x = x - self.center
            yield start, x

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Gather arbitrary rows (sorted internally for memmap/h5py friendliness), uncentred float32 on device."""
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        X = self.X
        if is_torch_tensor(X):
            x = X[torch.as_tensor(index, device=X.device)].to(self.device, torch.float32)
            return x.contiguous()
        if is_h5py_dataset(X):
            uniq, inv = np.unique(sorted_idx, return_inverse=True)
            x = np.asarray(X[uniq.tolist()], dtype=np.float32)[inv]
        else:
            x = np.asarray(X[sorted_idx], dtype=np.float32)
        out = np.empty_like(x)
        out[order] = x
        return torch.from_numpy(np.ascontiguousarray(out)).to(self.device)
