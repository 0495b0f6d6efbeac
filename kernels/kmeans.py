"""Fused k-means step (the GMM warm start): online argmin assignment plus a contention-free update.

What it computes
----------------
The contract of ``flashgmm_faiss._torch_backend.kmeans_step`` for one chunk ``x`` (n, D) and centroids
(K, D): ``labels_i = argmin_k ||x_i - c_k||^2``, ``min_sq_dist_i`` (clamped at 0), ``counts_k`` and
``sums_k = sum_{i: labels_i = k} x_i``.

Assignment (``_kmeans_assign_kernel``): split over rows; a program keeps its BLOCK_M x D tile of X on chip,
streams the centroids in BLOCK_K blocks, and keeps a running (min, argmin) of ``||c||^2 - 2 x.c``; no n x K
matrix exists.

Update: rows are ordered by label with a stable sort (``torch.argsort``), which makes the update a segmented
sum. ``_segment_sum_kernel`` gives each (cluster, piece) one program that sums its rows in a fixed order into
fp32 registers; pieces are at most ``ceil(max_count / SPLIT)`` rows long so that a huge cluster does not
serialise on one SM, and the SPLIT partials are summed in a fixed order. No atomics at all (the counts come
from an integer ``bincount``), so the result is bitwise reproducible.

Cost: one GEMM of ``2 n K D`` FLOPs; bytes: X twice (the assignment, then the gathered rows: ``8 n D``),
plus the sort of n int64 labels and ``16 n`` bytes of labels/permutation traffic; extra memory
``O(n + SPLIT K D)``.

Precision: the distances use the same GEMM modes as the E-step (``"tf32"``: split-bf16 products, ~16 bits
per operand; ``"tf32-mma"``, ``"bf16"``, ``"ieee"``). With the reduced modes a near-tie between two centroids may resolve differently from
float64; the sums are exact fp32 sums of the assigned rows.

Caveats: D <= 256; one host sync per call (the largest cluster sizes the pieces). Tested on: the CPU
interpreter at tiny odd shapes and an NVIDIA H200 at n=1e6..1e8, K=1000..4096, D=96..128 (bitwise-identical
reruns; ``tests/test_kernels.py``). Measured (H200, n=1e6, K=1024, D=128): 2.38 ms per step in "tf32" (see
``kernels/NOTES.md``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import MAX_D, PRECISIONS, _MODES, _dot3, _hi, _interpret, _lo, _prune_row, _row_configs, as_operand


@triton.autotune(configs=_row_configs(), key=["K", "D", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _kmeans_assign_kernel(
    # pointers: data, centroids, their squared norms; outputs
    X, C, C_LO, C2,
    LABELS, MIN_DIST,
    # sizes
    N, K,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(X + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    x2 = tl.sum(x * x, axis=1)
    xh = _hi(x, MODE, EMU)
    xl = _lo(x, xh, MODE, EMU)

    best_v = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_k = tl.zeros([BLOCK_M], tl.int32)
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
        s = c2[None, :] - 2.0 * _dot3(xh, xl, c_t, c_lo_t, tl.zeros([BLOCK_M, BLOCK_K], tl.float32), MODE, EMU)   # ||x - c||^2 - ||x||^2
        s_min = tl.min(s, axis=1)
        s_arg = tl.argmin(s, axis=1) + k0
        better = s_min < best_v                               # strict: the first minimum wins, as torch.min
        best_k = tl.where(better, s_arg, best_k)
        best_v = tl.where(better, s_min, best_v)
    tl.store(LABELS + offs_m, best_k.to(tl.int64), mask=mask_m)
    tl.store(MIN_DIST + offs_m, tl.maximum(x2 + best_v, 0.0), mask=mask_m)


@triton.jit
def _segment_sum_kernel(
    # pointers: data, rows sorted by label, cluster offsets into the sorted order (K + 1), output (SPLIT, K, D)
    X, PERM, OFFSETS, OUT,
    # sizes
    K, PIECE,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    k = tl.program_id(0)
    piece = tl.program_id(1)
    seg_lo = tl.load(OFFSETS + k)
    seg_hi = tl.load(OFFSETS + k + 1)
    lo = seg_lo + piece.to(tl.int64) * PIECE
    hi = tl.minimum(lo + PIECE, seg_hi)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs < hi
        rows = tl.load(PERM + offs, mask=mask_m, other=0)
        acc += tl.load(X + rows[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(acc, axis=0)
    tl.store(OUT + (piece.to(tl.int64) * K + k) * D + offs_d, out, mask=mask_d)


def kmeans_step(x, centroids, precision="tf32"):
    """Returns ``(labels (n,) int64, min_sq_dist (n,) float32, counts (K,) float32, sums (K, D) float32)``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim != 2:
            raise TypeError(f"{name} must be a 2-D float32 torch.Tensor")
    n, d = x.shape
    k = centroids.shape[0]
    if centroids.shape[1] != d:
        raise ValueError(f"centroids have {centroids.shape[1]} features but x has {d}")
    if d > MAX_D:
        raise ValueError(f"the fused kernels support D <= {MAX_D}, got D={d}; use the torch backend")
    if centroids.device != x.device:
        raise ValueError("x and centroids must be on the same device")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous: call x.contiguous() first")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError("the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")

    mode = _MODES[precision]
    c, c_lo = as_operand(centroids, mode)
    c2 = (centroids.double() ** 2).sum(1).float()
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    min_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(d))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _kmeans_assign_kernel[grid](x, c, c_lo, c2, labels, min_dist, n, k, D=d, BLOCK_D=block_d,
                                MODE=mode, EMU=_interpret())

    counts_i = torch.bincount(labels, minlength=k)
    perm = torch.argsort(labels, stable=True)
    offsets = torch.zeros(k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts_i, 0, out=offsets[1:])
    max_count = int(counts_i.max().item())
    split = max(1, min(64, triton.cdiv(max_count, 2048)))
    piece = max(1, triton.cdiv(max_count, split))
    part = torch.empty((split, k, d), dtype=torch.float32, device=x.device)
    block_m = 16 if _interpret() else 32
    _segment_sum_kernel[(k, split)](x, perm, offsets, part, k, piece, D=d, BLOCK_D=block_d, BLOCK_M=block_m,
                                    num_warps=4)
    sums = part[0] if split == 1 else part.sum(0)
    return labels, min_dist, counts_i.to(torch.float32), sums
