"""Vector file formats, the ann-benchmarks HDF5 layout, a ``Dataset`` object and exact ground truth.

Formats (all little-endian, rows are vectors):

========================  ==========================================================  ===========
extension                 layout                                                      dtype
========================  ==========================================================  ===========
``.npy``                  numpy array of shape (n, d)                                 any
``.fvecs``                texmex: per row ``int32 d`` then ``d`` float32               float32
``.bvecs``                texmex: per row ``int32 d`` then ``d`` uint8                 uint8
``.ivecs``                texmex: per row ``int32 d`` then ``d`` int32                 int32
``.fbin``                 big-ann: ``uint32 n, uint32 d`` header, then n*d float32     float32
``.u8bin`` / ``.i8bin``   big-ann header, then uint8 / int8                            uint8/int8
``.ibin``                 big-ann header, then int32                                   int32
``.hdf5`` / ``.h5``       ann-benchmarks: ``train``, ``test``, ``neighbors``,          as stored
                          ``distances`` datasets, attribute ``distance``
========================  ==========================================================  ===========

Every reader memory-maps when the format allows it (``.npy``, the texmex and big-ann formats, and
contiguous uncompressed HDF5 datasets), so a 10M x 96 base never has to fit in RAM. Memory-mapped texmex
arrays are strided views (they skip the per-row dimension word); callers convert chunks with
``np.ascontiguousarray(x[i0:i1], dtype=np.float32)``. The native dtype is always preserved.

Ground truth follows ann-benchmarks: ``neighbors`` (nq, k) int32 ids sorted by increasing distance and
``distances`` (nq, k) float32, the Euclidean distance (not squared) for ``"l2"`` and ``1 - cos`` for
``"angular"``. Names follow faiss ``contrib``: ``xt`` (train), ``xb`` (database), ``xq`` (queries),
``gt`` (ground-truth ids), ``D, I`` (distances, ids).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Dataset",
    "read_vectors",
    "write_vectors",
    "vector_file_shape",
    "read_ann_hdf5",
    "write_ann_hdf5",
    "load_dataset",
    "read_bigann_groundtruth",
    "compute_ground_truth",
    "groundtruth_distances",
    "normalize_metric",
]

# extension -> (dtype, family). "vecs" = texmex, "bin" = big-ann.
_FORMATS = {
    ".fvecs": (np.dtype("<f4"), "vecs"),
    ".bvecs": (np.dtype("u1"), "vecs"),
    ".ivecs": (np.dtype("<i4"), "vecs"),
    ".fbin": (np.dtype("<f4"), "bin"),
    ".u8bin": (np.dtype("u1"), "bin"),
    ".i8bin": (np.dtype("i1"), "bin"),
    ".ibin": (np.dtype("<i4"), "bin"),
}
_HDF5_EXTENSIONS = (".hdf5", ".h5")
SUPPORTED_EXTENSIONS = (".npy",) + tuple(_FORMATS) + _HDF5_EXTENSIONS
ANN_DATASETS = ("train", "test", "neighbors", "distances")

# ann-benchmarks distance name <-> ours
_METRIC_ALIASES = {
    "l2": "l2",
    "euclidean": "l2",
    "angular": "angular",
    "cosine": "angular",
}
_ANN_DISTANCE_NAME = {"l2": "euclidean", "angular": "angular"}

# When checking every per-row dimension word of a *vecs file would read more than this many bytes,
# check an evenly spaced sample of rows instead (the check touches every page of the file).
_VECS_FULL_CHECK_BYTES = 1 << 30
_VECS_SAMPLE_ROWS = 10_000


def normalize_metric(metric: str) -> str:
    """Map a metric name ("l2", "euclidean", "angular", "cosine") to ours: "l2" or "angular"."""
    key = str(metric).lower()
    if key not in _METRIC_ALIASES:
        raise ValueError(
            f"unknown metric {metric!r}: expected one of {sorted(_METRIC_ALIASES)} "
            "(inner-product data sets are not supported)"
        )
    return _METRIC_ALIASES[key]


def _ext(path: Path) -> str:
    return path.suffix.lower()


def _check_extension(path: Path) -> str:
    ext = _ext(path)
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file extension {ext or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return ext


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a vector file")
    return path


def _row_range(n: int, start: int, count: int | None, path: Path) -> tuple[int, int]:
    if start < 0 or start > n:
        raise ValueError(f"{path}: start={start} is outside the file's {n} rows")
    stop = n if count is None else start + count
    if count is not None and (count < 0 or stop > n):
        raise ValueError(f"{path}: rows [{start}, {stop}) requested but the file has {n} rows")
    return start, stop


# ----------------------------------------------------------------------------------------------
# texmex *vecs
# ----------------------------------------------------------------------------------------------


def _vecs_geometry(path: Path, dtype: np.dtype) -> tuple[int, int]:
    """(n, d) of a texmex file, after checking its size against the first dimension word."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    if size < 4:
        raise ValueError(f"{path}: truncated texmex file ({size} bytes, shorter than one header)")
    d = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if d <= 0 or d > 1 << 24:
        raise ValueError(f"{path}: invalid dimension {d} in the first row header (corrupt or not a *vecs file)")
    row_bytes = 4 + d * dtype.itemsize
    if size % row_bytes:
        raise ValueError(
            f"{path}: file size {size} is not a multiple of the row size {row_bytes} "
            f"(d={d}, {dtype} components): truncated file or wrong extension"
        )
    return size // row_bytes, d


