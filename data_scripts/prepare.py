"""Download, verify and convert ANN benchmark data sets to the ann-benchmarks HDF5 layout.

    python -m data_scripts.prepare --list
    python -m data_scripts.prepare --dataset sift1m --out data            # texmex sift.tar.gz
    python -m data_scripts.prepare --dataset sift1m --source ann-benchmarks --out data
    python -m data_scripts.prepare --dataset glove-100 --out data
    python -m data_scripts.prepare --dataset deep10m --out data [--gt PATH_OR_URL]
    python -m data_scripts.prepare --dataset glove-6b-50d --out data      # local, ../shared/data

Every data set ends up as ``OUT/NAME.hdf5`` with datasets ``train`` (base, float32), ``test`` (queries,
float32), ``neighbors`` (int32 top-100 ids), ``distances`` (float32; Euclidean distance, or ``1 - cos``
for angular sets), an optional ``learn`` (dedicated training vectors) and the attribute ``distance``
("euclidean" or "angular"). Raw downloads are kept in ``OUT/downloads`` (``--cache``), so an interrupted
run resumes where it stopped: HTTP(S) with Range requests, FTP with REST.

Verification: exact expected shapes for every file, big-ann/texmex headers and sizes, sha256 for the
local files and the MNIST official md5s, and a ground-truth spot check (the shipped neighbours'
distances are recomputed and compared with an exact FAISS brute force on a sample of queries). For
downloads whose checksum we do not know, the sha256 is printed so that you can pin it with
``--sha256 FILENAME=HEX``. Missing ground truth is computed with FAISS brute force, in chunks of the base.
"""

from __future__ import annotations

import argparse
import errno
import ftplib
import gzip
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from flashgmm_faiss import io

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path(os.environ.get("FLASHGMM_SHARED_DATA", REPO.parent / "shared" / "data"))
GT_K = 100
MiB = 1 << 20

# --------------------------------------------------------------------------------------------------
# Known sources and checksums
# --------------------------------------------------------------------------------------------------

TEXMEX_SIFT_URL = "ftp://ftp.irisa.fr/local/texmex/corpus/sift.tar.gz"
ANN_BENCHMARKS_URL = "http://ann-benchmarks.com/{name}.hdf5"
DEEP_BASE_URL = "https://storage.yandexcloud.net/yandex-research/ann-datasets/DEEP/base.1B.fbin"
DEEP_QUERY_URL = "https://storage.yandexcloud.net/yandex-research/ann-datasets/DEEP/query.public.10K.fbin"
DEEP_GT_1B_URL = "https://storage.yandexcloud.net/yandex-research/ann-datasets/deep_new_groundtruth.public.10K.bin"
DEEP_GT_10M_URL = "https://dl.fbaipublicfiles.com/billion-scale-ann-benchmarks/GT_10M/deep-10M"

# sha256 of the local real-data files in ../shared/data, computed from the files and matching the
# prefixes recorded in ../shared/data/PROVENANCE.md.
LOCAL_SHA256 = {
    "siftsmall/siftsmall_base.u8.npy": "f002051fdc39eb41ec891dbd0da1bc7057ddc172d15fdfb0f83e5b2b6ab0f839",
    "siftsmall/siftsmall_query.fvecs": "095af38bda2741be721447ba97e9286fa918ece946be92a9ae133276eddc1a10",
    "siftsmall/siftsmall_groundtruth.ivecs": "b0717bf276111a166f14dcc2653fd04465b2afd6d34c72be641b622cf99f95ae",
    "bigann10k/bigann10k_base.u8.npy": "f829b81ef2539d563a727106b88f1c3fa24944c2eb2572bf03d6fe811856f066",
    "bigann10k/bigann10k_query.u8.npy": "e624059efaf3ee4da3d4fd3659190c5efc29dd5bbb3c11024500fe117694b090",
    "bigann10k/bigann10k_groundtruth.i32.npy": "f675cd136e973b95520f7f6f1e830b59100378e5ceefea2def5705e338fcf076",
    "glove-6b-50d/glove_6B_50d.f32.npy": "2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",
}
# md5 of the *decompressed* official MNIST image files (the values published with MNIST; a re-gzipped
# copy keeps them, unlike a checksum of the .gz bytes).
MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
}

GLOVE6B_SEED = 0
GLOVE6B_N_QUERIES = 10_000


class DownloadError(RuntimeError):
    """A download failed for good (HTTP 4xx, retries exhausted, wrong size)."""


class ChecksumError(ValueError):
    """A file's checksum differs from the expected one."""


# --------------------------------------------------------------------------------------------------
# Progress and hashing
# --------------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A one-line progress bar on stderr (rewritten in place on a terminal, a line every 10 s otherwise)."""

    def __init__(self, label: str, total: int | None, initial: int = 0, stream=None, quiet: bool = False):
        self.label, self.total, self.done = label, total, initial
        self.initial = initial
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else 10.0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def _print(self, end: str = "") -> None:
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.initial) / elapsed
        if self.total:
            frac = min(self.done / self.total, 1.0)
            width = 24
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta != float("inf") else "?"
            msg = (f"{self.label} [{bar}] {100 * frac:5.1f}% {_fmt_bytes(self.done)}/{_fmt_bytes(self.total)} "
                   f"{_fmt_bytes(rate)}/s ETA {eta_s}")
        else:
            msg = f"{self.label} {_fmt_bytes(self.done)} {_fmt_bytes(rate)}/s"
        if self.tty:
            print("\r" + msg.ljust(100), end=end, file=self.stream, flush=True)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        self._print(end="\n")


