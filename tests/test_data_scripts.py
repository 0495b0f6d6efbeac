"""Tests for data_scripts.prepare: the downloader against a local HTTP server (resume, retries, Range
crops, checksums) and every converter on tiny files of each format, checked against numpy float64."""

import gzip
import hashlib
import io as pyio
import os
import re
import socket
import socketserver
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_scripts import prepare
from flashgmm_faiss import io

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLASHGMM_SHARED_DATA", REPO.parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "siftsmall").is_dir(), reason="../shared/data not present")


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------


def ref_knn(xb, xq, k, metric="l2"):
    """float64 numpy brute force: (D, I) with ann-benchmarks distances."""
    xb, xq = np.asarray(xb, np.float64), np.asarray(xq, np.float64)
    if metric == "l2":
        dist = np.stack([np.sqrt(((xb - q) ** 2).sum(1)) for q in xq])
    else:
        dist = 1 - (xq / np.linalg.norm(xq, axis=1, keepdims=True)) @ (xb / np.linalg.norm(xb, axis=1, keepdims=True)).T
    I = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, I, 1), I


def vecs_bytes(x, code):
    n, d = x.shape
    return b"".join(struct.pack(f"<i{d}{code}", d, *row.tolist()) for row in x)


def read_h5(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


def check_hdf5_against(path, xb, xq, k, metric, gt=None):
    data, attrs = read_h5(path)
    assert attrs["distance"] == {"l2": "euclidean", "angular": "angular"}[metric]
    np.testing.assert_array_equal(data["train"], np.asarray(xb, np.float32))
    np.testing.assert_array_equal(data["test"], np.asarray(xq, np.float32))
    Dref, Iref = ref_knn(xb, xq, k, metric)
    assert data["neighbors"].dtype == np.int32 and data["neighbors"].shape == Iref.shape
    np.testing.assert_array_equal(data["neighbors"], Iref if gt is None else gt)
    np.testing.assert_allclose(data["distances"], Dref, rtol=1e-5, atol=1e-6)
    return data, attrs


# ------------------------------------------------------------------------------------------------
# a tiny HTTP server with Range support
# ------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "not found")
            return
        start, end, status = 0, len(data) - 1, 200
        if rng and srv.honor_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if srv.cut_after:  # drop the connection mid-body, once per entry
            body = body[:srv.cut_after.pop(0)]
            self.close_connection = True
        srv.sent += len(body)  # before writing: the client may check it as soon as the bytes arrive
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serving(srv, scheme):
    """Run a local test server in a thread for the duration of a fixture; ``srv.url`` is its base address."""
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.url = f"{scheme}://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.honor_range, srv.cut_after, srv.sent = {}, [], True, [], 0
    yield from _serving(srv, "http")


PAYLOAD = np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_and_print_sha256(server, tmp_path, capsys):
    server.files["/f.bin"] = PAYLOAD
    out = prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()
    assert PAYLOAD_SHA in capsys.readouterr().err
    # a second call does not download again
    prepare.download(server.url + "/f.bin", out, quiet=True, sha256=PAYLOAD_SHA)
    assert len(server.log) == 1


def test_download_resumes_partial_file_with_range(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:123_456])
    prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True, sha256=PAYLOAD_SHA)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.log == [("/f.bin", "bytes=123456-")]
    assert server.sent == len(PAYLOAD) - 123_456  # only the missing tail was transferred


def test_download_retries_and_resumes_after_dropped_connection(server, tmp_path, capsys):
    server.files["/f.bin"] = PAYLOAD
    server.cut_after = [100_000, 50_000]  # two broken responses, then a good one
    prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True, backoff=0.0, retries=3)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert [r for _, r in server.log] == [None, "bytes=100000-", "bytes=150000-"]
    assert "retrying" in capsys.readouterr().err