def _check_vecs_dims(path: Path, raw: np.ndarray, d: int, start: int, stop: int) -> None:
    """Check the dimension word of the rows [start, stop) of a (n, row_bytes) uint8 view."""
    nrows = stop - start
    if nrows == 0:
        return
    if nrows * raw.shape[1] <= _VECS_FULL_CHECK_BYTES:
        rows = np.arange(start, stop)
    else:  # a full check would stream the whole file: sample rows (first and last included)
        rows = np.unique(np.linspace(start, stop - 1, _VECS_SAMPLE_ROWS).astype(np.int64))
    dims = np.ascontiguousarray(raw[rows, :4]).view("<i4").ravel()
    bad = np.flatnonzero(dims != d)
    if bad.size:
        r = int(rows[bad[0]])
        raise ValueError(
            f"{path}: row {r} has dimension header {int(dims[bad[0]])}, expected {d} like row 0 "
            "(inconsistent dimensions: corrupt file or wrong extension)"
        )


def _read_vecs(path: Path, dtype: np.dtype, start: int, count: int | None, mmap: bool) -> np.ndarray:
    n, d = _vecs_geometry(path, dtype)
    start, stop = _row_range(n, start, count, path)
    if n == 0:
        return np.empty((0, 0), dtype=dtype)
    row_bytes = 4 + d * dtype.itemsize
    raw = np.memmap(path, dtype="u1", mode="r", shape=(n, row_bytes))
    _check_vecs_dims(path, raw, d, start, stop)
    if dtype.itemsize == 1:
        x = raw[start:stop, 4:]
    else:
        words = np.memmap(path, dtype=dtype, mode="r", shape=(n, d + 1))
        x = words[start:stop, 1:]
    if not mmap:
        x = np.array(x, dtype=dtype, order="C")
    return x


def _write_vecs(path: Path, x, dtype: np.dtype, chunk_rows: int) -> None:
    n, d = x.shape
    with open(path, "wb") as f:
        for i0 in range(0, n, chunk_rows):
            block = np.ascontiguousarray(x[i0:i0 + chunk_rows], dtype=dtype)
            out = np.empty((block.shape[0], 4 + d * dtype.itemsize), dtype="u1")
            out[:, :4] = np.array([d], dtype="<i4").view("u1")
            out[:, 4:] = block.view("u1").reshape(block.shape[0], -1)
            out.tofile(f)


