"""The k-means++ seeding step on the device: the distance update ``d2 = min(d2, ||x_i - x_s||^2)`` in one pass
over the sample, and the draw of the next seed.

What it computes
----------------
For the sample x (n, D) float32, the index s (1,) int64 of the newest seed (on the device, so that the seeding
loop never reads it on the host and can be replayed as a CUDA graph) and the running squared distances d2 (n,)
float64 to the nearest seed so far: ``d2_i <- min(d2_i, sum_j (x_ij - x_sj)^2)``, in place. Each row's sum runs
in fp32 over the differences (exact zeros for rows equal to the seed, which k-means++ must never draw again) and
is stored in float64, as the torch path (``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``,
squared) does.

Why a kernel: torch's ``cdist`` over a (51,200 x 128) sample against one row, squared, converted and min-ed, took
~100 of the ~105 us of a seeding step replayed as a CUDA graph on an H100 (K=1024: 0.1 s, most of a fit's set-up
time at N=1e6); this pass reads the sample once (26 MB) and writes d2.

The draw (:func:`draw_seed_`): with ``block_sums`` the update also writes the float64 sum of d2 over each tile of
``BLOCK_M`` rows, and one program then draws the next seed by inverse CDF without torch's cumulative sum and
search (two kernels per seed instead of six): the total over the tile sums, ``target = u_j * total``, the first
tile whose running sum exceeds the target, then the first row of that tile whose running sum exceeds what is left.
It only picks rows with d2 > 0 while the total is positive (rounding can never make it draw a row at distance
0: the tile and the row must both have positive mass, else the last tile and row with positive mass are taken),
and row n - 1 when every distance is 0 (as ``searchsorted`` clamped to n - 1 does). In exact arithmetic this is
the torch path's row (the first with cumulative d2 > u_j * total); the sums are associated differently, so a
draw within ~1e-16 relative of a boundary may differ. The seed counter j, the seeds and the newest seed's index
live on the device, so the loop can be replayed as a CUDA graph. Reference: :func:`draw_seed_reference`.

Caveats: x contiguous float32, d2 contiguous float64, both on the GPU (or the CPU under ``TRITON_INTERPRET=1``);
NaN handling is not defined (the estimator checks finiteness first). Reference of the update:
:func:`min_sq_dist_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import _check_kernel_device, _interpret

BLOCK_M = 64
BLOCK_D = 64


DRAW_CHUNK = 1024      # tile sums per iteration of the draw program


PRUNE_FACTOR = 4.0625   # skip a row when ||s - c||^2 >= PRUNE_FACTOR d2 (4 = the triangle inequality, + margin)


@triton.jit
def _sq_dists_to_row(X, idx, mask, seed, D, BLOCK_D: tl.constexpr):
    """fp32 ``sum_j (x_ij - x_seed,j)^2`` for the rows idx (B,) of X (n, D) where mask (B,) holds, 0 elsewhere (the
    other rows are not read)."""
    acc = tl.zeros(idx.shape, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(X + idx[:, None] * D + cols[None, :], mask=mask[:, None] & cmask[None, :], other=0.0)
        r = tl.load(X + seed * D + cols, mask=cmask, other=0.0)
        diff = x - r[None, :]
        acc += tl.sum(diff * diff, axis=1)
    return acc


@triton.jit
def _min_sq_dist_kernel(X, S, D2, BSUM, NEAREST, GAPS, J, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        WRITE_BSUM: tl.constexpr, PRUNE: tl.constexpr, PRUNE_FACTOR: tl.constexpr):
    """Program p: rows [p BLOCK_M, (p + 1) BLOCK_M): d2 = min(d2, ||x - x_s||^2), the sum in fp32; with
    WRITE_BSUM, BSUM[p] = the float64 sum of the updated d2 over these rows. With PRUNE, a row whose nearest seed
    c = NEAREST[row] has GAPS[c] = ||x_s - c||^2 >= PRUNE_FACTOR d2 is not read (it cannot get closer to s), and a
    row that gets closer takes NEAREST = J[0] - 1 (the new seed's index)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    old = tl.load(D2 + rows, mask=rmask, other=0.0)
    if PRUNE:
        near = tl.load(NEAREST + rows, mask=rmask, other=0)
        gap = tl.load(GAPS + near, mask=rmask, other=0.0)
        need = rmask & ((gap < PRUNE_FACTOR * old) | (gap != gap))     # d2 = +inf and NaN gaps (unset) are read
    else:
        need = rmask
    dist = _sq_dists_to_row(X, rows, need, tl.load(S).to(tl.int64), D, BLOCK_D).to(tl.float64)
    new = tl.where(need, tl.minimum(old, dist), old)
    tl.store(D2 + rows, new, mask=need)
    if PRUNE:
        tl.store(NEAREST + rows, (tl.load(J) - 1).to(tl.int32), mask=need & (dist < old))
    if WRITE_BSUM:
        tl.store(BSUM + tl.program_id(0), tl.sum(tl.where(rmask, new, 0.0), axis=0))


@triton.jit
def _seed_gaps_kernel(X, SEEDS, J, S, GAPS, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p: seeds [p BLOCK_K, (p + 1) BLOCK_K) below J[0]: GAPS[k] = ||x_s - x_seeds[k]||^2 (fp32 sum of
    differences, stored in float64); later seeds are not read."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < tl.load(J)
    sid = tl.load(SEEDS + ks, mask=kmask, other=0).to(tl.int64)
    acc = _sq_dists_to_row(X, sid, kmask, tl.load(S).to(tl.int64), D, BLOCK_D)
    tl.store(GAPS + ks, acc.to(tl.float64), mask=kmask)


@triton.jit
def _draw_seed_kernel(BSUM, D2, U, J, SEEDS, LAST, NB, N, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program: j = J[0]; draws the row of the next seed from d2 by inverse CDF against U[j] times the total
    (tile sums BSUM (NB,), then the rows of one tile), stores it to SEEDS[j] and LAST[0], and sets J[0] = j + 1."""
    j = tl.load(J)
    total = tl.zeros((), dtype=tl.float64)
    for c0 in range(0, NB, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        total += tl.sum(tl.load(BSUM + idx, mask=idx < NB, other=0.0), axis=0)
    target = tl.load(U + j) * total
    # the first tile with running sum > target and positive mass (and the tile sums before it); the last tile
    # with positive mass in case rounding leaves the target at or beyond every running sum
    run = tl.zeros((), dtype=tl.float64)
    found = NB
    before = tl.zeros((), dtype=tl.float64)
    last = -1
    for c0 in range(0, NB, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        b = tl.load(BSUM + idx, mask=idx < NB, other=0.0)
        cs = run + tl.cumsum(b, axis=0)
        first = tl.min(tl.where((cs > target) & (b > 0), idx, NB), axis=0)
        pre = tl.sum(tl.where(idx == first, cs - b, 0.0), axis=0)
        before = tl.where(first < found, pre, before)
        found = tl.minimum(found, first)
        last = tl.maximum(last, tl.max(tl.where(b > 0, idx, -1), axis=0))
        run = tl.sum(b, axis=0) + run
    hit = found < NB
    tile = tl.where(hit, found, tl.maximum(last, 0))
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.load(D2 + rows, mask=rows < N, other=0.0)
    cs = tl.cumsum(d, axis=0)
    first_row = tl.min(tl.where((cs > target - before) & (d > 0), rows, N), axis=0)
    last_row = tl.max(tl.where(d > 0, rows, -1), axis=0)
    row = tl.where(hit & (first_row < N), first_row, last_row)
    row = tl.where(last >= 0, row, N - 1)           # every distance 0: the last row, as searchsorted clamped
    tl.store(SEEDS + j, row.to(tl.int64))
    tl.store(LAST, row.to(tl.int64))
    tl.store(J, j + 1)


def min_sq_dist_reference(d2: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Float64 reference of :func:`min_sq_dist_`: returns ``min(d2, ||x - x[s]||^2)`` (n,) without changing d2."""
    x64 = x.double()
    return torch.minimum(d2, (x64 - x64[s.reshape(-1)[0]]).square().sum(1))


def draw_seed_reference(d2: torch.Tensor, u: float) -> int:
    """Float64 reference of :func:`draw_seed_`'s row: the first row whose cumulative d2 exceeds u times the total
    (exact rational arithmetic over the float64 values), n - 1 when the total is 0."""
    from fractions import Fraction
    vals = [Fraction(float(v)) for v in d2.double().cpu().tolist()]
    target = Fraction(float(u)) * sum(vals)
    run = Fraction(0)
    for i, v in enumerate(vals):
        run += v
        if run > target:
            return i
    return len(vals) - 1


def block_sums_size(n: int) -> int:
    """Length of the ``block_sums`` buffer that :func:`min_sq_dist_` fills for a sample of n rows."""
    return triton.cdiv(n, _block_m())


def _block_m() -> int:
    return 16 if _interpret() else BLOCK_M


def min_sq_dist_(d2: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                 block_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Update the squared distances to the nearest seed with a new seed, in place (no host sync).

    Parameters
    ----------
    d2 : (n,) float64, contiguous: squared distances to the nearest seed so far (+inf before the first seed)
    x : (n, D) float32, contiguous, on d2's device: the sample
    s : (1,) int64 on the device: the new seed's row in x (0 <= s < n, not checked on the device)
    block_sums : optional (block_sums_size(n),) float64 on the device: receives the sum of the updated d2 over
        each tile of rows, for :func:`draw_seed_`

    Returns
    -------
    d2, updated: ``min(d2, ||x - x[s]||^2)``
    """
    _check_update(d2, x, s, block_sums)
    return _launch_update(d2, x, s, block_sums)


def _check_one_int64(name: str, t) -> None:
    """A device counter or row index: an int64 tensor of one element."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1:
        raise TypeError(f"{name} must be an int64 tensor of one element")


def _check_update(d2, x, s, block_sums) -> None:
    """The argument checks of :func:`min_sq_dist_` (block_sums None or the tile sums' buffer)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2:
        raise TypeError("x must be a 2-D float32 torch.Tensor")
    n = x.shape[0]
    if not isinstance(d2, torch.Tensor) or d2.dtype != torch.float64 or d2.shape != (n,):
        raise TypeError(f"d2 must be a float64 tensor of shape ({n},)")
    _check_one_int64("s", s)
    if not (x.is_contiguous() and d2.is_contiguous()):
        raise ValueError("x and d2 must be contiguous: call .contiguous() first")
    if not (x.device == d2.device == s.device):
        raise ValueError(f"x, d2 and s must be on one device (got {x.device}, {d2.device}, {s.device})")
    _check_kernel_device(x.device)
    if block_sums is not None:
        _check_block_sums(block_sums, n, d2.device)


def _launch_update(d2, x, s, block_sums, pruning=None):
    """Launches the update on checked arguments; ``pruning`` = (nearest, gaps, j) or None."""
    n, d = x.shape
    if n == 0:
        return d2
    nearest, gaps, j = pruning if pruning is not None else (s, d2, s)     # placeholders, not read
    block_m = _block_m()
    _min_sq_dist_kernel[(triton.cdiv(n, block_m),)](x, s, d2, d2 if block_sums is None else block_sums, nearest,
                                                     gaps, j, n, d, BLOCK_M=block_m, BLOCK_D=_block_d(d),
                                                     WRITE_BSUM=block_sums is not None, PRUNE=pruning is not None,
                                                     PRUNE_FACTOR=PRUNE_FACTOR, num_warps=4)
    return d2


def _block_d(d: int) -> int:
    """The feature block of the row-distance kernels for D = d."""
    return min(BLOCK_D, max(16, triton.next_power_of_2(d)))


def pruned_min_sq_dist_(d2: torch.Tensor, x: torch.Tensor, s: torch.Tensor, block_sums: torch.Tensor,
                        nearest: torch.Tensor, gaps: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """:func:`min_sq_dist_` that reads only the rows the new seed may bring closer (no host sync).

    A row whose nearest seed c has ``||x_s - c||^2 >= PRUNE_FACTOR * d2`` keeps its d2 unread: by the triangle
    inequality its distance to s is at least sqrt(d2) (PRUNE_FACTOR = 4 + a margin far above fp32 rounding), so
    the result equals the unpruned update's bit for bit. The rows read are those of the Voronoi cells whose seed
    lies near s; they shrink as the seeds outnumber the data's clusters.

    Parameters
    ----------
    d2, x, s, block_sums : as in :func:`min_sq_dist_` (block_sums required)
    nearest : (n,) int32: each row's nearest seed so far (an index into the seeds); rows that get closer to s
        take j[0] - 1. Any values while d2 is +inf (before the first seed).
    gaps : (K,) float64: ``||x_s - x_seeds[k]||^2`` for the seeds k < j[0] (:func:`seed_gaps_`)
    j : (1,) int64: the number of seeds so far, s included (s is seed j[0] - 1)

    Returns
    -------
    d2, updated
    """
    if not isinstance(nearest, torch.Tensor) or nearest.dtype != torch.int32 or nearest.shape != d2.shape:
        raise TypeError(f"nearest must be an int32 tensor of d2's shape {tuple(d2.shape)}")
    if not isinstance(gaps, torch.Tensor) or gaps.dtype != torch.float64 or gaps.ndim != 1:
        raise TypeError("gaps must be a 1-D float64 tensor (one entry per seed)")
    _check_one_int64("j", j)
    _check_update(d2, x, s, block_sums)
    if block_sums is None:
        raise TypeError("block_sums is required: a float64 tensor of shape (block_sums_size(n),)")
    if not (nearest.is_contiguous() and gaps.is_contiguous()) or len({nearest.device, gaps.device, j.device,
                                                                       d2.device}) != 1:
        raise ValueError(f"nearest and gaps must be contiguous and, with j, on {d2.device}")
    return _launch_update(d2, x, s, block_sums, (nearest, gaps, j))


def seed_gaps_(gaps: torch.Tensor, x: torch.Tensor, seeds: torch.Tensor, j: torch.Tensor,
               s: torch.Tensor) -> torch.Tensor:
    """``gaps[k] = ||x_s - x_seeds[k]||^2`` for k < j[0], in place on the device (no host sync); later entries
    are left as they are.

    Parameters
    ----------
    gaps : (K,) float64, contiguous
    x : (n, D) float32, contiguous: the sample
    seeds : (K,) int64: the seeds' rows in x
    j : (1,) int64: how many seeds are set
    s : (1,) int64: the new seed's row
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or not x.is_contiguous():
        raise TypeError("x must be a contiguous 2-D float32 torch.Tensor")
    if not isinstance(gaps, torch.Tensor) or gaps.dtype != torch.float64 or not gaps.is_contiguous():
        raise TypeError("gaps must be a contiguous float64 tensor")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != gaps.shape:
        raise TypeError(f"seeds must be an int64 tensor of gaps' shape {tuple(gaps.shape)}")
    _check_one_int64("j", j)
    _check_one_int64("s", s)
    if len({gaps.device, x.device, seeds.device, j.device, s.device}) != 1:
        raise ValueError("gaps, x, seeds, j and s must be on one device")
    _check_kernel_device(x.device)
    k, d = gaps.numel(), x.shape[1]
    if k == 0:
        return gaps
    block_k = 16 if _interpret() else 64
    _seed_gaps_kernel[(triton.cdiv(k, block_k),)](x, seeds, j, s, gaps, d, BLOCK_K=block_k, BLOCK_D=_block_d(d),
                                                   num_warps=4)
    return gaps


def _check_block_sums(block_sums, n: int, device) -> None:
    want = block_sums_size(n)
    if not isinstance(block_sums, torch.Tensor) or block_sums.dtype != torch.float64 or block_sums.shape != (want,):
        raise TypeError(f"block_sums must be a float64 tensor of shape ({want},) (block_sums_size(n))")
    if not block_sums.is_contiguous() or block_sums.device != device:
        raise ValueError(f"block_sums must be contiguous and on {device}")


def draw_seed_(seeds: torch.Tensor, j: torch.Tensor, last: torch.Tensor, u: torch.Tensor, d2: torch.Tensor,
               block_sums: torch.Tensor) -> torch.Tensor:
    """Draw the next k-means++ seed on the device (no host sync): ``seeds[j] = last[0] = row; j += 1``.

    Parameters
    ----------
    seeds : (K,) int64: the seeds' rows; entry j is written (j < K, not checked on the device)
    j : (1,) int64: the index of the seed to draw, incremented
    last : (1,) int64: receives the drawn row (the ``s`` of the next :func:`min_sq_dist_`)
    u : (K,) float64: one uniform in [0, 1) per seed; u[j] is used
    d2 : (n,) float64, contiguous: squared distances to the nearest seed
    block_sums : (block_sums_size(n),) float64: d2's tile sums, as written by the last :func:`min_sq_dist_`

    Returns
    -------
    seeds
    """
    for name, t, dtype in (("seeds", seeds, torch.int64), ("j", j, torch.int64), ("last", last, torch.int64),
                           ("u", u, torch.float64), ("d2", d2, torch.float64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.ndim != 1 or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous 1-D {dtype} tensor")
    if j.numel() != 1 or last.numel() != 1:
        raise TypeError("j and last must hold one element each")
    if u.numel() < seeds.numel():
        raise ValueError(f"u needs one uniform per seed: {u.numel()} < {seeds.numel()}")
    n = d2.numel()
    if n == 0:
        raise ValueError("d2 is empty: there are no rows to draw a seed from")
    _check_block_sums(block_sums, n, d2.device)
    if len({t.device for t in (seeds, j, last, u, d2)}) != 1:
        raise ValueError("seeds, j, last, u, d2 and block_sums must be on one device")
    _check_kernel_device(d2.device)
    nb = block_sums.numel()
    chunk = min(DRAW_CHUNK, max(16, triton.next_power_of_2(nb)))
    _draw_seed_kernel[(1,)](block_sums, d2, u, j, seeds, last, nb, n, BLOCK_M=_block_m(), CHUNK=chunk,
                            num_warps=4)
    return seeds