def test_download_gives_up_and_keeps_partial(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.cut_after = [1000, 1000, 1000]
    with pytest.raises(prepare.DownloadError, match=r"giving up after 3 attempts.*run again to resume"):
        prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True, backoff=0.0, retries=2)
    assert (tmp_path / "f.bin.part").stat().st_size == 3000
    prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True)  # resumes at 3000
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.log[-1] == ("/f.bin", "bytes=3000-")


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.honor_range = False
    (tmp_path / "f.bin.part").write_bytes(b"\xff" * 5000)  # must be discarded, not appended to
    prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_download_checksum_mismatch(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(prepare.ChecksumError, match=f"expected {wrong}, got {PAYLOAD_SHA}"):
        prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True, sha256=wrong)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
    # an existing file with the wrong content is caught too
    (tmp_path / "g.bin").write_bytes(b"abc")
    with pytest.raises(prepare.ChecksumError, match="sha256 mismatch"):
        prepare.download(server.url + "/f.bin", tmp_path / "g.bin", quiet=True, sha256=PAYLOAD_SHA)


def test_download_404_fails_without_retry(server, tmp_path):
    with pytest.raises(prepare.DownloadError, match="HTTP 404"):
        prepare.download(server.url + "/missing", tmp_path / "x", quiet=True, backoff=0.0)
    assert len(server.log) == 1


def test_download_wrong_size(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(prepare.DownloadError, match=f"got {len(PAYLOAD)} bytes, expected 7"):
        prepare.download(server.url + "/f.bin", tmp_path / "f.bin", quiet=True, expected_size=7)


def test_download_rejects_unknown_scheme(tmp_path):
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        prepare.download("gopher://x/y", tmp_path / "y", quiet=True)


class _FTPHandler(socketserver.StreamRequestHandler):
    """Just enough of an FTP server for ftplib: USER/PASS/TYPE/SIZE/PASV/REST/RETR/QUIT."""

    def reply(self, text):
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self):
        srv, rest, pasv = self.server, 0, None
        self.reply("220 test server")
        for line in self.rfile:
            cmd, _, arg = line.decode().strip().partition(" ")
            cmd = cmd.upper()
            srv.log.append((cmd, arg))
            if cmd in ("USER", "PASS", "TYPE"):
                self.reply({"USER": "331 ok", "PASS": "230 ok", "TYPE": "200 ok"}[cmd])
            elif cmd == "SIZE":
                self.reply(f"213 {len(srv.files[arg])}" if arg in srv.files else "550 no such file")
            elif cmd == "PASV":
                pasv = socket.create_server(("127.0.0.1", 0))
                port = pasv.getsockname()[1]
                self.reply(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})")
            elif cmd == "REST":
                rest = int(arg)
                self.reply("350 restarting")
            elif cmd == "RETR":
                if arg not in srv.files:
                    self.reply("550 no such file")
                    continue
                self.reply("150 sending")
                conn, _ = pasv.accept()
                data = srv.files[arg][rest:]
                cut = srv.cut_after.pop(0) if srv.cut_after else None
                conn.sendall(data if cut is None else data[:cut])
                conn.close()
                pasv.close()
                rest = 0
                self.reply("226 done" if cut is None else "426 connection closed; transfer aborted")
            elif cmd == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")


@pytest.fixture
def ftp_server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _FTPHandler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.cut_after = {}, [], []
    yield from _serving(srv, "ftp")


def test_ftp_download_resumes_with_rest(ftp_server, tmp_path):
    ftp_server.files["/local/texmex/corpus/sift.tar.gz"] = PAYLOAD
    ftp_server.cut_after = [70_000]
    (tmp_path / "sift.tar.gz.part").write_bytes(PAYLOAD[:10_000])  # an earlier interrupted run
    out = prepare.download(ftp_server.url + "/local/texmex/corpus/sift.tar.gz", tmp_path / "sift.tar.gz",
                           quiet=True, backoff=0.0, sha256=PAYLOAD_SHA)
    assert out.read_bytes() == PAYLOAD
    rests = [arg for cmd, arg in ftp_server.log if cmd == "REST"]
    assert rests == ["10000", "80000"]