# ----------------------------------------------------------------------------------------------
# big-ann *bin
# ----------------------------------------------------------------------------------------------


def _bin_geometry(path: Path, dtype: np.dtype) -> tuple[int, int]:
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: truncated big-ann file ({size} bytes, the header alone is 8)")
    n, d = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
    expected = 8 + n * d * dtype.itemsize
    if size != expected:
        what = "truncated file" if size < expected else "trailing bytes after the data"
        raise ValueError(
            f"{path}: header says n={n}, d={d} ({dtype}) so the file should be {expected} bytes, "
            f"but it is {size} bytes ({what}; or the extension does not match the dtype)"
        )
    return n, d


def _read_bin(path: Path, dtype: np.dtype, start: int, count: int | None, mmap: bool) -> np.ndarray:
    n, d = _bin_geometry(path, dtype)
    start, stop = _row_range(n, start, count, path)
    if stop == start or d == 0:
        return np.empty((stop - start, d), dtype=dtype)
    offset = 8 + start * d * dtype.itemsize
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(stop - start, d))
    with open(path, "rb") as f:
        f.seek(offset)
        x = np.fromfile(f, dtype=dtype, count=(stop - start) * d)
    return x.reshape(stop - start, d)


def _write_bin(path: Path, x, dtype: np.dtype, chunk_rows: int) -> None:
    n, d = x.shape
    if n >= 2**32 or d >= 2**32:
        raise ValueError(f"{path}: shape {x.shape} does not fit the uint32 big-ann header")
    with open(path, "wb") as f:
        np.array([n, d], dtype="<u4").tofile(f)
        for i0 in range(0, n, chunk_rows):
            np.ascontiguousarray(x[i0:i0 + chunk_rows], dtype=dtype).tofile(f)


