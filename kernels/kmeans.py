"""Fused k-means step (the GMM warm start): online argmin assignment plus a contention-free update.

What it computes
----------------
The contract of ``flashgmm_faiss._torch_backend.kmeans_step`` for one chunk ``x`` (n, D) and centroids
(K, D): ``labels_i = argmin_k ||x_i - c_k||^2``, ``min_sq_dist_i`` (clamped at 0), ``counts_k`` and
``sums_k = sum_{i: labels_i = k} x_i``.

Assignment (``_kmeans_assign_kernel``): split over rows; a program keeps its BLOCK_M x D tile of X on chip,
streams the centroids in BLOCK_K blocks, and keeps a running (min, argmin) of ``||c||^2 - 2 x.c``; no n x K
matrix exists.

Update: rows are ordered by label with a stable sort (int16 keys when K < 32767), which makes the update a
segmented sum. ``_segment_sum_kernel`` cuts the sorted order into equal ranges of ``segment_rows(n)`` rows, one
program each, whatever the cluster sizes; a program sums each cluster's rows within its range in a fixed order
into fp32 registers and writes one slot per (program p, cluster c) at row ``p + c`` of a (P + K, D) buffer
(unique: a later program starts at or after this one's last cluster). ``_segment_reduce_kernel`` sums a cluster's
slots in program order. No float atomics (the counts are differences of the sorted labels' offsets) and no host
sync, so the result is bitwise reproducible and the step can be queued behind the previous one.

Cost: one GEMM of ``2 n K D`` FLOPs; bytes: X twice (the assignment, then the gathered rows: ``8 n D``),
plus the sort of n labels and ``~16 n`` bytes of labels/permutation traffic; extra memory ``O(n + (P + K) D)``
with P <= ``SEGMENT_PROGRAMS_PER_SM`` x the SM count.

Precision: the distances use the same GEMM modes as the E-step (``"tf32"``: one fp16 product of
tf32-precision operands with power-of-two scaling; ``"bf16"``, ``"bf16x3"``, ``"ieee"``), with ||c||^2 formed from
the rounded centroids so that the distances are exact for the represented values. With the reduced modes a
near-tie between two centroids may resolve differently from float64; the sums are exact fp32 sums of the
assigned (centred) rows.

Caveats: D <= 256. No host sync (the update's ranges depend on n and the SM count only). Tested on: the
CPU interpreter at tiny odd shapes, an NVIDIA H200 (earlier versions) and an NVIDIA H100 at n=3e5..1e8,
K=1000..4096, D=96..128 (bitwise-identical reruns; ``tests/test_kernels.py``). Measured (H100, n=1e6, K=1024,
D=128, "tf32"): 1.08 ms per step, 1.01 ms replayed as a CUDA graph, of which the assignment is 0.81 ms; 1.10 ms per
k-means iteration inside ``GaussianMixture.fit`` (``bench_ann/results/v14_kmeans_update/``). A software-pipelined
assignment loop (as pass 1 of the E-step) measured the same and was dropped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import (_MODES, _check_launch, _check_precision, _distance_operands, _dot3, _interpret, _load_rows,
                    _means_scale, _prune_row, _row_block, _row_configs, _row_operands, _sm_count, absmax)


@triton.autotune(configs=_row_configs(), key=["K", "D", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _kmeans_assign_kernel(
    # pointers: data and centre, centroids in operand form (-2 c, scaled), their squared norms; outputs
    X, CENTER, C, C_LO, C2,
    LABELS, MIN_DIST,
    # [operand scale, 1 / distance unit] (device scalars), sizes
    SCALES, N, K,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CENTER: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    x = _load_rows(X, CENTER, offs_m, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, _qh, _ql, x2 = _row_operands(x, tl.load(SCALES), 1.0, False, MODE, EMU)

    # running minimum per (row, column slot) across the component blocks: elementwise compare/select only,
    # one cross-column reduction at the end (an argmin per block costs shuffles on every block)
    cols = tl.arange(0, BLOCK_K)
    best_v = tl.full([BLOCK_M, BLOCK_K], float("inf"), tl.float32)
    best_k = tl.zeros([BLOCK_M, BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        t_ptrs = offs_d[:, None] + offs_k[None, :] * D
        if EVEN_K:
            t_mask = mask_d[:, None]
            c2 = tl.load(C2 + offs_k)
        else:
            t_mask = mask_d[:, None] & mask_k[None, :]
            c2 = tl.load(C2 + offs_k, mask=mask_k, other=float("inf"))
        c_t = tl.load(C + t_ptrs, mask=t_mask, other=0.0)
        if MODE == 3:
            c_lo_t = tl.load(C_LO + t_ptrs, mask=t_mask, other=0.0)
        else:
            c_lo_t = c_t
        # ||x - c||^2 - ||x||^2, accumulated onto ||c||^2 (C holds -2 c)
        s = _dot3(xh, xl, c_t, c_lo_t, tl.zeros([BLOCK_M, BLOCK_K], tl.float32) + c2[None, :], MODE, EMU)
        better = s < best_v                                   # strict: the first minimum wins, as torch.min
        best_v = tl.where(better, s, best_v)
        best_k = tl.where(better, k0, best_k)
    v_min = tl.min(best_v, axis=1)
    k_all = best_k + cols[None, :]
    # among the slots holding the minimum, the smallest component index (ties resolved as torch.min)
    best = tl.min(tl.where(best_v == v_min[:, None], k_all, 2147483647), axis=1)
    tl.store(LABELS + offs_m, best.to(tl.int64), mask=mask_m)
    tl.store(MIN_DIST + offs_m, tl.maximum(x2 + v_min, 0.0) * tl.load(SCALES + 1), mask=mask_m)


@triton.jit
def _segment_sum_kernel(
    # pointers: data and centre, rows sorted by label, the sorted labels, cluster offsets into the sorted order
    # (K + 1), output slots (P + K, D)
    X, CENTER, PERM, SORTED_LABELS, OFFSETS, OUT,
    # sizes: program p sums the sorted rows [p ROWS, (p + 1) ROWS)
    N, ROWS,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_M: tl.constexpr,
):
    p = tl.program_id(0)
    lo = p.to(tl.int64) * ROWS
    hi = tl.minimum(lo + ROWS, N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    c_first = tl.load(SORTED_LABELS + lo).to(tl.int32)
    c_last = tl.load(SORTED_LABELS + hi - 1).to(tl.int32)
    # one fp32 sum per cluster that meets the range, in the sorted order; its slot p + c is unique because a later
    # program starts at or after this one's last cluster
    for c in range(c_first, c_last + 1):
        s_lo = tl.maximum(tl.load(OFFSETS + c).to(tl.int64), lo)
        s_hi = tl.minimum(tl.load(OFFSETS + c + 1).to(tl.int64), hi)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for m0 in range(s_lo, s_hi, BLOCK_M):
            offs = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs < s_hi
            rows = tl.load(PERM + offs, mask=mask_m, other=0)
            acc += _load_rows(X, CENTER, rows, mask_m, offs_d, mask_d, D, HAS_CENTER)
        tl.store(OUT + (p + c).to(tl.int64) * D + offs_d, tl.sum(acc, axis=0), mask=mask_d)


@triton.jit
def _segment_reduce_kernel(
    # pointers: the slots of _segment_sum_kernel (P + K, D), cluster offsets (K + 1), sums (K, D)
    SLOTS, OFFSETS, SUMS,
    # sizes
    ROWS,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    o_lo = tl.load(OFFSETS + c).to(tl.int64)
    o_hi = tl.load(OFFSETS + c + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    # the programs whose ranges meet cluster c, in order (none for an empty cluster, whose slots were never
    # written): a fixed summation order
    p_end = tl.where(o_hi > o_lo, (o_hi - 1) // ROWS + 1, o_lo // ROWS)
    for p in range(o_lo // ROWS, p_end):
        acc += tl.load(SLOTS + (p + c) * D + offs_d, mask=mask_d, other=0.0)
    tl.store(SUMS + c.to(tl.int64) * D + offs_d, acc, mask=mask_d)


# update launch: rows per gathered tile, warps and pipeline stages per program, programs per SM
SEGMENT_BLOCK_M, SEGMENT_WARPS, SEGMENT_STAGES, SEGMENT_PROGRAMS_PER_SM = 64, 8, 1, 8


def _slot_buffer(rows: int, d: int, device) -> torch.Tensor:
    """The update's (P + K, D) slots, uninitialised: only the slots some program writes are read (tests poison
    them)."""
    return torch.empty((rows, d), dtype=torch.float32, device=device)


def segment_rows(n: int, device) -> int:
    """Sorted rows per program of the update: ``SEGMENT_PROGRAMS_PER_SM`` programs per SM (the gathers are
    latency-bound: many programs in flight hide it), at least 256 rows each. Every program gets the same number of
    rows whatever the cluster sizes (a cluster of many times the mean size used to be the tail). A function of n and
    the device only, so reruns are bitwise identical."""
    return int(max(256, triton.cdiv(n, SEGMENT_PROGRAMS_PER_SM * _sm_count(device))))


def _check(x, centroids, precision, center):
    _check_precision(precision)
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim != 2:
            raise TypeError(f"{name} must be a 2-D float32 torch.Tensor")
    n, d = x.shape
    k = centroids.shape[0]
    if centroids.shape[1] != d:
        raise ValueError(f"centroids have {centroids.shape[1]} features but x has {d}")
    if centroids.device != x.device:
        raise ValueError("x and centroids must be on the same device")
    if center is not None and (not isinstance(center, torch.Tensor) or center.dtype != torch.float32
                               or center.shape != (d,) or center.device != x.device):
        raise ValueError(f"center must be a float32 tensor of shape ({d},) on {x.device}")
    _check_launch(x)
    return n, d, k


def assign_labels(x, centroids, precision="tf32", center=None, x_absmax=None):
    """Nearest centroid of every row: ``(labels (n,) int64, min_sq_dist (n,) float32)``; arguments as
    :func:`kmeans_step`. One pass over x, no n x K matrix, no host sync."""
    n, d, k = _check(x, centroids, precision, center)
    mode = _MODES[precision]
    c64 = centroids.double()
    if mode == 1 and x_absmax is None:
        x_absmax = absmax(x, center)
    s = _means_scale(c64, x_absmax, mode)              # device scalar: no host sync
    c, c_lo, c2 = _distance_operands(c64, s, mode)     # ||c~||^2 of what C represents in the 16-bit modes
    c2 = c2.float()
    scales = torch.stack([s, 1.0 / (s * s)]).float()
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    min_dist = torch.empty(n, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _kmeans_assign_kernel[grid](x, x if center is None else center, c, c_lo, c2, labels, min_dist, scales, n, k,
                                D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_CENTER=center is not None,
                                MODE=mode, EMU=_interpret())
    return labels, min_dist


def kmeans_step(x, centroids, precision="tf32", center=None, x_absmax=None):
    """One k-means step over a chunk.

    Parameters
    ----------
    x : (n, D) float32, contiguous; centroids : (K, D) float32 (in the centred frame when ``center`` is given)
    precision : {"tf32", "bf16", "bf16x3", "ieee"}; center : (D,) float32 or None (subtracted in the kernels)
    x_absmax : float or None, an upper bound of ``|x - center|`` (fp16 operand scale; computed when None)

    Returns
    -------
    ``(labels (n,) int64, min_sq_dist (n,) float32, counts (K,) float32, sums (K, D) float32)``, sums of the
    centred rows.
    """
    labels, min_dist = assign_labels(x, centroids, precision, center, x_absmax)     # checks the inputs
    n, d = x.shape
    k = centroids.shape[0]

    # update: a stable sort by label makes it a segmented sum (int16 keys when K allows: half the radix passes of
    # int32); the cluster offsets come from a search in the sorted labels (bincount would sync with the host)
    key = torch.int16 if k < 2 ** 15 - 1 else torch.int32
    sorted_labels, perm = torch.sort(labels.to(key), stable=True)
    offsets = torch.searchsorted(sorted_labels, torch.arange(k + 1, dtype=key, device=x.device), out_int32=True)
    counts = (offsets[1:] - offsets[:-1]).to(torch.float32)
    sums = torch.empty((k, d), dtype=torch.float32, device=x.device)
    if n == 0:
        return labels, min_dist, counts, sums.zero_()
    rows = segment_rows(n, x.device)
    programs = triton.cdiv(n, rows)
    slots = _slot_buffer(programs + k, d, x.device)
    block_d = max(16, triton.next_power_of_2(d))
    _segment_sum_kernel[(programs,)](x, x if center is None else center, perm, sorted_labels, offsets, slots, n,
                                     rows, D=d, BLOCK_D=block_d, HAS_CENTER=center is not None,
                                     BLOCK_M=16 if _interpret() else SEGMENT_BLOCK_M, num_warps=SEGMENT_WARPS,
                                     num_stages=SEGMENT_STAGES)
    _segment_reduce_kernel[(k,)](slots, offsets, sums, rows, D=d, BLOCK_D=block_d, num_warps=1)
    return labels, min_dist, counts, sums