def test_ftp_missing_file_is_a_clear_error(ftp_server, tmp_path):
    with pytest.raises(prepare.DownloadError, match="FTP error 550"):
        prepare.download(ftp_server.url + "/nope.tar.gz", tmp_path / "nope.tar.gz", quiet=True, backoff=0.0)


def _fbin_bytes(x):
    return struct.pack("<II", *x.shape) + np.ascontiguousarray(x).tobytes()


def test_bigann_prefix_download_crop_and_convert(server, tmp_path):
    """The deep10m path on a tiny file: Range-fetch the first rows of a bigger .fbin, rewrite the header,
    then convert with computed ground truth and with a big-ann ground-truth file."""
    rng = np.random.default_rng(1)
    full = rng.standard_normal((50, 6)).astype(np.float32)
    xq = rng.standard_normal((9, 6)).astype(np.float32)
    server.files["/base.fbin"] = _fbin_bytes(full)
    server.files["/query.fbin"] = _fbin_bytes(xq)
    nb = 20
    size = 8 + nb * 6 * 4
    base = prepare.download(server.url + "/base.fbin", tmp_path / "base.first20.fbin", max_bytes=size,
                            expected_size=size, quiet=True)
    assert server.log[0] == ("/base.fbin", f"bytes=0-{size - 1}")
    with pytest.raises(ValueError, match=r"header says n=50, d=6 .* should be 1208 bytes, but it is 488"):
        io.read_vectors(base)  # not a valid file until the header is rewritten
    with pytest.raises(ValueError, match="expected the original file's n=1000"):
        prepare.crop_bigann_file(base, nb, original_n=1000, d=6)
    prepare.crop_bigann_file(base, nb, original_n=50, d=6)
    prepare.crop_bigann_file(base, nb, original_n=50, d=6)  # idempotent
    np.testing.assert_array_equal(io.read_vectors(base), full[:nb])
    query = prepare.download(server.url + "/query.fbin", tmp_path / "q.fbin", quiet=True)

    out = prepare.convert_bigann(base, query, tmp_path / "computed.hdf5", k=5, expect={"base": (nb, 6)})
    check_hdf5_against(out, full[:nb], xq, 5, "l2")

    # big-ann GT file (ids then squared distances); distances in the output are recomputed, not squared
    Dref, Iref = ref_knn(full[:nb], xq, 5)
    gt_file = tmp_path / "gt-10M"
    gt_file.write_bytes(struct.pack("<II", 9, 5) + Iref.astype("<i4").tobytes()
                        + (Dref ** 2).astype("<f4").tobytes())
    out = prepare.convert_bigann(base, query, tmp_path / "shipped.hdf5", gt=gt_file, check_queries=None)
    data, attrs = check_hdf5_against(out, full[:nb], xq, 5, "l2")
    assert "shipped" in attrs["groundtruth"]

    # a 1B-style ground truth (ids beyond the cropped base) is refused
    bad = Iref.copy()
    bad[0, 0] = 10**6
    gt_file.write_bytes(struct.pack("<II", 9, 5) + bad.astype("<i4").tobytes() + np.zeros(45, "<f4").tobytes())
    with pytest.raises(ValueError, match="bigger base"):
        prepare.convert_bigann(base, query, tmp_path / "bad.hdf5", gt=gt_file)
    with pytest.raises(ValueError, match=r"shape \(20, 6\), expected \(10000000, 96\)"):
        prepare.convert_bigann(base, query, tmp_path / "x.hdf5", expect={"base": (10_000_000, 96)})


