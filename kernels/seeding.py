"""The k-means++ seeding step's distance update: ``d2 = min(d2, ||x_i - x_s||^2)`` in one pass over the sample.

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

Caveats: x contiguous float32, d2 contiguous float64, both on the GPU (or the CPU under ``TRITON_INTERPRET=1``);
NaN handling is not defined (the estimator checks finiteness first). Reference: :func:`min_sq_dist_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import _interpret

BLOCK_M = 64
BLOCK_D = 64


@triton.jit
def _min_sq_dist_kernel(X, S, D2, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p: rows [p BLOCK_M, (p + 1) BLOCK_M): d2 = min(d2, ||x - x_s||^2), the sum in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    seed = tl.load(S).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        r = tl.load(X + seed * D + cols, mask=cmask, other=0.0)
        diff = x - r[None, :]
        acc += tl.sum(diff * diff, axis=1)
    old = tl.load(D2 + rows, mask=rmask, other=0.0)
    tl.store(D2 + rows, tl.minimum(old, acc.to(tl.float64)), mask=rmask)


def min_sq_dist_reference(d2: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Float64 reference of :func:`min_sq_dist_`: returns ``min(d2, ||x - x[s]||^2)`` (n,) without changing d2."""
    x64 = x.double()
    return torch.minimum(d2, (x64 - x64[s.reshape(-1)[0]]).square().sum(1))


def min_sq_dist_(d2: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Update the squared distances to the nearest seed with a new seed, in place (no host sync).

    Parameters
    ----------
    d2 : (n,) float64, contiguous: squared distances to the nearest seed so far (+inf before the first seed)
    x : (n, D) float32, contiguous, on d2's device: the sample
    s : (1,) int64 on the device: the new seed's row in x (0 <= s < n, not checked on the device)

    Returns
    -------
    d2, updated: ``min(d2, ||x - x[s]||^2)``
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2:
        raise TypeError("x must be a 2-D float32 torch.Tensor")
    n, d = x.shape
    if not isinstance(d2, torch.Tensor) or d2.dtype != torch.float64 or d2.shape != (n,):
        raise TypeError(f"d2 must be a float64 tensor of shape ({n},)")
    if not isinstance(s, torch.Tensor) or s.dtype != torch.int64 or s.numel() != 1:
        raise TypeError("s must be an int64 tensor of one element")
    if not (x.is_contiguous() and d2.is_contiguous()):
        raise ValueError("x and d2 must be contiguous: call .contiguous() first")
    if not (x.device == d2.device == s.device):
        raise ValueError(f"x, d2 and s must be on one device (got {x.device}, {d2.device}, {s.device})")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError("the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if n == 0:
        return d2
    block_d = min(BLOCK_D, max(16, triton.next_power_of_2(d)))
    block_m = 16 if _interpret() else BLOCK_M
    _min_sq_dist_kernel[(triton.cdiv(n, block_m),)](x, s, d2, n, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return d2
