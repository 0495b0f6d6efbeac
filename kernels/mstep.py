"""The EM M-step in one kernel (float64), after the E-step's deterministic reduction.

What it computes
----------------
The contract of ``flashgmm_faiss.gmm.m_step`` (the torch form, also the reference of the tests): from the E-step's
float64 sufficient statistics nk (K,), sx (K, D), sq (K, D) (diag: sum r (x - mu)^2 per feature) or (K,)
(spherical: summed over the features), the means (K, D) and variances var (K, D) or (K,) the E-step ran with:

* ``new_mu = sx / max(nk, 1e-12)``; ``shift = new_mu - mu``;
* diag ``new_var = sq / nk - shift^2``, spherical ``(sq / nk - sum_d shift^2) / D``; then ``max(., 0) + reg_covar``
  and, with a floor resolution ``res`` (bf16 operands), at least ``(res new_mu)^2`` (spherical: its feature mean);
* ``degenerate = nk < degenerate_nk``: such a component keeps its mean and variance (the caller re-seeds it);
* ``weights = nk / n``; ``summary = [ll_sum, number of degenerate components]``.

Why a kernel: in torch these are ~17 launches of a few microseconds each on (K, D) tensors, ~40 us of an EM
iteration on an H100 (K=1024, D=128) whose E-step takes 1.0-2.5 ms. One program per BLOCK_K components holds
whole rows (D <= 256), so the spherical feature sums need no second pass. No floating-point contraction
(``enable_fp_fusion=False``): diag results are bitwise those of the torch form; the spherical feature sums may
differ from torch's reduction order in the last bit. The degenerate count is added with a float64 atomic of
whole numbers (exact in any order).

Tested on: the CPU interpreter (K=150 over three programs, degenerate and floored components; both covariance
types) and an NVIDIA H100 (the GPU suite's fits). Measured (H100, N=1e6, K=1024, D=128, fits interleaved with the
torch form, ``bench_ann/ab_fused_mstep.py``; with the first-chunk totals of ``GaussianMixture._estep_pass``): EM
iteration spherical 1.193 -> 1.154 ms, diag 2.741 -> 2.699 ms, the same final log-likelihoods
(``bench_ann/results/v33_fused_mstep/``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 256
BLOCK_ELEMS = 2048     # (BLOCK_K, BLOCK_D) float64 elements per program


@triton.jit
def _mstep_kernel(
    # pointers: statistics, the E-step's parameters, float64 scalars [n, reg_covar, degenerate_nk, floor_res] and
    # the log-likelihood sum; outputs
    NK, SX, SQ, MEANS, VAR, SCALARS, LL,
    OUT_MEANS, OUT_VAR, OUT_W, OUT_DEG, SUMMARY,
    K,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_k[:, None] & (offs_d < D)[None, :]
    kd = offs_k[:, None] * D + offs_d[None, :]
    n = tl.load(SCALARS)
    reg_covar = tl.load(SCALARS + 1)
    degenerate_nk = tl.load(SCALARS + 2)

    nk = tl.load(NK + offs_k, mask=mask_k, other=1.0)
    nk_safe = tl.maximum(nk, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    mu = tl.load(MEANS + kd, mask=mask, other=0.0)
    new_mu = tl.load(SX + kd, mask=mask, other=0.0) / nk_safe[:, None]
    shift = new_mu - mu
    sh2 = shift * shift
    if DIAG:
        new_var = tl.load(SQ + kd, mask=mask, other=0.0) / nk_safe[:, None] - sh2
    else:
        new_var = (tl.load(SQ + offs_k, mask=mask_k, other=0.0) / nk_safe - tl.sum(tl.where(mask, sh2, 0.0), 1)) / D
    new_var = tl.maximum(new_var, 0.0, propagate_nan=tl.PropagateNan.ALL) + reg_covar
    if HAS_FLOOR:
        f = tl.load(SCALARS + 3) * new_mu
        f = f * f
        if not DIAG:
            f = tl.sum(tl.where(mask, f, 0.0), 1) / D
        new_var = tl.maximum(new_var, f, propagate_nan=tl.PropagateNan.ALL)
    deg = nk < degenerate_nk
    tl.store(OUT_MEANS + kd, tl.where(deg[:, None], mu, new_mu), mask=mask)
    if DIAG:
        var = tl.load(VAR + kd, mask=mask, other=0.0)
        tl.store(OUT_VAR + kd, tl.where(deg[:, None], var, new_var), mask=mask)
    else:
        var = tl.load(VAR + offs_k, mask=mask_k, other=0.0)
        tl.store(OUT_VAR + offs_k, tl.where(deg, var, new_var), mask=mask_k)
    tl.store(OUT_W + offs_k, nk / n, mask=mask_k)
    tl.store(OUT_DEG + offs_k, deg.to(tl.int8), mask=mask_k)
    tl.atomic_add(SUMMARY + 1, tl.sum(tl.where(mask_k & deg, 1.0, 0.0).to(tl.float64), 0))
    if pid == 0:
        tl.store(SUMMARY, tl.load(LL))


def m_step(nk, sx, sq, ll_sum, means, var, scalars, has_floor: bool):
    """Fused M-step (see the module docstring). nk (K,), sx (K, D), sq and var (K, D) (diag) or (K,) (spherical),
    means (K, D), ll_sum (): float64 on one device, D <= 256; ``scalars`` (4,) float64 on that device: [n,
    reg_covar, degenerate_nk, floor resolution (read only if ``has_floor``)]. Returns ``(means, var, weights,
    degenerate, summary)``: new (K, D), (K, D) or (K,), (K,) float64, (K,) bool, (2,) float64; no host sync."""
    k, d = means.shape
    diag = var.ndim == 2
    tensors = {"nk": nk, "sx": sx, "sq": sq, "ll_sum": ll_sum, "means": means, "var": var, "scalars": scalars}
    shapes = {"nk": (k,), "sx": (k, d), "sq": var.shape, "ll_sum": (), "means": (k, d),
              "var": (k, d) if diag else (k,), "scalars": (4,)}
    for name, t in tensors.items():
        if t.dtype != torch.float64 or tuple(t.shape) != tuple(shapes[name]) or t.device != means.device:
            raise ValueError(f"m_step: {name} must be float64 of shape {tuple(shapes[name])} on {means.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if d > MAX_D:
        raise ValueError(f"m_step supports D <= {MAX_D}, got D={d}")
    nk, sx, sq, means, var = (t.contiguous() for t in (nk, sx, sq, means, var))
    out_means = torch.empty_like(means)
    out_var = torch.empty_like(var)
    weights = torch.empty_like(nk)
    degenerate = torch.empty(k, dtype=torch.int8, device=means.device)
    summary = torch.zeros(2, dtype=torch.float64, device=means.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_k = max(1, BLOCK_ELEMS // block_d)
    _mstep_kernel[(triton.cdiv(k, block_k),)](nk, sx, sq, means, var, scalars, ll_sum, out_means, out_var, weights,
                                              degenerate, summary, k, D=d, BLOCK_D=block_d, DIAG=diag,
                                              HAS_FLOOR=has_floor, BLOCK_K=block_k, num_warps=4,
                                              enable_fp_fusion=False)
    return out_means, out_var, weights, degenerate.view(torch.bool), summary