def test_deep10m_end_to_end_cli_with_mirror(server, tmp_path, monkeypatch):
    """prepare --dataset deep10m through the CLI, scaled down: the module's sizes and query URL point at a
    tiny .fbin on the local server (--url is the documented mirror override for the base)."""
    rng = np.random.default_rng(2)
    full = rng.standard_normal((40, 4)).astype(np.float32)
    xq = rng.standard_normal((3, 4)).astype(np.float32)
    server.files["/DEEP/base.1B.fbin"] = _fbin_bytes(full)
    server.files["/DEEP/query.public.10K.fbin"] = _fbin_bytes(xq)
    for name, value in [("DEEP_NB", 25), ("DEEP_D", 4), ("DEEP_NQ", 3), ("DEEP_ORIGINAL_N", 40), ("GT_K", 7),
                        ("DEEP_QUERY_URL", server.url + "/DEEP/query.public.10K.fbin")]:
        monkeypatch.setattr(prepare, name, value)
    rc = prepare.main(["--dataset", "deep10m", "--out", str(tmp_path), "--url", server.url + "/DEEP/base.1B.fbin",
                       "--quiet"])
    assert rc == 0
    check_hdf5_against(tmp_path / "deep10m.hdf5", full[:25], xq, 7, "l2")
    assert server.log[0] == ("/DEEP/base.1B.fbin", f"bytes=0-{8 + 25 * 4 * 4 - 1}")
    assert (tmp_path / "downloads" / "base.1B.first25.fbin").exists()


# ------------------------------------------------------------------------------------------------
# converters on tiny files
# ------------------------------------------------------------------------------------------------


def _texmex_tar(path, base, query, gt, learn=None, prefix="sift", drop=()):
    with tarfile.open(path, "w:gz") as tar:
        members = {f"{prefix}_base.fvecs": vecs_bytes(base, "f"), f"{prefix}_query.fvecs": vecs_bytes(query, "f"),
                   f"{prefix}_groundtruth.ivecs": vecs_bytes(gt, "i")}
        if learn is not None:
            members[f"{prefix}_learn.fvecs"] = vecs_bytes(learn, "f")
        for name, data in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            tar.addfile(info, pyio.BytesIO(data))


def _sift_like(rng, nb=400, nq=8, d=8, k=10):
    xb = rng.integers(0, 128, size=(nb, d)).astype(np.float32) + rng.random((nb, d)).astype(np.float32)
    xq = rng.integers(0, 128, size=(nq, d)).astype(np.float32)
    _, I = ref_knn(xb, xq, k)
    return xb, xq, I.astype(np.int32)


def test_texmex_tar_converter(tmp_path):
    rng = np.random.default_rng(3)
    xb, xq, gt = _sift_like(rng)
    xt = rng.random((30, 8)).astype(np.float32)
    tar = tmp_path / "sift.tar.gz"
    _texmex_tar(tar, xb, xq, gt, xt)
    out = prepare.convert_texmex_tar(tar, tmp_path / "sift1m.hdf5", expect=None, check_queries=None,
                                     workdir=tmp_path / "x")
    data, attrs = check_hdf5_against(out, xb, xq, 10, "l2", gt=gt)
    np.testing.assert_array_equal(data["learn"], xt)
    assert not (tmp_path / "x").exists()  # extracted files are removed after conversion
    ds = io.load_dataset(out)
    assert ds.nt == 30 and np.array_equal(ds.get_train(), xt)
    with pytest.raises(ValueError, match=r"sift_base: shape \(400, 8\), expected \(1000000, 128\)"):
        prepare.convert_texmex_tar(tar, tmp_path / "y.hdf5")


def test_sift1m_cli_from_a_file_url(tmp_path, monkeypatch):
    """--dataset sift1m end to end, with --url pointing at a local tiny tar.gz (file:// mirror)."""
    rng = np.random.default_rng(10)
    xb, xq, gt = _sift_like(rng, nb=120, nq=4, k=10)
    tar = tmp_path / "mirror" / "sift.tar.gz"
    tar.parent.mkdir()
    _texmex_tar(tar, xb, xq, gt, learn=xb[:16])
    monkeypatch.setattr(prepare, "SIFT1M_SHAPES", {"base": (120, 8), "query": (4, 8), "groundtruth": (4, 10)})
    assert prepare.main(["--dataset", "sift1m", "--out", str(tmp_path / "o"), "--url", tar.as_uri(), "--quiet"]) == 0
    data, attrs = check_hdf5_against(tmp_path / "o" / "sift1m.hdf5", xb, xq, 10, "l2", gt=gt)
    assert (tmp_path / "o" / "downloads" / "sift.tar.gz").read_bytes() == tar.read_bytes()
    assert not (tmp_path / "o" / "downloads" / "sift_extracted").exists()


