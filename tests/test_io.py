"""Tests for flashgmm_faiss.io: every file format against bytes built independently with struct/numpy,
header and size errors, the ann-benchmarks HDF5 layout, and exact ground truth against float64 numpy."""

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from flashgmm_faiss import io

REPO = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = [REPO.parent / "shared" / "data", Path("/work/shared/data")]
SHARED = next((p for p in SHARED_CANDIDATES if (p / "siftsmall").is_dir()), None)
needs_siftsmall = pytest.mark.skipif(SHARED is None, reason="../shared/data/siftsmall not present")

# extension -> (dtype, struct code) for formats with a fixed dtype
FORMATS = {
    ".fvecs": (np.float32, "f"),
    ".bvecs": (np.uint8, "B"),
    ".ivecs": (np.int32, "i"),
    ".fbin": (np.float32, "f"),
    ".u8bin": (np.uint8, "B"),
    ".i8bin": (np.int8, "b"),
    ".ibin": (np.int32, "i"),
}


def _random(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)


def _reference_bytes(ext, x):
    """The file bytes written by hand with struct: the independent reference for both directions."""
    code = FORMATS[ext][1]
    n, d = x.shape
    if ext.endswith("vecs"):
        return b"".join(struct.pack(f"<i{d}{code}", d, *row.tolist()) for row in x)
    return struct.pack("<II", n, d) + struct.pack(f"<{n * d}{code}", *x.ravel().tolist())


def assert_array_equal_dtype(actual, expected):
    assert np.dtype(actual.dtype) == np.dtype(expected.dtype), (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bad = np.argwhere(np.asarray(actual) != expected)
    assert bad.size == 0, f"{len(bad)} elements differ, first at {tuple(bad[0])}"


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", list(FORMATS))
@pytest.mark.parametrize("mmap", [True, False])
def test_read_matches_handwritten_bytes(tmp_path, ext, mmap):
    rng = np.random.default_rng(1)
    x = _random(rng, (13, 7), FORMATS[ext][0])
    p = tmp_path / f"x{ext}"
    p.write_bytes(_reference_bytes(ext, x))
    y = io.read_vectors(p, mmap=mmap)
    assert_array_equal_dtype(y, x)
    assert isinstance(y, np.memmap) == mmap
    assert_array_equal_dtype(io.read_vectors(p, start=4, count=6, mmap=mmap), x[4:10])
    assert_array_equal_dtype(io.read_vectors(p, start=11, mmap=mmap), x[11:])
    assert io.vector_file_shape(p) == (13, 7)


@pytest.mark.parametrize("ext", list(FORMATS))
def test_write_produces_reference_bytes(tmp_path, ext):
    rng = np.random.default_rng(2)
    x = _random(rng, (301, 5), FORMATS[ext][0])
    p = tmp_path / f"x{ext}"
    io.write_vectors(p, x, chunk_rows=64)  # several chunks, last one partial
    assert p.read_bytes() == _reference_bytes(ext, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int64])
def test_npy_round_trip_keeps_dtype(tmp_path, dtype):
    x = _random(np.random.default_rng(3), (17, 3), dtype)
    p = tmp_path / "x.npy"
    io.write_vectors(p, x, chunk_rows=5)
    assert_array_equal_dtype(np.load(p), x)
    assert_array_equal_dtype(io.read_vectors(p, start=2, count=4), x[2:6])


def test_write_accepts_strided_memmap_input(tmp_path):
    """A memory-mapped fvecs view (strided) converts straight to another format."""
    x = _random(np.random.default_rng(4), (50, 8), np.float32)
    io.write_vectors(tmp_path / "a.fvecs", x)
    view = io.read_vectors(tmp_path / "a.fvecs")
    assert not view.flags["C_CONTIGUOUS"]
    io.write_vectors(tmp_path / "a.fbin", view, chunk_rows=7)
    assert_array_equal_dtype(np.fromfile(tmp_path / "a.fbin", dtype="<f4", offset=8).reshape(50, 8), x)


@pytest.mark.parametrize("ext,bad_dtype", [(".fvecs", np.float64), (".bvecs", np.int8), (".ivecs", np.int64),
                                           (".fbin", np.int32), (".u8bin", np.int8), (".i8bin", np.uint8),
                                           (".ibin", np.float32)])