def file_sha256(path, label: str | None = None, quiet: bool = True) -> str:
    path = Path(path)
    h = hashlib.sha256()
    prog = Progress(label or f"sha256 {path.name}", path.stat().st_size, quiet=quiet)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MiB), b""):
            h.update(block)
            prog.update(len(block))
    return h.hexdigest()


def verify_sha256(path, expected: str, quiet: bool = True) -> str:
    actual = file_sha256(path, quiet=quiet)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual} "
                            "(corrupt or different file; delete it and run again)")
    return actual


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


class _Incomplete(Exception):
    """The connection ended early: retry and resume."""


_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException,
              _Incomplete, ftplib.error_temp, EOFError)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span == "*" else int(span.split("-")[0])
    return start, (None if total == "*" else int(total))


def _http_fetch(url: str, part: Path, max_bytes: int | None, timeout: float, label: str, quiet: bool,
                user_agent: str) -> int:
    """One attempt: fetch into ``part`` (appending when the server honours Range). Returns the final size."""
    have = part.stat().st_size if part.exists() else 0
    if max_bytes is not None and have >= max_bytes:
        if have > max_bytes:
            with open(part, "r+b") as f:
                f.truncate(max_bytes)
        return max_bytes
    headers = {"User-Agent": user_agent}
    if have or max_bytes is not None:
        headers["Range"] = f"bytes={have}-" + ("" if max_bytes is None else str(max_bytes - 1))
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: complete, or our partial file is bogus
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            if total is not None and have == total:
                return have
            part.unlink()
            raise _Incomplete(f"server refused to resume at byte {have}; restarting") from e
        raise
    with resp:
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Incomplete(f"server resumed at byte {start}, expected {have}; restarting")
            mode = "ab"
        else:  # 200: Range ignored (or not sent): start over
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        target = total if max_bytes is None else (max_bytes if total is None else min(total, max_bytes))
        prog = Progress(label, target, initial=have, quiet=quiet)
        with open(part, mode) as f:
            while target is None or have < target:
                want = 1 * MiB if target is None else min(1 * MiB, target - have)
                block = resp.read(want)
                if not block:
                    break
                f.write(block)
                have += len(block)
                prog.update(len(block))
        prog.close()
    if target is not None and have < target:
        raise _Incomplete(f"connection closed at byte {have} of {target}")
    return have


def _ftp_fetch(url: str, part: Path, max_bytes: int | None, timeout: float, label: str, quiet: bool) -> int:
    """One FTP attempt, resuming with REST from the partial file's size."""
    u = urllib.parse.urlparse(url)
    have = part.stat().st_size if part.exists() else 0
    with ftplib.FTP(timeout=timeout) as ftp:
        ftp.connect(u.hostname, u.port or 21)
        ftp.login(u.username or "anonymous", u.password or "anonymous@")
        ftp.voidcmd("TYPE I")
        path = urllib.parse.unquote(u.path)
        try:
            total = ftp.size(path)
        except ftplib.all_errors:
            total = None
        target = total if max_bytes is None else (max_bytes if total is None else min(total, max_bytes))
        if target is not None and have >= target:
            return have
        prog = Progress(label, target, initial=have, quiet=quiet)
        with open(part, "ab" if have else "wb") as f:
            conn = ftp.transfercmd(f"RETR {path}", rest=have or None)
            with conn:
                while target is None or have < target:
                    block = conn.recv(1 * MiB if target is None else min(1 * MiB, target - have))
                    if not block:
                        break
                    f.write(block)
                    have += len(block)
                    prog.update(len(block))
            if max_bytes is None or have < max_bytes:
                ftp.voidresp()
        prog.close()
    if target is not None and have < target:
        raise _Incomplete(f"FTP transfer ended at byte {have} of {target}")
    return have