def test_texmex_tar_errors(tmp_path):
    rng = np.random.default_rng(4)
    xb, xq, gt = _sift_like(rng)
    tar = tmp_path / "a.tar.gz"
    _texmex_tar(tar, xb, xq, gt, drop=("sift_base.fvecs",))
    with pytest.raises(ValueError, match=r"missing \['sift_base.fvecs'\]"):
        prepare.convert_texmex_tar(tar, tmp_path / "o.hdf5", expect=None)
    # wrong ground truth: the spot check catches it
    bad = gt.copy()
    bad[:, [0, 5]] = bad[:, [5, 0]]
    _texmex_tar(tar, xb, xq, bad)
    with pytest.raises(ValueError, match="shipped neighbour .* rank 0|rank 0: shipped"):
        prepare.convert_texmex_tar(tar, tmp_path / "o.hdf5", expect=None, check_queries=3)
    assert not (tmp_path / "o.hdf5").exists()
    # a truncated download
    _texmex_tar(tar, xb, xq, gt)
    tar.write_bytes(tar.read_bytes()[:-200])
    with pytest.raises(ValueError, match="cannot read the tar archive"):
        prepare.convert_texmex_tar(tar, tmp_path / "o.hdf5", expect=None)


def _ann_file(path, xb, xq, gt, dist, distance):
    with h5py.File(path, "w") as f:  # as ann-benchmarks writes them
        f.attrs["distance"] = distance
        f.attrs["point_type"] = "float"
        f.create_dataset("train", data=xb)
        f.create_dataset("test", data=xq)
        f.create_dataset("neighbors", data=gt)
        f.create_dataset("distances", data=dist)


@pytest.mark.parametrize("metric,distance", [("l2", "euclidean"), ("angular", "angular")])
def test_ann_benchmarks_converter(tmp_path, metric, distance):
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((300, 7)).astype(np.float32) + 0.3
    xq = rng.standard_normal((6, 7)).astype(np.float32)
    D, I = ref_knn(xb, xq, 12, metric)
    src = tmp_path / f"tiny-7-{distance}.hdf5"
    _ann_file(src, xb, xq, I.astype(np.int32), D.astype(np.float32), distance)
    expect = {"train": (300, 7), "test": (6, 7), "neighbors": (6, 12)}
    out = prepare.convert_ann_benchmarks(src, tmp_path / "out.hdf5", expect=expect, metric=metric)
    check_hdf5_against(out, xb, xq, 12, metric)
    with pytest.raises(ValueError, match=r"train: shape \(300, 7\), expected \(1000000, 128\)"):
        prepare.convert_ann_benchmarks(src, tmp_path / "o.hdf5", expect={"train": (1_000_000, 128)})
    other = "angular" if metric == "l2" else "l2"
    with pytest.raises(ValueError, match="distance attribute is"):
        prepare.convert_ann_benchmarks(src, tmp_path / "o.hdf5", metric=other)


def _idx_gz(path, images):
    n, r, c = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, r, c) + images.astype(np.uint8).tobytes())


