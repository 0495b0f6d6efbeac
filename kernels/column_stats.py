"""Per-feature sum, minimum and maximum of a chunk, in a fixed amount of device memory.

What it computes
----------------
For x (n, D) float32: ``sum_j = sum_i x_ij`` (float64), ``lo_j = min_i x_ij`` and ``hi_j = max_i x_ij`` (float32):
the data centre and the range that bounds the fused kernels' fp16 operand scale (:func:`.estep.absmax`).

Why a kernel: torch's CUDA reductions over the rows of an (n, D) matrix stage their partial results in a buffer
of ~132 MiB per reduction once n reaches ~1e5 rows, whatever n (``x.sum(0)``, ``amin`` / ``amax``; ``aminmax(x,
dim=0)`` 264 MiB; measured on an H100 with torch 2.11). That alone broke the estimator's ``working_memory`` budget
of 64 MiB during its validation pass. Here every program sums a contiguous slab of rows in BLOCK_M-row tiles (fp32
within a tile, float64 across tiles) and writes one partial row; a second launch reduces the partial rows in a
fixed order. Memory: ``P (8 + 4 + 4) D`` bytes of partials for P ~ 4 programs per SM; no atomics, so the results
are bitwise reproducible.

Caveats: x contiguous, float32, on the GPU (or the CPU under ``TRITON_INTERPRET=1``); NaN handling is not defined
(the estimator checks finiteness separately). Reference: :func:`column_stats_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import _check_kernel_device, _interpret, _sm_count

BLOCK_M = 64
BLOCK_D = 128


@triton.jit
def _column_partials_kernel(X, SUM_P, LO_P, HI_P, N, D, ROWS_PER_PROG,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (p, c): rows [p ROWS_PER_PROG, (p + 1) ROWS_PER_PROG) x columns block c -> partial row p."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    lo = tl.full((BLOCK_D,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    start = pid.to(tl.int64) * ROWS_PER_PROG
    for m0 in range(0, ROWS_PER_PROG, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        rows = start + local
        mask = ((rows < N) & (local < ROWS_PER_PROG))[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(x, axis=0).to(tl.float64)
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
    out = pid.to(tl.int64) * D + cols
    tl.store(SUM_P + out, acc, mask=cmask)
    tl.store(LO_P + out, lo, mask=cmask)
    tl.store(HI_P + out, hi, mask=cmask)


@triton.jit
def _column_reduce_kernel(SUM_P, LO_P, HI_P, SUM, LO, HI, P, D, BLOCK_D: tl.constexpr):
    """Program c: the P partial rows of columns block c, summed in row order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    lo = tl.full((BLOCK_D,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    for p in range(0, P):
        at = p * D + cols
        acc += tl.load(SUM_P + at, mask=cmask, other=0.0)
        lo = tl.minimum(lo, tl.load(LO_P + at, mask=cmask, other=float("inf")))
        hi = tl.maximum(hi, tl.load(HI_P + at, mask=cmask, other=float("-inf")))
    tl.store(SUM + cols, acc, mask=cmask)
    tl.store(LO + cols, lo, mask=cmask)
    tl.store(HI + cols, hi, mask=cmask)


def column_stats_reference(x: torch.Tensor):
    """Torch reference of :func:`column_stats`: ``(x.double().sum(0), x.amin(0), x.amax(0))``."""
    return x.double().sum(0), x.amin(0), x.amax(0)


def column_stats(x: torch.Tensor):
    """Per-feature statistics of a chunk without torch's row-reduction staging buffers.

    Parameters
    ----------
    x : (n, D) float32, contiguous, n >= 1, on the GPU (or the CPU under ``TRITON_INTERPRET=1``)

    Returns
    -------
    sum (D,) float64, lo (D,) float32, hi (D,) float32; no host sync
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2:
        raise TypeError("x must be a 2-D float32 torch.Tensor")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous: call x.contiguous() first")
    _check_kernel_device(x.device)
    n, d = x.shape
    if n == 0:
        raise ValueError("x has no rows: column statistics need at least one")
    block_d = min(BLOCK_D, max(16, triton.next_power_of_2(d)))
    col_blocks = triton.cdiv(d, block_d)
    block_m = 16 if _interpret() else BLOCK_M
    programs = max(1, min(triton.cdiv(n, block_m), (4 * _sm_count(x.device)) // col_blocks))
    rows_per_prog = triton.cdiv(triton.cdiv(n, programs), block_m) * block_m
    programs = triton.cdiv(n, rows_per_prog)
    dev = x.device
    sum_p = torch.empty((programs, d), dtype=torch.float64, device=dev)
    lo_p = torch.empty((programs, d), dtype=torch.float32, device=dev)
    hi_p = torch.empty((programs, d), dtype=torch.float32, device=dev)
    _column_partials_kernel[(programs, col_blocks)](x, sum_p, lo_p, hi_p, n, d, rows_per_prog,
                                                    BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    total = torch.empty(d, dtype=torch.float64, device=dev)
    lo = torch.empty(d, dtype=torch.float32, device=dev)
    hi = torch.empty(d, dtype=torch.float32, device=dev)
    _column_reduce_kernel[(col_blocks,)](sum_p, lo_p, hi_p, total, lo, hi, programs, d, BLOCK_D=block_d,
                                         num_warps=4)
    return total, lo, hi