def download(url: str, dest, *, sha256: str | None = None, expected_size: int | None = None,
             max_bytes: int | None = None, retries: int = 5, timeout: float = 60.0, backoff: float = 2.0,
             quiet: bool = False, user_agent: str = "flashgmm-faiss-data_scripts/0.1") -> Path:
    """Download ``url`` to ``dest``, resumably, and verify it.

    The data go to ``dest + ".part"``; a rerun after an interruption continues from its size (HTTP Range,
    FTP REST; a server that ignores Range restarts the file). Network errors and 5xx answers are retried
    ``retries`` times with exponential backoff; 4xx answers fail at once. ``max_bytes`` fetches only the
    first bytes of the file (one Range request), e.g. the first 10M rows of a 1B-row ``.fbin``.
    When complete, the size is checked against ``expected_size``, the sha256 against ``sha256`` (a
    mismatch deletes the file and raises :class:`ChecksumError`), and the file is renamed to ``dest``.
    An existing ``dest`` is not downloaded again (only its checksum is verified when given).
    Prints the sha256 so that it can be pinned. Returns ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if expected_size is not None and dest.stat().st_size != expected_size:
            raise DownloadError(f"{dest} exists but has {dest.stat().st_size} bytes, expected {expected_size}; "
                                "delete it to download again")
        if sha256:
            verify_sha256(dest, sha256)
        _log(f"{dest}: already present, not downloading")
        return dest
    part = dest.with_name(dest.name + ".part")
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "ftp", "file"):
        raise ValueError(f"unsupported URL scheme in {url!r}: expected http, https, ftp or file")
    label = dest.name
    _log(f"downloading {url}\n         -> {dest}" + (f" (first {max_bytes:,} bytes)" if max_bytes else ""))
    for attempt in range(retries + 1):
        try:
            if scheme == "ftp":
                size = _ftp_fetch(url, part, max_bytes, timeout, label, quiet)
            else:
                size = _http_fetch(url, part, max_bytes, timeout, label, quiet, user_agent)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            err = e
        except ftplib.error_perm as e:
            raise DownloadError(f"{url}: FTP error {e}") from e
        except (PermissionError, IsADirectoryError, FileNotFoundError):
            raise  # local problems: retrying cannot help
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            err = e
        except _RETRYABLE as e:
            err = e
        if attempt == retries:
            raise DownloadError(f"{url}: giving up after {retries + 1} attempts: {err} "
                                f"(the partial file {part} is kept; run again to resume)") from err
        wait = backoff * 2 ** attempt
        _log(f"  {type(err).__name__}: {err}; retrying in {wait:.0f} s ({attempt + 1}/{retries})")
        time.sleep(wait)
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(f"{url}: got {size} bytes, expected {expected_size}; the file was deleted")
    digest = file_sha256(part, label=f"sha256 {dest.name}", quiet=quiet)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}; "
                            "the file was deleted (corrupt download or the upstream file changed)")
    os.replace(part, dest)
    _log(f"  sha256 {digest}  {dest.name}" + ("  (verified)" if sha256 else "  (pin with --sha256 "
                                                                      f"{dest.name}=<hex>)"))
    return dest


# --------------------------------------------------------------------------------------------------
# Checks shared by the converters
# --------------------------------------------------------------------------------------------------


def expect_shape(what: str, x, shape: tuple | None) -> None:
    if shape is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{what}: shape {tuple(x.shape)}, expected {tuple(shape)} (incomplete or wrong file)")


def check_groundtruth(xb, xq, gt, metric: str, n_queries: int | None = 10, seed: int = 0,
                      gt_distances=None, what: str = "ground truth") -> dict:
    """Spot-check shipped ground truth against an exact FAISS brute force on a sample of queries.

    Fails (ValueError) when, for a sampled query, the distance of a shipped neighbour differs from the
    exact distance at the same rank (ids themselves may differ only on ties). ``gt_distances``, when
    given, is compared with the distances recomputed from the ids (a mismatch is reported, not fatal:
    it usually means another distance convention). ``n_queries=None`` checks every query.
    """
    nq, k = gt.shape
    if gt.min() < 0 or gt.max() >= xb.shape[0]:
        raise ValueError(f"{what}: ids out of range [0, {xb.shape[0]}): [{gt.min()}, {gt.max()}]")
    if n_queries is None or n_queries >= nq:
        sample = np.arange(nq)
    else:
        sample = np.sort(np.random.default_rng(seed).choice(nq, size=n_queries, replace=False))
    if sample.size == 0:
        return {}
    xq_s = np.asarray(xq[sample], dtype=np.float32)
    D, I = io.compute_ground_truth(xb, xq_s, k=k, metric=metric)
    D_shipped = io.groundtruth_distances(xb, xq_s, gt[sample], metric)
    tol = 1e-4 * np.maximum(np.abs(D), 1.0) if metric == "l2" else 1e-4
    bad = np.abs(D_shipped - D) > tol
    if bad.any():
        q, r = np.argwhere(bad)[0]
        raise ValueError(f"{what}: query {sample[q]} rank {r}: shipped neighbour {gt[sample[q], r]} is at "
                         f"distance {D_shipped[q, r]:.6g} but the exact rank-{r} distance is {D[q, r]:.6g} "
                         f"({bad.any(axis=1).sum()}/{sample.size} sampled queries differ; --check-queries 0 skips this check)")
    report = {"queries_checked": int(sample.size), "id_agreement": float((I == gt[sample]).mean())}
    if gt_distances is not None:
        stored = np.asarray(gt_distances[sample], dtype=np.float64)
        err = np.abs(stored - D_shipped)
        report["stored_distance_max_err"] = float(err.max())
        if not np.allclose(stored, D_shipped, rtol=1e-3, atol=1e-4):
            _log(f"  warning: {what}: stored distances differ from recomputed ones by up to {err.max():.3g} "
                 f"(a different distance convention?); the recomputed ones are written")
    _log(f"  {what}: checked {sample.size} queries against FAISS brute force: distances agree, "
         f"{100 * report['id_agreement']:.2f}% of ids identical (the rest are ties)")
    return report


def _check_local_sha256(src: Path, rel: str, verify: bool) -> Path:
    p = src / rel
    if not p.exists():
        raise FileNotFoundError(f"missing {p} (set --src to the directory holding {rel.split('/')[0]}/)")
    if verify and rel in LOCAL_SHA256:
        verify_sha256(p, LOCAL_SHA256[rel])
    return p


def _finish(out_path: Path, xb, xq, gt, gtd, metric: str, attrs: dict, xt=None) -> Path:
    _log(f"  writing {out_path} (train {tuple(xb.shape)}, test {tuple(xq.shape)}, neighbors {tuple(gt.shape)}, "
         f"{io.normalize_metric(metric)})")
    attrs = {"created_by": "python -m data_scripts.prepare", **attrs}
    io.write_ann_hdf5(out_path, xb, xq, gt, gtd, metric, xt=xt, attrs=attrs)
    _log(f"  done: {out_path} ({_fmt_bytes(out_path.stat().st_size)})")
    return out_path


def _compute_gt(xb, xq, metric, k=GT_K):
    _log(f"  computing exact top-{k} ground truth with FAISS brute force ({xq.shape[0]:,} queries x "
         f"{xb.shape[0]:,} base, {io.normalize_metric(metric)})")
    t0 = time.time()
    D, I = io.compute_ground_truth(xb, xq, k=k, metric=metric, progress=True)
    _log(f"  ground truth done in {time.time() - t0:.1f} s")
    return D, I


# --------------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------------

SIFT1M_SHAPES = {"base": (1_000_000, 128), "query": (10_000, 128), "groundtruth": (10_000, 100),
                 "learn": (100_000, 128)}


def convert_texmex_tar(tar_path, out_path, *, prefix: str = "sift", expect: dict | None = SIFT1M_SHAPES,
                       workdir=None, check_queries: int | None = 10, keep_extracted: bool = False) -> Path:
    """texmex ``sift.tar.gz`` (``sift/sift_{base,query,learn}.fvecs``, ``sift/sift_groundtruth.ivecs``)
    -> ann-benchmarks HDF5 (``learn`` kept as the training set)."""
    tar_path, out_path = Path(tar_path), Path(out_path)
    workdir = Path(workdir) if workdir else out_path.parent / "downloads" / f"{prefix}_extracted"
    workdir.mkdir(parents=True, exist_ok=True)
    want = {f"{prefix}_{p}.fvecs" for p in ("base", "query", "learn")} | {f"{prefix}_groundtruth.ivecs"}
    found = {}
    _log(f"  extracting {tar_path.name} -> {workdir}")
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for m in tar:
                name = Path(m.name).name
                if m.isfile() and name in want:
                    dst = workdir / name
                    with tar.extractfile(m) as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, 8 * MiB)
                    found[name] = dst
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{tar_path}: cannot read the tar archive ({e}); truncated download? delete it and "
                         "run again") from e
    try:
        missing = sorted(want - set(found) - {f"{prefix}_learn.fvecs"})
        if missing:
            raise ValueError(f"{tar_path}: missing {missing} in the archive (found {sorted(found)})")
        xb = io.read_vectors(found[f"{prefix}_base.fvecs"])
        xq = io.read_vectors(found[f"{prefix}_query.fvecs"], mmap=False)
        gt = io.read_vectors(found[f"{prefix}_groundtruth.ivecs"], mmap=False)
        xt = io.read_vectors(found[f"{prefix}_learn.fvecs"]) if f"{prefix}_learn.fvecs" in found else None
        for key, arr in (("base", xb), ("query", xq), ("groundtruth", gt), ("learn", xt)):
            if arr is not None:
                expect_shape(f"{tar_path.name}:{prefix}_{key}", arr, (expect or {}).get(key))
        check_groundtruth(xb, xq, gt, "l2", check_queries, what=f"{prefix}_groundtruth.ivecs")
        _finish(out_path, xb, xq, gt, None, "l2",
                {"source": str(tar_path.name), "groundtruth": "shipped (texmex), distances recomputed"}, xt=xt)
    finally:
        xb = xt = None  # drop the memory maps before deleting their files
        if not keep_extracted:
            shutil.rmtree(workdir, ignore_errors=True)
    return out_path


def convert_ann_benchmarks(src, out_path, *, expect: dict | None = None, metric: str | None = None,
                           check_queries: int | None = 10) -> Path:
    """Validate an ann-benchmarks HDF5 file and rewrite it into ``out_path`` (contiguous datasets, our
    attributes), checking the shipped neighbours on a sample of queries."""
    src, out_path = Path(src), Path(out_path)
    ds = io.read_ann_hdf5(src)
    if metric is not None and ds.metric != io.normalize_metric(metric):
        raise ValueError(f"{src}: distance attribute is {ds.metric!r}, expected {io.normalize_metric(metric)!r}")
    expect = expect or {}
    expect_shape(f"{src.name}:train", ds.xb, expect.get("train"))
    expect_shape(f"{src.name}:test", ds.xq, expect.get("test"))
    if ds.gt is None:
        raise ValueError(f"{src}: no 'neighbors' dataset")
    expect_shape(f"{src.name}:neighbors", ds.gt, expect.get("neighbors"))
    check_groundtruth(ds.xb, ds.xq, ds.gt, ds.metric, check_queries, gt_distances=ds.gt_distances,
                      what=f"{src.name}:neighbors")
    return _finish(out_path, ds.xb, ds.xq, ds.gt, ds.gt_distances, ds.metric,
                   {"source": src.name, "groundtruth": "shipped (ann-benchmarks)"})


def crop_bigann_file(path, nb: int, original_n: int | None = None, d: int | None = None) -> None:
    """Rewrite the header of a big-ann file holding only the first ``nb`` rows of a bigger one.

    The file has the original header (n = ``original_n``) followed by exactly ``nb`` rows; a file whose
    header already says ``nb`` is left alone (a previous run finished)."""
    path = Path(path)
    n0, d0 = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
    if d is not None and d0 != d:
        raise ValueError(f"{path}: header dimension {d0}, expected {d}")
    if n0 == nb:
        return
    if original_n is not None and n0 != original_n:
        raise ValueError(f"{path}: header says n={n0}, expected the original file's n={original_n}")
    if n0 < nb:
        raise ValueError(f"{path}: the source has only {n0} rows, cannot keep {nb}")
    header = np.memmap(path, dtype="<u4", mode="r+", shape=(2,))
    header[0] = nb
    header.flush()
    del header


def convert_bigann(base_path, query_path, out_path, *, metric: str = "l2", gt=None, k: int = GT_K,
                   expect: dict | None = None, check_queries: int | None = 10, attrs: dict | None = None) -> Path:
    """big-ann ``.fbin``/``.u8bin`` base + queries -> ann-benchmarks HDF5.

    ``gt`` is a big-ann k-NN result file (e.g. ``GT_10M/deep-10M``: ids then distances) whose ids are
    kept (distances recomputed, ann-benchmarks style) after a spot check; without it the exact top-``k``
    is computed with FAISS brute force in chunks of the base."""
    xb = io.read_vectors(base_path)
    xq = io.read_vectors(query_path, mmap=False)
    expect = expect or {}
    expect_shape(Path(base_path).name, xb, expect.get("base"))
    expect_shape(Path(query_path).name, xq, expect.get("query"))
    attrs = dict(attrs or {})
    if gt is not None:
        I, _ = io.read_bigann_groundtruth(gt)
        if I.shape[0] != xq.shape[0]:
            raise ValueError(f"{gt}: ground truth has {I.shape[0]} rows for {xq.shape[0]} queries")
        if I.max() >= xb.shape[0]:
            raise ValueError(f"{gt}: ids up to {I.max()} but the base has {xb.shape[0]} rows: this ground truth "
                             "is for a bigger base (the 1B file?)")
        check_groundtruth(xb, xq, I, metric, check_queries, what=Path(gt).name)
        D = None
        attrs["groundtruth"] = f"shipped ({Path(gt).name}), distances recomputed"
    else:
        D, I = _compute_gt(xb, xq, metric, k)
        attrs["groundtruth"] = f"computed (FAISS brute force, exact top-{k})"
    return _finish(Path(out_path), xb, xq, I, D, metric, attrs)


# local converters -------------------------------------------------------------------------------


def _convert_local_triplet(src, out_path, name: str, files: tuple[str, str, str], attrs: dict, *, verify: bool,
                           check_queries: int | None) -> Path:
    """A local set stored as (base, queries, ground truth) files under SRC/name: 10k x 128, 100 x 128, 100 x 100."""
    src = Path(src)
    paths = [_check_local_sha256(src, f"{name}/{f}", verify) for f in files]
    xb = io.read_vectors(paths[0])  # memory-mapped; the small query and GT files are read whole
    xq, gt = (io.read_vectors(p, mmap=False) for p in paths[1:])
    if verify:
        expect_shape(f"{name} base", xb, (10_000, 128))
        expect_shape(f"{name} query", xq, (100, 128))
        expect_shape(f"{name} groundtruth", gt, (100, 100))
    check_groundtruth(xb, xq, gt, "l2", check_queries, what=files[2])
    return _finish(Path(out_path), xb, xq, gt, None, "l2", attrs)


def convert_siftsmall(src, out_path, *, verify: bool = True, check_queries: int | None = None) -> Path:
    """texmex ANN_SIFT10K from ../shared/data/siftsmall (uint8 .npy base, fvecs queries, ivecs GT)."""
    return _convert_local_triplet(
        src, out_path, "siftsmall",
        ("siftsmall_base.u8.npy", "siftsmall_query.fvecs", "siftsmall_groundtruth.ivecs"),
        {"source": "texmex ANN_SIFT10K (siftsmall), see shared/data/PROVENANCE.md",
         "groundtruth": "shipped (texmex), distances recomputed"},
        verify=verify, check_queries=check_queries)


def convert_bigann10k(src, out_path, *, verify: bool = True, check_queries: int | None = None) -> Path:
    """10k BIGANN (SIFT1B) uint8 vectors; the 100 queries are base[0:100] (self-queries, see PROVENANCE)."""
    return _convert_local_triplet(
        src, out_path, "bigann10k",
        ("bigann10k_base.u8.npy", "bigann10k_query.u8.npy", "bigann10k_groundtruth.i32.npy"),
        {"source": "BIGANN 10k subset (queries = base[0:100]), see shared/data/PROVENANCE.md",
         "groundtruth": "shipped, distances recomputed"},
        verify=verify, check_queries=check_queries)


def read_idx_images(path, expected_md5: str | None = None) -> np.ndarray:
    """Read a (gzipped) IDX image file (magic 0x00000803, big-endian dims) as an (n, rows*cols) uint8 array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress ({e}); truncated or not gzip") from e
    if expected_md5 is not None:
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != expected_md5:
            raise ChecksumError(f"{path}: md5 of the decompressed IDX data is {md5}, expected {expected_md5} "
                                "(the official MNIST value)")
    if len(raw) < 16:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX image header")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=4))
    if magic != 0x00000803:
        raise ValueError(f"{path}: IDX magic {magic:#010x}, expected 0x00000803 (unsigned byte, 3 dims)")
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{path}: header says {n}x{rows}x{cols} images = {16 + n * rows * cols} bytes, "
                         f"the file has {len(raw)} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols)