def test_mnist_converter(tmp_path):
    rng = np.random.default_rng(6)
    train = rng.integers(0, 256, size=(200, 4, 5), dtype=np.uint8)
    test = rng.integers(0, 256, size=(11, 4, 5), dtype=np.uint8)
    (tmp_path / "mnist").mkdir()
    _idx_gz(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", train)
    _idx_gz(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", test)
    out = prepare.convert_mnist(tmp_path, tmp_path / "mnist.hdf5", verify=False, k=10)
    xb, xq = train.reshape(200, 20), test.reshape(11, 20)
    data, _ = read_h5(out)
    np.testing.assert_array_equal(data["train"], xb.astype(np.float32))
    Dref, Iref = ref_knn(xb, xq, 10)
    np.testing.assert_allclose(data["distances"], Dref, rtol=1e-6)
    # integer data can tie: ids must agree wherever the distance is not tied with a neighbour
    Dext, _ = ref_knn(xb, xq, 11)
    gap = np.diff(Dext, axis=1) > 0
    untied = gap[:, :10].copy()
    untied[:, 1:] &= gap[:, :9]
    np.testing.assert_array_equal(data["neighbors"][untied], Iref[untied])
    with pytest.raises(prepare.ChecksumError, match="expected 6bbc9ace898e44ae57da46a324031adb"):
        prepare.convert_mnist(tmp_path, tmp_path / "m2.hdf5", verify=True)


def test_idx_reader_errors(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">IIII", 0x801, 2, 2, 2) + bytes(8))
    with pytest.raises(ValueError, match="IDX magic 0x00000801, expected 0x00000803"):
        prepare.read_idx_images(p)
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 3, 2, 2) + bytes(11))
    with pytest.raises(ValueError, match="12 images|= 28 bytes, the file has 27"):
        prepare.read_idx_images(p)
    p.write_bytes(gzip.compress(bytes(100))[:-10])
    with pytest.raises(ValueError, match="cannot decompress"):
        prepare.read_idx_images(p)