def test_write_rejects_wrong_dtype(tmp_path, ext, bad_dtype):
    p = tmp_path / f"x{ext}"
    with pytest.raises(ValueError, match=rf"{ext} stores .* but the array is {np.dtype(bad_dtype).name}"):
        io.write_vectors(p, np.zeros((2, 3), dtype=bad_dtype))


def test_write_rejects_1d(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        io.write_vectors(tmp_path / "x.fbin", np.zeros(4, dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.fvecs"
    with pytest.raises(FileNotFoundError, match="nope.fvecs"):
        io.read_vectors(p)


def test_unknown_extension_lists_supported(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("1 2 3")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.txt'.*\.fvecs.*\.u8bin.*\.hdf5"):
        io.read_vectors(p)
    with pytest.raises(ValueError, match="unsupported"):
        io.write_vectors(tmp_path / "y.csv", np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("ext", [".fbin", ".u8bin", ".i8bin", ".ibin"])
def test_bin_truncated_and_trailing(tmp_path, ext):
    x = _random(np.random.default_rng(5), (10, 4), FORMATS[ext][0])
    data = _reference_bytes(ext, x)
    p = tmp_path / f"x{ext}"
    p.write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"x\.\w+bin: header says n=10, d=4 .*truncated"):
        io.read_vectors(p)
    p.write_bytes(data + b"\0" * 4)
    with pytest.raises(ValueError, match="trailing bytes"):
        io.read_vectors(p)
    p.write_bytes(data[:5])
    with pytest.raises(ValueError, match="header alone is 8"):
        io.read_vectors(p)


def test_bin_wrong_extension_is_caught_by_size(tmp_path):
    """A float32 .fbin renamed to .u8bin fails the size check instead of returning garbage."""
    p = tmp_path / "x.u8bin"
    p.write_bytes(_reference_bytes(".fbin", np.ones((3, 4), np.float32)))
    with pytest.raises(ValueError, match="should be 20 bytes, but it is 56"):
        io.read_vectors(p)


@pytest.mark.parametrize("ext", [".fvecs", ".bvecs", ".ivecs"])
def test_vecs_truncated(tmp_path, ext):
    x = _random(np.random.default_rng(6), (5, 8), FORMATS[ext][0])
    p = tmp_path / f"x{ext}"
    p.write_bytes(_reference_bytes(ext, x)[:-3])
    with pytest.raises(ValueError, match="not a multiple of the row size"):
        io.read_vectors(p)


def test_vecs_inconsistent_dimension(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    raw = bytearray(_reference_bytes(".fvecs", x))
    row_bytes = 4 + 6 * 4
    raw[2 * row_bytes:2 * row_bytes + 4] = struct.pack("<i", 7)  # row 2 claims d=7
    p = tmp_path / "x.fvecs"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="row 2 has dimension header 7, expected 6"):
        io.read_vectors(p)


def test_vecs_bad_first_header(tmp_path):
    p = tmp_path / "x.ivecs"
    p.write_bytes(struct.pack("<ii", -3, 0))
    with pytest.raises(ValueError, match="invalid dimension -3"):
        io.read_vectors(p)


def test_row_range_errors(tmp_path):
    p = tmp_path / "x.fbin"
    io.write_vectors(p, np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match=r"rows \[3, 8\) requested but the file has 5 rows"):
        io.read_vectors(p, start=3, count=5)
    with pytest.raises(ValueError, match="outside"):
        io.read_vectors(p, start=6)


def test_npy_truncated(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.ones((100, 4), np.float32))
    p.write_bytes(p.read_bytes()[:-16])
    with pytest.raises(ValueError, match="x.npy: not a valid .npy file, or truncated"):
        io.read_vectors(p)


def test_npy_not_2d(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(3,\), expected 2-D"):
        io.read_vectors(p)


def test_bigann_groundtruth_reader(tmp_path):
    rng = np.random.default_rng(7)
    I = rng.integers(0, 1000, size=(4, 3)).astype(np.int32)
    D = rng.random((4, 3)).astype(np.float32)
    p = tmp_path / "gt"
    p.write_bytes(struct.pack("<II", 4, 3) + I.tobytes() + D.tobytes())
    I2, D2 = io.read_bigann_groundtruth(p)
    assert_array_equal_dtype(I2, I)
    assert_array_equal_dtype(D2, D)
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(ValueError, match="should be 104 bytes"):
        io.read_bigann_groundtruth(p)


# ------------------------------------------------------------------------------------------------
# HDF5
# ------------------------------------------------------------------------------------------------


def _ann_file(path, xb, xq, gt, dist, distance, **create_kw):
    """An ann-benchmarks file written directly with h5py, as ann-benchmarks does."""
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.attrs["point_type"] = "float"
        f.create_dataset("train", data=xb, **create_kw)
        f.create_dataset("test", data=xq, **create_kw)
        f.create_dataset("neighbors", data=gt)
        f.create_dataset("distances", data=dist)


@pytest.mark.parametrize("create_kw", [{}, {"compression": "gzip", "chunks": (8, 4)}],
                         ids=["contiguous", "chunked-gzip"])
def test_read_ann_hdf5(tmp_path, create_kw):
    rng = np.random.default_rng(8)
    xb, xq = _random(rng, (101, 4), np.float32), _random(rng, (9, 4), np.float32)
    gt = rng.integers(0, 101, size=(9, 5)).astype(np.int32)
    dist = rng.random((9, 5)).astype(np.float32)
    p = tmp_path / "tiny-4-angular.hdf5"
    _ann_file(p, xb, xq, gt, dist, "angular", **create_kw)
    ds = io.read_ann_hdf5(p)
    assert (ds.name, ds.metric, ds.d, ds.nb, ds.nq) == ("tiny-4-angular", "angular", 4, 101, 9)
    assert_array_equal_dtype(np.asarray(ds.get_database()[:]), xb)
    assert_array_equal_dtype(ds.get_queries(), xq)
    assert_array_equal_dtype(ds.get_groundtruth(), gt.astype(np.int64))
    assert_array_equal_dtype(ds.get_groundtruth(k=2), gt[:, :2].astype(np.int64))
    assert_array_equal_dtype(ds.gt_distances, dist)
    assert np.array_equal(np.asarray(ds.get_train()[:]), xb)
    blocks = list(ds.database_iterator(bs=40))
    assert [len(b) for b in blocks] == [40, 40, 21]
    assert np.array_equal(np.concatenate(blocks), xb)
    assert np.array_equal(np.concatenate(list(ds.database_iterator(bs=40, split=(2, 1)))), xb[50:])
    if not create_kw:
        assert isinstance(ds.xb, np.memmap)  # contiguous datasets are memory-mapped
    assert_array_equal_dtype(io.read_vectors(p, dataset="train", start=10, count=3), xb[10:13])
    assert_array_equal_dtype(io.read_vectors(p, dataset="neighbors", mmap=False), gt)


def test_hdf5_errors(tmp_path):
    p = tmp_path / "bad.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("train", data=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="needs dataset="):
        io.read_vectors(p)
    with pytest.raises(ValueError, match=r"no dataset 'test'.*\['train'\]"):
        io.read_vectors(p, dataset="test")
    with pytest.raises(ValueError, match=r"missing datasets \['test'\]"):
        io.read_ann_hdf5(p)
    with h5py.File(p, "a") as f:
        f.create_dataset("test", data=np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="missing the 'distance' attribute"):
        io.read_ann_hdf5(p)
    p2 = tmp_path / "garbage.h5"
    p2.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        io.read_vectors(p2, dataset="train")


@pytest.mark.parametrize("metric,attr", [("l2", "euclidean"), ("angular", "angular"), ("euclidean", "euclidean")])
def test_write_ann_hdf5_layout(tmp_path, metric, attr):
    rng = np.random.default_rng(9)
    xb = rng.integers(0, 256, size=(300, 6)).astype(np.uint8)  # converted to float32 on write
    xq = _random(rng, (11, 6), np.float32)
    xt = _random(rng, (20, 6), np.float32)
    D, I = io.compute_ground_truth(xb, xq, k=7, metric=metric)
    p = tmp_path / "sub" / "out.hdf5"
    io.write_ann_hdf5(p, xb, xq, I, D, metric, xt=xt, attrs={"source": "unit test"}, chunk_rows=64)
    assert not (tmp_path / "sub" / "out.hdf5.tmp").exists()
    with h5py.File(p, "r") as f:
        assert f.attrs["distance"] == attr
        assert f.attrs["source"] == "unit test"
        assert int(f.attrs["dimension"]) == 6
        assert f["train"].dtype == np.float32 and f["train"].shape == (300, 6)
        assert f["neighbors"].dtype == np.int32 and f["distances"].dtype == np.float32
        assert f["train"].chunks is None  # contiguous, so readers can memory-map it
        assert np.array_equal(f["train"][:], xb.astype(np.float32))
        assert np.array_equal(f["test"][:], xq)
        assert np.array_equal(f["neighbors"][:], I)
        assert np.array_equal(f["distances"][:], D)
        assert np.array_equal(f["learn"][:], xt)
    ds = io.load_dataset(p)
    assert ds.metric == io.normalize_metric(metric)
    assert np.array_equal(ds.get_train(), xt) and ds.nt == 20
    # distances omitted: computed from the vectors, equal to compute_ground_truth's
    io.write_ann_hdf5(p, xb, xq, I, None, metric)
    with h5py.File(p, "r") as f:
        np.testing.assert_allclose(f["distances"][:], D, rtol=1e-6, atol=1e-6)


def test_write_ann_hdf5_validates(tmp_path):
    xb, xq = np.zeros((5, 2), np.float32), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        io.write_ann_hdf5(tmp_path / "a.hdf5", xb, xq, np.array([[0], [5]]), np.zeros((2, 1)), "l2")
    with pytest.raises(ValueError, match="expected \\(nq, 2\\)"):
        io.write_ann_hdf5(tmp_path / "a.hdf5", xb, np.zeros((2, 3), np.float32), np.zeros((2, 1), int), None)
    with pytest.raises(ValueError, match="unknown metric 'ip'"):
        io.write_ann_hdf5(tmp_path / "a.hdf5", xb, xq, np.zeros((2, 1), int), None, "ip")
    assert not (tmp_path / "a.hdf5").exists()


def test_load_dataset_by_name(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    xb, xq = _random(rng, (50, 3), np.float32), _random(rng, (4, 3), np.float32)
    D, I = io.compute_ground_truth(xb, xq, k=5)
    io.write_ann_hdf5(tmp_path / "toy.hdf5", xb, xq, I, D, "l2")
    assert io.load_dataset("toy", data_dir=tmp_path).name == "toy"
    (tmp_path / "cwd" / "toy").mkdir(parents=True)  # a directory named like the data set is not a file
    monkeypatch.chdir(tmp_path / "cwd")
    assert io.load_dataset("toy", data_dir=tmp_path).nq == 4
    monkeypatch.setenv("FLASHGMM_DATA", str(tmp_path))
    assert io.load_dataset("toy").nb == 50
    with pytest.raises(FileNotFoundError, match="data_scripts.prepare --dataset missing"):
        io.load_dataset("missing", data_dir=tmp_path)
    (tmp_path / "x.fbin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="expects an ann-benchmarks .hdf5"):
        io.load_dataset(tmp_path / "x.fbin")


# ------------------------------------------------------------------------------------------------
# ground truth
# ------------------------------------------------------------------------------------------------


def _reference_knn(xb, xq, k, metric):
    xb64, xq64 = np.asarray(xb, np.float64), np.asarray(xq, np.float64)
    if metric == "l2":
        dist = np.sqrt(((xq64[:, None, :] - xb64[None, :, :]) ** 2).sum(-1))
    else:
        xbn = xb64 / np.linalg.norm(xb64, axis=1, keepdims=True)
        xqn = xq64 / np.linalg.norm(xq64, axis=1, keepdims=True)
        dist = 1.0 - xqn @ xbn.T
    I = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, I, 1), I, dist


@pytest.mark.parametrize("metric", ["l2", "angular"])
@pytest.mark.parametrize("chunk_size", [None, 97, 5])  # 5 < k: every chunk contributes fewer than k
def test_compute_ground_truth_matches_float64_bruteforce(metric, chunk_size):
    rng = np.random.default_rng(11)
    # odd sizes; shifted data so that L2 and angular rankings differ
    xb = (rng.standard_normal((1003, 37)) + 0.5).astype(np.float32)
    xq = (rng.standard_normal((29, 37)) + 0.5).astype(np.float32)
    k = 20
    D, I = io.compute_ground_truth(xb, xq, k=k, metric=metric, chunk_size=chunk_size)
    Dref, Iref, full = _reference_knn(xb, xq, k, metric)
    assert D.shape == I.shape == (29, k) and D.dtype == np.float32 and I.dtype == np.int64
    np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-6)
    # the returned distances are the true distances of the returned ids
    np.testing.assert_allclose(D, np.take_along_axis(full, I, 1), rtol=1e-5, atol=1e-6)
    assert (I == Iref).mean() == 1.0, f"id agreement {(I == Iref).mean():.4f}"
    assert (np.diff(D, axis=1) >= 0).all()


def test_compute_ground_truth_angular_differs_from_l2():
    """Guards against 'angular' silently falling back to L2 on unnormalised data."""
    rng = np.random.default_rng(12)
    xb = rng.standard_normal((500, 8)).astype(np.float32) * rng.uniform(0.1, 10, size=(500, 1)).astype(np.float32)
    xq = rng.standard_normal((10, 8)).astype(np.float32)
    _, Il2 = io.compute_ground_truth(xb, xq, k=5, metric="l2")
    Dang, Iang = io.compute_ground_truth(xb, xq, k=5, metric="angular")
    assert (Il2 != Iang).any()
    assert (Dang >= -1e-6).all() and (Dang <= 2 + 1e-6).all()


def test_compute_ground_truth_streams_memmap_uint8(tmp_path):
    rng = np.random.default_rng(13)
    xb = rng.integers(0, 256, size=(777, 16)).astype(np.uint8)
    xq = rng.integers(0, 256, size=(13, 16)).astype(np.float32)
    io.write_vectors(tmp_path / "b.bvecs", xb)
    view = io.read_vectors(tmp_path / "b.bvecs")  # strided uint8 memmap
    D, I = io.compute_ground_truth(view, xq, k=10, chunk_size=100)
    Dref, Iref, _ = _reference_knn(xb, xq, 11, "l2")  # one extra column to see ties at rank k
    np.testing.assert_allclose(D, Dref[:, :10], rtol=1e-6)
    # integer data: exact ties are possible, so compare ids only where the distance is not tied
    gap = np.diff(Dref, axis=1) > 0  # gap[:, j]: D[j] < D[j + 1]
    untied = gap[:, :10].copy()
    untied[:, 1:] &= gap[:, :9]
    assert untied.mean() > 0.5
    assert (I[untied] == Iref[:, :10][untied]).all()


def test_compute_ground_truth_validates():
    xb, xq = np.zeros((5, 3), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="k=6 must be between 1 and"):
        io.compute_ground_truth(xb, xq, k=6)
    with pytest.raises(ValueError, match="dimension mismatch"):
        io.compute_ground_truth(xb, np.zeros((2, 4), np.float32), k=1)
    with pytest.raises(ValueError, match="NaN"):
        io.compute_ground_truth(xb, np.full((2, 3), np.nan, np.float32), k=1)


# ------------------------------------------------------------------------------------------------
# real data: texmex siftsmall from ../shared/data
# ------------------------------------------------------------------------------------------------


@needs_siftsmall
def test_real_siftsmall_files():
    d = SHARED / "siftsmall"
    xb = io.read_vectors(d / "siftsmall_base.u8.npy")
    xq = io.read_vectors(d / "siftsmall_query.fvecs")
    gt = io.read_vectors(d / "siftsmall_groundtruth.ivecs")
    assert (xb.shape, xb.dtype) == ((10000, 128), np.uint8)
    assert (xq.shape, xq.dtype) == ((100, 128), np.float32)
    assert (gt.shape, gt.dtype) == ((100, 100), np.int32)
    # first base vector as documented in PROVENANCE.md; texmex queries are integer-valued
    assert xb[0, :8].tolist() == [0, 16, 35, 5, 32, 31, 14, 10]
    assert np.array_equal(xq, np.round(xq)) and xq.min() >= 0
    # independent parse of the fvecs bytes, as PROVENANCE.md describes
    a = np.fromfile(d / "siftsmall_query.fvecs", dtype=np.int32).reshape(-1, 129)
    assert (a[:, 0] == 128).all()
    assert np.array_equal(a[:, 1:].view(np.float32), xq)
    assert gt.min() >= 0 and gt.max() < 10000


@needs_siftsmall
def test_real_siftsmall_groundtruth_reproduced():
    d = SHARED / "siftsmall"
    xb = io.read_vectors(d / "siftsmall_base.u8.npy")
    xq = io.read_vectors(d / "siftsmall_query.fvecs")
    gt = io.read_vectors(d / "siftsmall_groundtruth.ivecs", mmap=False)
    D, I = io.compute_ground_truth(xb, xq, k=100, chunk_size=3000)
    assert (I[:, 0] == gt[:, 0]).all()
    # all 100 neighbour distances agree with the shipped ids' distances (ids may differ only on ties)
    np.testing.assert_allclose(D, io.groundtruth_distances(xb, xq, gt), rtol=1e-6)
    assert (I == gt).mean() > 0.99