def read_bigann_groundtruth(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a big-ann-benchmarks k-NN result file (e.g. the ``GT_10M/deep-10M`` ground truth).

    Layout: ``uint32 nq, uint32 k``, then ``nq*k`` int32 ids, then ``nq*k`` float32 distances.

    Returns
    -------
    I : ndarray of shape (nq, k), int32
    D : ndarray of shape (nq, k), float32, as stored (big-ann stores squared L2 for euclidean sets)
    """
    path = _existing(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: truncated big-ann ground-truth file ({size} bytes)")
    nq, k = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
    expected = 8 + nq * k * 8
    if size != expected:
        raise ValueError(
            f"{path}: header says nq={nq}, k={k} so the ground-truth file should be {expected} bytes "
            f"(ids then distances), but it is {size} bytes"
        )
    with open(path, "rb") as f:
        f.seek(8)
        I = np.fromfile(f, dtype="<i4", count=nq * k).reshape(nq, k)
        D = np.fromfile(f, dtype="<f4", count=nq * k).reshape(nq, k)
    return I, D


# ----------------------------------------------------------------------------------------------
# HDF5
# ----------------------------------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a declared dependency
        raise ImportError("reading .hdf5 files needs h5py: pip install h5py") from e
    return h5py


def _hdf5_memmap(path: Path, ds):
    """np.memmap over a contiguous, uncompressed HDF5 dataset; None when the layout does not allow it."""
    if ds.chunks is not None or ds.compression is not None or ds.dtype.kind not in "iuf":
        return None
    offset = ds.id.get_offset()
    if offset is None or ds.size == 0:
        return None
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


def _read_hdf5(path: Path, dataset: str | None, start: int, count: int | None, mmap: bool):
    h5py = _h5py()
    if dataset is None:
        raise ValueError(
            f"{path}: reading an HDF5 file needs dataset= one of {ANN_DATASETS} "
            "(or use read_ann_hdf5 / load_dataset for the whole data set)"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    if dataset not in f:
        names = sorted(f.keys())
        f.close()
        raise ValueError(f"{path}: no dataset {dataset!r} in the file (it has {names})")
    ds = f[dataset]
    if ds.ndim != 2:
        shape = ds.shape
        f.close()
        raise ValueError(f"{path}: dataset {dataset!r} has shape {shape}, expected 2-D (n, d)")
    start, stop = _row_range(ds.shape[0], start, count, path)
    if mmap:
        mm = _hdf5_memmap(path, ds)
        if mm is not None:
            f.close()
            return mm[start:stop]
        if start == 0 and stop == ds.shape[0]:
            return ds  # chunked/compressed: the h5py dataset itself is the lazy view (keeps the file open)
    x = ds[start:stop]
    f.close()
    return x


# ----------------------------------------------------------------------------------------------
# Public readers / writers
# ----------------------------------------------------------------------------------------------


def vector_file_shape(path, dataset: str | None = None) -> tuple[int, int]:
    """(n, d) of a vector file, from its header only (the file is validated like ``read_vectors``)."""
    path = _existing(path)
    ext = _check_extension(path)
    if ext in _FORMATS:
        dtype, family = _FORMATS[ext]
        return _vecs_geometry(path, dtype) if family == "vecs" else _bin_geometry(path, dtype)
    return tuple(read_vectors(path, mmap=True, dataset=dataset).shape)


def read_vectors(path, start: int = 0, count: int | None = None, mmap: bool = True,
                 *, dataset: str | None = None) -> np.ndarray:
    """Read rows ``[start, start + count)`` of a vector file, dispatching on the extension.

    Parameters
    ----------
    path : str or Path
        A ``.npy``, ``.fvecs``, ``.bvecs``, ``.ivecs``, ``.fbin``, ``.u8bin``, ``.i8bin``, ``.ibin``,
        ``.hdf5`` or ``.h5`` file.
    start, count : int
        Row range; ``count=None`` reads to the end.
    mmap : bool
        Return a memory-mapped view where the format allows it (no data is read until used);
        ``False`` returns an in-memory C-contiguous array.
    dataset : {"train", "test", "neighbors", "distances"}, HDF5 only
        Which dataset of an ann-benchmarks file to read. With ``mmap=True`` a contiguous dataset is
        memory-mapped; a chunked/compressed one is returned as the lazy ``h5py.Dataset`` when the whole
        range is asked for.

    Returns
    -------
    x : ndarray of shape (n, d), in the file's native dtype.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unknown extension, truncated file, inconsistent headers, bad row range.
    """
    path = _existing(path)
    ext = _check_extension(path)
    if ext in _HDF5_EXTENSIONS:
        return _read_hdf5(path, dataset, start, count, mmap)
    if dataset is not None:
        raise ValueError(f"{path}: dataset={dataset!r} only applies to HDF5 files")
    if ext == ".npy":
        try:  # always map first, so that mmap=False with a row range reads only those rows
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a valid .npy file, or truncated ({e})") from e
        if a.ndim != 2:
            raise ValueError(f"{path}: .npy array has shape {a.shape}, expected 2-D (n, d)")
        start, stop = _row_range(a.shape[0], start, count, path)
        return a[start:stop] if mmap else np.array(a[start:stop], order="C")
    dtype, family = _FORMATS[ext]
    reader = _read_vecs if family == "vecs" else _read_bin
    return reader(path, dtype, start, count, mmap)


def write_vectors(path, x, *, dataset: str | None = None, chunk_rows: int = 1 << 16) -> Path:
    """Write a 2-D array ``x`` of shape (n, d) in the format given by the extension of ``path``.

    The dtype must match the format (float32 for .fvecs/.fbin, uint8 for .bvecs/.u8bin, int8 for .i8bin,
    int32 for .ivecs/.ibin); ``.npy`` and HDF5 keep any numeric dtype. ``x`` may be a memmap or h5py
    dataset: it is written in chunks of ``chunk_rows`` rows. For HDF5, ``dataset=`` names the dataset,
    which is added to (or replaced in) the file.
    """
    path = Path(path)
    ext = _check_extension(path)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if len(x.shape) != 2:
        raise ValueError(f"{path}: expected a 2-D array of shape (n, d), got shape {tuple(x.shape)}")
    xdtype = np.dtype(x.dtype)
    if ext in _FORMATS:
        dtype, family = _FORMATS[ext]
        if xdtype.kind != dtype.kind or xdtype.itemsize != dtype.itemsize:
            raise ValueError(
                f"{path}: {ext} stores {dtype.name} but the array is {xdtype.name}; "
                f"convert first, e.g. x.astype(np.{dtype.name}), or pick the matching extension"
            )
        if family == "vecs":
            _write_vecs(path, x, dtype, chunk_rows)
        else:
            _write_bin(path, x, dtype, chunk_rows)
    elif ext == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=xdtype, shape=tuple(x.shape))
        for i0 in range(0, x.shape[0], chunk_rows):
            out[i0:i0 + chunk_rows] = x[i0:i0 + chunk_rows]
        out.flush()
        del out
    else:
        if dataset is None:
            raise ValueError(f"{path}: writing HDF5 needs dataset= (e.g. 'train')")
        h5py = _h5py()
        with h5py.File(path, "a") as f:
            if dataset in f:
                del f[dataset]
            _h5_write_dataset(f, dataset, x, xdtype, chunk_rows)
    return path


def _h5_write_dataset(f, name: str, x, dtype, chunk_rows: int) -> None:
    # Contiguous (no chunking, no compression) so that readers can memory-map it.
    ds = f.create_dataset(name, shape=tuple(x.shape), dtype=dtype)
    for i0 in range(0, x.shape[0], chunk_rows):
        ds[i0:i0 + chunk_rows] = np.asarray(x[i0:i0 + chunk_rows], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class Dataset:
    """A k-NN benchmark data set, in the spirit of ``faiss.contrib.datasets.Dataset``.

    Attributes
    ----------
    name : str
    xb : array-like of shape (nb, d)            database vectors (may be a memmap)
    xq : array-like of shape (nq, d)            query vectors
    gt : ndarray of shape (nq, k) or None       ground-truth neighbour ids, nearest first
    gt_distances : ndarray of shape (nq, k) or None   ann-benchmarks distances of ``gt``
    metric : {"l2", "angular"}
    xt : array-like of shape (nt, d) or None    dedicated training set (e.g. texmex ``sift_learn``)
    d, nb, nq, nt : int
    """

    def __init__(self, name, xb, xq, gt=None, metric="l2", xt=None, gt_distances=None, path=None):
        self.name = name
        self.xb, self.xq, self.gt, self.xt = xb, xq, gt, xt
        self.gt_distances = gt_distances
        self.metric = normalize_metric(metric)
        self.path = path
        self.nb, self.d = (int(v) for v in xb.shape)
        self.nq = int(xq.shape[0])
        if xq.shape[1] != self.d:
            raise ValueError(f"{name}: queries have dimension {xq.shape[1]} but the database has {self.d}")
        if gt is not None and gt.shape[0] != self.nq:
            raise ValueError(f"{name}: ground truth has {gt.shape[0]} rows for {self.nq} queries")
        self.nt = int(xt.shape[0]) if xt is not None else self.nb

    def get_database(self):
        """The database vectors xb, shape (nb, d), native dtype (memory-mapped when read from disk)."""
        return self.xb

    def get_queries(self) -> np.ndarray:
        """The query vectors xq as a float32 C-contiguous array of shape (nq, d)."""
        return np.ascontiguousarray(self.xq, dtype=np.float32)

    def get_train(self, maxtrain: int | None = None):
        """Training vectors: ``xt`` when the data set has one, else the database (ann-benchmarks
        convention: ``train`` is the base). ``maxtrain`` keeps the first rows only."""
        xt = self.xt if self.xt is not None else self.xb
        return xt if maxtrain is None else xt[:maxtrain]

    def get_groundtruth(self, k: int | None = None) -> np.ndarray:
        """Ground-truth ids of shape (nq, k), int64, nearest first."""
        if self.gt is None:
            raise ValueError(f"{self.name}: no ground truth; compute it with compute_ground_truth(xb, xq)")
        gt = np.asarray(self.gt)
        if k is not None:
            if k > gt.shape[1]:
                raise ValueError(f"{self.name}: asked for k={k} but the ground truth has {gt.shape[1]} neighbours")
            gt = gt[:, :k]
        return gt.astype(np.int64)

    def database_iterator(self, bs: int = 1 << 16, split: tuple[int, int] = (1, 0)) -> Iterator[np.ndarray]:
        """Yield float32 blocks of at most ``bs`` database rows; ``split=(n, p)`` yields shard p of n."""
        nsplit, rank = split
        i0, i1 = self.nb * rank // nsplit, self.nb * (rank + 1) // nsplit
        for j0 in range(i0, i1, bs):
            yield np.ascontiguousarray(self.xb[j0:min(j0 + bs, i1)], dtype=np.float32)

    def __repr__(self) -> str:
        k = None if self.gt is None else self.gt.shape[1]
        return (f"Dataset({self.name!r}, metric={self.metric!r}, d={self.d}, nb={self.nb}, nq={self.nq}, "
                f"nt={self.nt}, gt_k={k})")


def read_ann_hdf5(path, mmap: bool = True, name: str | None = None) -> Dataset:
    """Open an ann-benchmarks HDF5 file as a :class:`Dataset`.

    The file must hold ``train`` (nb, d), ``test`` (nq, d) and the attribute ``distance``
    ("euclidean" or "angular"); ``neighbors``/``distances`` (nq, k) are optional; an optional
    ``learn`` dataset becomes ``xt``. With ``mmap=True`` the big arrays are memory-mapped.
    """
    path = _existing(path)
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        missing = [k for k in ("train", "test") if k not in f]
        if missing:
            raise ValueError(f"{path}: not an ann-benchmarks file, missing datasets {missing} (has {sorted(f.keys())})")
        if "distance" not in f.attrs:
            raise ValueError(f"{path}: missing the 'distance' attribute ('euclidean' or 'angular')")
        distance = f.attrs["distance"]
        distance = distance.decode() if isinstance(distance, bytes) else str(distance)
        has = set(f.keys())
    metric = normalize_metric(distance)
    xb = read_vectors(path, mmap=mmap, dataset="train")
    xq = np.asarray(read_vectors(path, mmap=False, dataset="test"))
    gt = np.asarray(read_vectors(path, mmap=False, dataset="neighbors")) if "neighbors" in has else None
    gtd = np.asarray(read_vectors(path, mmap=False, dataset="distances")) if "distances" in has else None
    xt = read_vectors(path, mmap=mmap, dataset="learn") if "learn" in has else None
    return Dataset(name or path.stem, xb, xq, gt=gt, metric=metric, xt=xt, gt_distances=gtd, path=path)


def write_ann_hdf5(path, xb, xq, gt, gt_distances=None, metric="l2", *, xt=None, dtype=np.float32,
                   attrs: dict | None = None, chunk_rows: int = 1 << 16) -> Path:
    """Write a data set in the ann-benchmarks HDF5 layout.

    Datasets: ``train`` (= xb, ``dtype``), ``test`` (= xq, ``dtype``), ``neighbors`` (int32),
    ``distances`` (float32) and, when given, ``learn`` (= xt). Attributes: ``distance``
    ("euclidean"/"angular"), ``point_type`` "float", ``type`` "dense", ``dimension`` and any extra
    ``attrs``. ``gt_distances=None`` computes them exactly from the vectors. Big inputs (memmaps) are
    streamed in chunks; the file is written to ``path + ".tmp"`` and renamed when complete.
    """
    path = Path(path)
    metric = normalize_metric(metric)
    nb, d = (int(v) for v in xb.shape)
    if len(xq.shape) != 2 or xq.shape[1] != d:
        raise ValueError(f"queries have shape {tuple(xq.shape)}, expected (nq, {d})")
    gt = np.asarray(gt)
    if gt.ndim != 2 or gt.shape[0] != xq.shape[0]:
        raise ValueError(f"ground truth has shape {gt.shape}, expected ({xq.shape[0]}, k)")
    if gt.size and (gt.min() < 0 or gt.max() >= nb):
        raise ValueError(f"ground-truth ids must be in [0, {nb}), got range [{gt.min()}, {gt.max()}]")
    if gt_distances is None:
        gt_distances = groundtruth_distances(xb, xq, gt, metric)
    gt_distances = np.asarray(gt_distances)
    if gt_distances.shape != gt.shape:
        raise ValueError(f"distances have shape {gt_distances.shape} but neighbors have {gt.shape}")
    if xt is not None and (len(xt.shape) != 2 or xt.shape[1] != d):
        raise ValueError(f"training vectors have shape {tuple(xt.shape)}, expected (nt, {d})")
    h5py = _h5py()
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["distance"] = _ANN_DISTANCE_NAME[metric]
            f.attrs["point_type"] = "float"
            f.attrs["type"] = "dense"
            f.attrs["dimension"] = d
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            _h5_write_dataset(f, "train", xb, np.dtype(dtype), chunk_rows)
            _h5_write_dataset(f, "test", xq, np.dtype(dtype), chunk_rows)
            _h5_write_dataset(f, "neighbors", gt, np.dtype("int32"), chunk_rows)
            _h5_write_dataset(f, "distances", gt_distances, np.dtype("float32"), chunk_rows)
            if xt is not None:
                _h5_write_dataset(f, "learn", xt, np.dtype(dtype), chunk_rows)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_dataset(path_or_name, data_dir=None, mmap: bool = True) -> Dataset:
    """Load a data set from an ann-benchmarks ``.hdf5`` file, or by name.

    A name (e.g. ``"glove-6b-50d"``) is looked up as ``NAME.hdf5`` in ``data_dir``, then in
    ``$FLASHGMM_DATA``, then in ``./data``; ``python -m data_scripts.prepare --dataset NAME --out DIR``
    creates these files.
    """
    p = Path(path_or_name)
    if p.suffix.lower() in _HDF5_EXTENSIONS or p.is_file():
        if p.is_file() and _ext(p) not in _HDF5_EXTENSIONS:
            raise ValueError(f"{p}: load_dataset expects an ann-benchmarks .hdf5 file; "
                             f"use read_vectors for single {_ext(p) or 'extension-less'} files")
        return read_ann_hdf5(p, mmap=mmap)
    dirs = [Path(d) for d in (data_dir, os.environ.get("FLASHGMM_DATA"), "data") if d]
    for d in dirs:
        cand = d / f"{path_or_name}.hdf5"
        if cand.exists():
            return read_ann_hdf5(cand, mmap=mmap, name=str(path_or_name))
    raise FileNotFoundError(
        f"data set {path_or_name!r} not found: no such file, and no {path_or_name}.hdf5 in "
        f"{[str(d) for d in dirs]}. Create it with: python -m data_scripts.prepare --dataset "
        f"{path_or_name} --out DIR"
    )


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def groundtruth_distances(xb, xq, I, metric="l2") -> np.ndarray:
    """Exact ann-benchmarks distances between each query and the given neighbours, float64 math.

    Returns float32 (nq, k): Euclidean distance (not squared) for "l2", ``1 - cos`` for "angular".
    Ids < 0 (missing results) get +inf. ``xb`` may be a memmap or h5py dataset: only the rows named
    in ``I`` are read, in increasing order.
    """
    metric = normalize_metric(metric)
    I = np.asarray(I)
    nq, k = I.shape
    d = int(xb.shape[1])
    out = np.empty((nq, k), dtype=np.float32)
    chunk_queries = max(1, (8 << 20) // max(1, k * d))  # ~64 MiB of float64 gathered rows
    for q0 in range(0, nq, chunk_queries):
        Ic = I[q0:q0 + chunk_queries]
        valid = Ic >= 0
        ids, inverse = np.unique(np.where(valid, Ic, 0), return_inverse=True)
        rows = np.asarray(xb[ids], dtype=np.float64)[inverse.reshape(Ic.shape)]  # (nqc, k, d)
        q = np.asarray(xq[q0:q0 + chunk_queries], dtype=np.float64)
        if metric == "l2":
            dist = np.sqrt(((rows - q[:, None, :]) ** 2).sum(-1))
        else:
            rn = np.linalg.norm(rows, axis=-1)
            qn = np.linalg.norm(q, axis=-1)[:, None]
            cos = (rows * q[:, None, :]).sum(-1) / np.maximum(rn * qn, np.finfo(np.float64).tiny)
            dist = 1.0 - cos
        out[q0:q0 + chunk_queries] = np.where(valid, dist, np.inf)
    return out


def compute_ground_truth(xb, xq, k: int = 100, metric="l2", chunk_size: int | None = None,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query, with FAISS brute force over chunks of the base.

    The base is streamed ``chunk_size`` rows at a time (default: about 256 MiB of float32), each chunk
    searched with ``faiss.knn`` (L2, or inner product on normalised vectors for "angular"), and the
    partial top-k lists merged with ``faiss.ResultHeap``, so a 10M base never becomes one index. The
    distances of the final top-k are then recomputed in float64 and each row re-sorted by them, so the
    returned distances are exact; the selection itself is float32 (as in every FAISS brute force), so
    neighbours whose distances differ by less than float32 rounding may be swapped at the k-th place.

    Parameters
    ----------
    xb : array-like of shape (nb, d)     any numeric dtype, memmap or h5py dataset
    xq : array-like of shape (nq, d)
    k : int                              neighbours per query, k <= nb
    metric : {"l2", "angular"}           ("euclidean"/"cosine" are accepted aliases)

    Returns
    -------
    D : ndarray of shape (nq, k), float32   Euclidean distance (not squared) or ``1 - cos``
    I : ndarray of shape (nq, k), int64     base row ids, nearest first
    """
    import faiss

    metric = normalize_metric(metric)
    if len(xb.shape) != 2 or len(xq.shape) != 2:
        raise ValueError(f"expected 2-D xb and xq, got shapes {tuple(xb.shape)} and {tuple(xq.shape)}")
    nb, d = (int(v) for v in xb.shape)
    nq = int(xq.shape[0])
    if xq.shape[1] != d:
        raise ValueError(f"dimension mismatch: xb has d={d}, xq has d={xq.shape[1]}")
    if not 1 <= k <= nb:
        raise ValueError(f"k={k} must be between 1 and the number of base vectors nb={nb}")
    if chunk_size is None:
        chunk_size = max(k, (256 << 20) // (4 * d))
    chunk_size = max(int(chunk_size), 1)

    xq32 = np.ascontiguousarray(xq, dtype=np.float32)
    if not np.isfinite(xq32).all():
        raise ValueError("queries contain NaN or Inf")
    angular = metric == "angular"
    if angular:
        xq32 = _normalize_rows(xq32)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if angular else faiss.METRIC_L2
    heap = faiss.ResultHeap(nq, k, keep_max=angular)
    for i0 in range(0, nb, chunk_size):
        i1 = min(i0 + chunk_size, nb)
        xbc = np.ascontiguousarray(xb[i0:i1], dtype=np.float32)
        if angular:
            xbc = _normalize_rows(xbc)
        D, I = faiss.knn(xq32, xbc, min(k, i1 - i0), metric=faiss_metric)
        heap.add_result(D, I + i0)
        if progress:
            print(f"\r  ground truth: {i1:,}/{nb:,} base rows", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    heap.finalize()
    I = heap.I
    if (I < 0).any():
        raise ValueError("brute force returned fewer than k results: does the base contain NaN or Inf?")
    D = groundtruth_distances(xb, xq, I, metric)
    order = np.argsort(D, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