def test_glove6b_converter_split_and_angular_gt(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((250, 6)).astype(np.float32) * rng.uniform(0.2, 5, (250, 1)).astype(np.float32)
    (tmp_path / "glove-6b-50d").mkdir()
    np.save(tmp_path / "glove-6b-50d" / "glove_6B_50d.f32.npy", x)
    out = prepare.convert_glove6b(tmp_path, tmp_path / "g.hdf5", verify=False, n_queries=20, k=15)
    perm = np.random.default_rng(0).permutation(250)  # the documented split
    qids = np.sort(perm[:20])
    bids = np.setdiff1d(np.arange(250), qids)
    data, attrs = check_hdf5_against(out, x[bids], x[qids], 15, "angular")
    np.testing.assert_array_equal(data["test_ids"], qids)
    np.testing.assert_array_equal(data["train_ids"], bids)
    assert "default_rng(0)" in attrs["split"]
    with pytest.raises(prepare.ChecksumError):
        prepare.convert_glove6b(tmp_path, tmp_path / "g2.hdf5", verify=True, n_queries=20)


def _tiny_siftsmall(root, rng):
    xb = rng.integers(0, 100, size=(300, 8)).astype(np.uint8)
    xq = rng.integers(0, 100, size=(5, 8)).astype(np.float32) + 0.5  # half-integers: no exact ties
    _, I = ref_knn(xb, xq, 10)
    (root / "siftsmall").mkdir(parents=True)
    np.save(root / "siftsmall" / "siftsmall_base.u8.npy", xb)
    (root / "siftsmall" / "siftsmall_query.fvecs").write_bytes(vecs_bytes(xq, "f"))
    (root / "siftsmall" / "siftsmall_groundtruth.ivecs").write_bytes(vecs_bytes(I.astype(np.int32), "i"))
    return xb, xq, I


def test_local_siftsmall_and_bigann10k_converters(tmp_path):
    rng = np.random.default_rng(8)
    xb, xq, I = _tiny_siftsmall(tmp_path / "src", rng)
    out = prepare.convert_siftsmall(tmp_path / "src", tmp_path / "s.hdf5", verify=False)
    check_hdf5_against(out, xb, xq, 10, "l2", gt=I)
    with pytest.raises(prepare.ChecksumError, match="siftsmall_base.u8.npy: sha256 mismatch"):
        prepare.convert_siftsmall(tmp_path / "src", tmp_path / "s2.hdf5", verify=True)

    (tmp_path / "src" / "bigann10k").mkdir()
    np.save(tmp_path / "src" / "bigann10k" / "bigann10k_base.u8.npy", xb)
    np.save(tmp_path / "src" / "bigann10k" / "bigann10k_query.u8.npy", xb[:4])
    _, Ib = ref_knn(xb, xb[:4], 10)
    np.save(tmp_path / "src" / "bigann10k" / "bigann10k_groundtruth.i32.npy", Ib.astype(np.int32))
    out = prepare.convert_bigann10k(tmp_path / "src", tmp_path / "b.hdf5", verify=False)
    data, _ = read_h5(out)
    assert (data["neighbors"][:, 0] == np.arange(4)).all()  # self-queries
    assert np.array_equal(data["test"], xb[:4].astype(np.float32))


def test_cli_list_and_errors(tmp_path, capsys):
    assert prepare.main(["--list"]) == 0
    listing = capsys.readouterr().out
    for url in (prepare.TEXMEX_SIFT_URL, "http://ann-benchmarks.com/sift-128-euclidean.hdf5",
                "http://ann-benchmarks.com/glove-100-angular.hdf5", prepare.DEEP_BASE_URL, prepare.DEEP_QUERY_URL,
                prepare.DEEP_GT_10M_URL, "http://ann-benchmarks.com/deep-image-96-angular.hdf5"):
        assert url in listing
    for name in prepare.DATASETS:
        assert re.search(rf"^{re.escape(name)}\s", listing, re.M)
    assert prepare.main(["--dataset", "siftsmall", "--out", str(tmp_path), "--src", str(tmp_path / "nope")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["--dataset", "sift1m", "--sha256", "sift.tar.gz=xyz"])
    with pytest.raises(SystemExit, match="--source 'bigann' is not available"):
        prepare.main(["--dataset", "sift1m", "--source", "bigann", "--out", str(tmp_path)])


def test_cli_local_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(9)
    xb, xq, I = _tiny_siftsmall(tmp_path / "src", rng)
    args = ["--dataset", "siftsmall", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--no-verify"]
    assert prepare.main(args) == 0
    check_hdf5_against(tmp_path / "o" / "siftsmall.hdf5", xb, xq, 10, "l2", gt=I)
    assert prepare.main(args) == 0  # already there: not rebuilt
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------


@needs_shared
def test_real_siftsmall_prepare(tmp_path):
    assert prepare.main(["--dataset", "siftsmall", "--out", str(tmp_path), "--src", str(SHARED), "--quiet"]) == 0
    ds = io.load_dataset("siftsmall", data_dir=tmp_path)
    shipped = io.read_vectors(SHARED / "siftsmall" / "siftsmall_groundtruth.ivecs")
    assert (ds.nb, ds.nq, ds.d, ds.metric) == (10_000, 100, 128, "l2")
    np.testing.assert_array_equal(ds.get_groundtruth(), shipped)
    D, I = ref_knn(ds.get_database(), ds.get_queries(), 100)
    np.testing.assert_allclose(ds.gt_distances, D, rtol=1e-5)
    assert (I[:, 0] == shipped[:, 0]).all()


@needs_shared
@pytest.mark.slow
def test_real_mnist_prepare(tmp_path):
    assert prepare.main(["--dataset", "mnist", "--out", str(tmp_path), "--src", str(SHARED), "--quiet"]) == 0
    ds = io.load_dataset(tmp_path / "mnist.hdf5")
    assert (ds.nb, ds.nq, ds.d) == (60_000, 10_000, 784)
    D, I = ref_knn(ds.get_database(), ds.get_queries()[:10], 100)
    np.testing.assert_allclose(ds.gt_distances[:10], D, rtol=1e-5)
    assert (ds.get_groundtruth()[:10, 0] == I[:, 0]).all()