def convert_mnist(src, out_path, *, verify: bool = True, k: int = GT_K) -> Path:
    """MNIST IDX: train 60k images as base, t10k 10k as queries, Euclidean, exact top-100 computed."""
    d = Path(src) / "mnist"
    xb = read_idx_images(d / "train-images-idx3-ubyte.gz",
                         MNIST_RAW_MD5["train-images-idx3-ubyte.gz"] if verify else None)
    xq = read_idx_images(d / "t10k-images-idx3-ubyte.gz",
                         MNIST_RAW_MD5["t10k-images-idx3-ubyte.gz"] if verify else None)
    if verify:
        expect_shape("MNIST train images", xb, (60_000, 784))
        expect_shape("MNIST t10k images", xq, (10_000, 784))
    D, I = _compute_gt(xb, xq, "l2", k)
    return _finish(Path(out_path), xb, xq, I, D, "l2",
                   {"source": "MNIST train (base) / t10k (queries), IDX", "groundtruth":
                    f"computed (FAISS brute force, exact top-{k})"})


def glove6b_split(n: int, n_queries: int = GLOVE6B_N_QUERIES, seed: int = GLOVE6B_SEED):
    """The fixed query/base split: ``perm = np.random.default_rng(seed).permutation(n)``; queries are the
    rows ``sort(perm[:n_queries])``, the base the other rows in their original order."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_queries:]), np.sort(perm[:n_queries])


def convert_glove6b(src, out_path, *, verify: bool = True, n_queries: int = GLOVE6B_N_QUERIES,
                    seed: int = GLOVE6B_SEED, k: int = GT_K) -> Path:
    """GloVe 6B 50d (400k words): hold out ``n_queries`` rows as queries (``glove6b_split``), angular."""
    x = io.read_vectors(_check_local_sha256(Path(src), "glove-6b-50d/glove_6B_50d.f32.npy", verify), mmap=False)
    if verify:
        expect_shape("glove_6B_50d", x, (400_000, 50))
    if not 0 < n_queries < x.shape[0]:
        raise ValueError(f"n_queries={n_queries} must be between 1 and {x.shape[0] - 1}")
    base_ids, query_ids = glove6b_split(x.shape[0], n_queries, seed)
    xb, xq = x[base_ids], x[query_ids]
    D, I = _compute_gt(xb, xq, "angular", k)
    out = _finish(Path(out_path), xb, xq, I, D, "angular",
                  {"source": "Stanford GloVe 6B 50d (400k words)",
                   "split": f"numpy default_rng({seed}).permutation(n): queries = sorted(perm[:{n_queries}]), "
                            "base = the other rows in order",
                   "groundtruth": f"computed (FAISS brute force on normalised vectors, exact top-{k})"})
    import h5py  # keep the row ids so results map back to words (glove_6B_vocab.parquet)
    with h5py.File(out, "a") as f:
        f.create_dataset("train_ids", data=base_ids.astype(np.int64))
        f.create_dataset("test_ids", data=query_ids.astype(np.int64))
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _hdf5_bytes(nb, nq, d, k=GT_K, nt=0):
    return 4 * (nb + nq + nt) * d + 8 * nq * k


@dataclass
class Source:
    description: str
    urls: list[str]
    download_bytes: str
    run: Callable  # (args, out_path, cache) -> Path
    out_name: str | None = None  # defaults to the data set name


@dataclass
class DatasetSpec:
    name: str
    description: str
    metric: str
    shape: str
    out_bytes: int
    sources: dict = field(default_factory=dict)
    default_source: str = ""


def _sha_for(args, filename):
    return (args.sha256 or {}).get(filename)


def _run_texmex_sift(args, out_path, cache):
    tar = download(args.url or TEXMEX_SIFT_URL, cache / "sift.tar.gz", sha256=_sha_for(args, "sift.tar.gz"),
                   retries=args.retries, quiet=args.quiet)
    return convert_texmex_tar(tar, out_path, expect=SIFT1M_SHAPES, workdir=cache / "sift_extracted",
                              check_queries=args.check_queries)


def _ann_runner(ann_name, expect, metric):
    def run(args, out_path, cache):
        fn = f"{ann_name}.hdf5"
        src = download(args.url or ANN_BENCHMARKS_URL.format(name=ann_name), cache / fn,
                       sha256=_sha_for(args, fn), retries=args.retries, quiet=args.quiet)
        return convert_ann_benchmarks(src, out_path, expect=expect, metric=metric, check_queries=args.check_queries)
    return run


DEEP_NB, DEEP_D, DEEP_NQ, DEEP_ORIGINAL_N = 10_000_000, 96, 10_000, 1_000_000_000


def _run_deep_bigann(args, out_path, cache):
    base = cache / f"base.1B.first{DEEP_NB}.fbin"  # must keep the .fbin extension
    size = 8 + DEEP_NB * DEEP_D * 4
    if not base.exists():
        download(args.url or DEEP_BASE_URL, base, max_bytes=size, expected_size=size,
                 sha256=_sha_for(args, base.name), retries=args.retries, quiet=args.quiet)
    crop_bigann_file(base, DEEP_NB, original_n=DEEP_ORIGINAL_N, d=DEEP_D)
    query = download(DEEP_QUERY_URL, cache / "query.public.10K.fbin", expected_size=8 + DEEP_NQ * DEEP_D * 4,
                     sha256=_sha_for(args, "query.public.10K.fbin"), retries=args.retries, quiet=args.quiet)
    gt = args.gt
    if gt and urllib.parse.urlparse(gt).scheme in ("http", "https", "ftp"):
        fn = Path(urllib.parse.urlparse(gt).path).name
        gt = download(gt, cache / fn, expected_size=8 + DEEP_NQ * GT_K * 8, sha256=_sha_for(args, fn),
                      retries=args.retries, quiet=args.quiet)
    return convert_bigann(base, query, out_path, metric="l2", gt=gt, k=GT_K, check_queries=args.check_queries,
                          expect={"base": (DEEP_NB, DEEP_D), "query": (DEEP_NQ, DEEP_D)},
                          attrs={"source": f"{args.url or DEEP_BASE_URL} (first {DEEP_NB:,} rows), {DEEP_QUERY_URL}"})


def _local(fn):
    def run(args, out_path, cache):
        return fn(args.src, out_path, verify=not args.no_verify)
    return run


_SIFT_ANN = {"train": (1_000_000, 128), "test": (10_000, 128), "neighbors": (10_000, 100)}
_GLOVE100_ANN = {"train": (1_183_514, 100), "test": (10_000, 100), "neighbors": (10_000, 100)}
_DEEP_ANN = {"train": (9_990_000, 96), "test": (10_000, 96), "neighbors": (10_000, 100)}

DATASETS = {
    "sift1m": DatasetSpec(
        "sift1m", "texmex SIFT1M: 1M SIFT descriptors, 10k queries, L2", "l2", "1,000,000 x 128 (+100k learn)",
        _hdf5_bytes(1_000_000, 10_000, 128, nt=100_000),
        {"texmex": Source("texmex sift.tar.gz (fvecs/ivecs; learn set kept as `learn`)", [TEXMEX_SIFT_URL],
                          f"~161 MB tar.gz ({_fmt_bytes(1_100_000 * 516 + 10_000 * 516 + 10_000 * 404)} unpacked)",
                          _run_texmex_sift),
         "ann-benchmarks": Source("ann-benchmarks sift-128-euclidean.hdf5",
                                  [ANN_BENCHMARKS_URL.format(name="sift-128-euclidean")],
                                  f"~{_fmt_bytes(_hdf5_bytes(1_000_000, 10_000, 128))}",
                                  _ann_runner("sift-128-euclidean", _SIFT_ANN, "l2"))},
        "texmex"),
    "glove-100": DatasetSpec(
        "glove-100", "GloVe Twitter 27B 100d (ann-benchmarks glove-100-angular)", "angular", "1,183,514 x 100",
        _hdf5_bytes(1_183_514, 10_000, 100),
        {"ann-benchmarks": Source("ann-benchmarks glove-100-angular.hdf5",
                                  [ANN_BENCHMARKS_URL.format(name="glove-100-angular")],
                                  f"~{_fmt_bytes(_hdf5_bytes(1_183_514, 10_000, 100))}",
                                  _ann_runner("glove-100-angular", _GLOVE100_ANN, "angular"))},
        "ann-benchmarks"),
    "deep10m": DatasetSpec(
        "deep10m", "Deep1B first 10M rows (big-ann-benchmarks), 10k public queries, L2", "l2", "10,000,000 x 96",
        _hdf5_bytes(DEEP_NB, DEEP_NQ, DEEP_D),
        {"bigann": Source("big-ann base.1B.fbin (first 10M rows by Range request) + query.public.10K.fbin; "
                          "GT: --gt PATH_OR_URL (GT_10M/deep-10M) or computed with FAISS",
                          [DEEP_BASE_URL, DEEP_QUERY_URL, f"(optional --gt) {DEEP_GT_10M_URL}"],
                          f"{_fmt_bytes(8 + DEEP_NB * DEEP_D * 4 + 8 + DEEP_NQ * DEEP_D * 4)}"
                          f" (+{_fmt_bytes(8 + DEEP_NQ * GT_K * 8)} GT)", _run_deep_bigann),
         "ann-benchmarks": Source("ann-benchmarks deep-image-96-angular.hdf5 (9,990,000 rows, angular): "
                                  "written as deep10m-angular.hdf5",
                                  [ANN_BENCHMARKS_URL.format(name="deep-image-96-angular")],
                                  f"~{_fmt_bytes(_hdf5_bytes(9_990_000, 10_000, 96))}",
                                  _ann_runner("deep-image-96-angular", _DEEP_ANN, "angular"),
                                  out_name="deep10m-angular")},
        "bigann"),
    "siftsmall": DatasetSpec(
        "siftsmall", "texmex ANN_SIFT10K (local)", "l2", "10,000 x 128, 100 queries",
        _hdf5_bytes(10_000, 100, 128),
        {"local": Source("SRC/siftsmall: base .npy (uint8), query .fvecs, groundtruth .ivecs", [], "none",
                         _local(convert_siftsmall))}, "local"),
    "bigann10k": DatasetSpec(
        "bigann10k", "10k BIGANN/SIFT1B uint8 vectors, queries = base[0:100] (local)", "l2",
        "10,000 x 128, 100 queries", _hdf5_bytes(10_000, 100, 128),
        {"local": Source("SRC/bigann10k: base/query/groundtruth .npy", [], "none", _local(convert_bigann10k))},
        "local"),
    "mnist": DatasetSpec(
        "mnist", "MNIST: train 60k as base, t10k as queries, L2 (local)", "l2", "60,000 x 784, 10,000 queries",
        _hdf5_bytes(60_000, 10_000, 784),
        {"local": Source("SRC/mnist: IDX .gz files; GT top-100 computed", [], "none", _local(convert_mnist))},
        "local"),
    "glove-6b-50d": DatasetSpec(
        "glove-6b-50d", f"GloVe 6B 50d, {GLOVE6B_N_QUERIES:,} rows held out as queries (seed {GLOVE6B_SEED}), "
        "angular (local)", "angular", "390,000 x 50, 10,000 queries", _hdf5_bytes(390_000, 10_000, 50),
        {"local": Source("SRC/glove-6b-50d/glove_6B_50d.f32.npy; GT top-100 computed", [], "none",
                         _local(convert_glove6b))}, "local"),
}


def list_datasets(stream=None) -> None:
    stream = stream or sys.stdout
    for spec in DATASETS.values():
        print(f"{spec.name:<14} {spec.description}", file=stream)
        print(f"{'':<14} metric {spec.metric}, base {spec.shape}; output ~{_fmt_bytes(spec.out_bytes)}",
              file=stream)
        for sname, src in spec.sources.items():
            default = " (default)" if sname == spec.default_source else ""
            print(f"{'':<14} --source {sname}{default}: {src.description}; download {src.download_bytes}",
                  file=stream)
            for url in src.urls:
                print(f"{'':<16} {url}", file=stream)
        print(file=stream)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_sha(items):
    out = {}
    for item in items or []:
        name, sep, hexd = item.partition("=")
        if not sep or len(hexd) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexd):
            raise argparse.ArgumentTypeError(f"--sha256 expects FILENAME=<64 hex digits>, got {item!r}")
        out[name] = hexd.lower()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_scripts.prepare",
        description="Download, verify and convert ANN data sets to OUT/NAME.hdf5 (ann-benchmarks layout).",
        epilog="Then: python -m bench_ann.sweep --dataset OUT/NAME.hdf5 --K 1024")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="data set to prepare")
    p.add_argument("--list", action="store_true", help="list data sets, sources, URLs and sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("FLASHGMM_DATA", "data")),
                   help="output directory (default: $FLASHGMM_DATA or ./data)")
    p.add_argument("--source", help="where to get it from (see --list); default per data set")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC,
                   help=f"directory of the local real data (default {DEFAULT_SRC})")
    p.add_argument("--cache", type=Path, help="where raw downloads are kept (default OUT/downloads)")
    p.add_argument("--name", help="output file stem (default: the data set name)")
    p.add_argument("--gt", help="deep10m: big-ann GT_10M ground-truth file (path or URL), e.g. " + DEEP_GT_10M_URL)
    p.add_argument("--url", help="override the (main) download URL, e.g. a mirror")
    p.add_argument("--sha256", action="append", metavar="FILENAME=HEX",
                   help="expected sha256 of a downloaded file (repeatable)")
    p.add_argument("--check-queries", type=int, default=10,
                   help="queries whose shipped ground truth is re-checked by brute force (default 10; 0 = off)")
    p.add_argument("--retries", type=int, default=5, help="download retries (default 5)")
    p.add_argument("--no-verify", action="store_true",
                   help="local sets: skip checksums and expected shapes (for other copies of the files)")
    p.add_argument("--force", action="store_true", help="overwrite OUT/NAME.hdf5 if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def prepare(args) -> Path:
    spec = DATASETS[args.dataset]
    source = args.source or spec.default_source
    if source not in spec.sources:
        raise SystemExit(f"error: --source {source!r} is not available for {spec.name}; "
                         f"choose from {sorted(spec.sources)}")
    if args.gt and spec.name != "deep10m":
        raise SystemExit("error: --gt only applies to --dataset deep10m")
    src = spec.sources[source]
    out_dir = Path(args.out)
    out_path = out_dir / f"{args.name or src.out_name or spec.name}.hdf5"
    if out_path.exists() and not args.force:
        _log(f"{out_path} already exists (use --force to rebuild)")
        return out_path
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out_dir / "downloads"
    if src.urls:
        cache.mkdir(parents=True, exist_ok=True)
    _log(f"preparing {spec.name} from {source} -> {out_path}")
    t0 = time.time()
    path = src.run(args, out_path, cache)
    _log(f"{spec.name}: {path} ready in {time.time() - t0:.1f} s")
    return path


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.sha256 = _parse_sha(args.sha256)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.check_queries is not None and args.check_queries <= 0:
        args.check_queries = 0
    if args.list:
        list_datasets()
        return 0
    if not args.dataset:
        parser.error("--dataset is required (or --list)")
    try:
        prepare(args)
    except (DownloadError, ChecksumError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume the download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
