"""Fused multi-assignment and scoring: per-row top components without an n x K matrix.

What it computes
----------------
* ``score`` (``predict`` / ``score_samples``): ``logZ_i`` and ``argmax_k l_ik``, the E-step's pass 1 with the
  argmax switched on (``estep._logz_kernel``).
* ``assign``: the contract of ``flashgmm_faiss._torch_backend.assign``: per row the components with
  responsibility ``r_ik = exp(l_ik - logZ_i) > tau``, best first, at most ``max_assign``, and always the best
  one. Pass 1 writes logZ; ``_topk_kernel`` then splits the rows, streams the components in BLOCK_K blocks and
  keeps, per row, a running top-M list (M = min(max_assign, K)) of logits and indices in registers: each block
  is merged by M rounds of "largest candidate replaces the smallest kept entry if larger". The rows' top-M
  lists (n x M responsibilities and indices) are then compacted to CSR by the launcher; memory is O(n M).

Cost: two logit GEMMs (``2 * 2 n K D`` FLOPs) + ``n K`` exps + ``O(n K M)`` compare/select work for the
merge (which dominates for large M: keep max_assign small, as IVF multi-assignment does); bytes: X twice,
outputs ``12 n M``.

Precision: as the E-step (``"tf32"``, ``"bf16"``, ``"bf16x3"``, ``"ieee"``); responsibilities within ~1e-3
relative of float64 in tf32 on centred data, so a component whose responsibility is within that of tau may
flip. Exact ties between components are broken by the lower index, as ``torch.topk`` usually does.

Caveats: D <= 256, M <= 64. Tested on: the CPU interpreter at tiny odd shapes against float64 top-k, and
an NVIDIA H200 and an NVIDIA H100 (invariants at n=4096, K=1000; ``tests/test_kernels.py``). Measured inside
``GaussianMixture.assign`` (H100, n=1e6, K=1024, D=128, max_assign=2): 32 ms including the CSR copy to the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import (LOG2E, _MODES, _check_inputs, _component_logits, _interpret, _load_rows, _prune_row, _row_block,
                    _row_operands, _split_a, absmax, launch_logz, prepare)

MAX_ASSIGN = 64


def _topk_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=2)
            for bm in (64, 128) for bk in (64,) for w in (4, 8)]


@triton.autotune(configs=_topk_configs(), key=["K", "D", "DIAG", "MODE", "M", "SPLIT_A"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _topk_kernel(
    # pointers: data and centre, logZ, component parameters; outputs (n, M) responsibilities and indices
    X, CENTER, LOGZ, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
    TOP_R, TOP_I, SCALES,
    # sizes
    N, K,
    # compile-time: dims, flags, kept entries (M real, M_PAD = next power of 2), tiles
    D: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr, HAS_CENTER: tl.constexpr, MODE: tl.constexpr,
    EMU: tl.constexpr,
    M: tl.constexpr, M_PAD: tl.constexpr, SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    x = _load_rows(X, CENTER, offs_m, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, xsh, xsl, x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), DIAG, MODE, EMU)
    lz2 = tl.load(LOGZ + offs_m, mask=mask_m, other=0.0) * LOG2E

    slots = tl.arange(0, M_PAD)
    # kept logits: -inf in the M real slots (to be replaced), +inf in the padding (never replaced)
    keep_v = tl.where(slots[None, :] < M, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, M_PAD], tl.float32)
    keep_i = tl.zeros([BLOCK_M, M_PAD], tl.int32)
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + cols
        mask_k = offs_k < K
        cand, dist = _component_logits(xh, xl, xsh, xsl, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                       offs_k, mask_k, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K,
                                       SPLIT_A)
        for _ in tl.static_range(M):
            c_max = tl.max(cand, axis=1)
            c_arg = tl.argmax(cand, axis=1)
            k_min = tl.min(keep_v, axis=1)
            k_slot = tl.argmin(keep_v, axis=1)
            put = (slots[None, :] == k_slot[:, None]) & (c_max > k_min)[:, None]
            keep_v = tl.where(put, c_max[:, None], keep_v)
            keep_i = tl.where(put, (c_arg + k0)[:, None], keep_i)
            cand = tl.where(cols[None, :] == c_arg[:, None], float("-inf"), cand)

    # emit best first: M rounds of extract-max over the kept list
    keep_v = tl.where(slots[None, :] < M, keep_v, float("-inf"))
    out_ptrs = offs_m * M
    for j in tl.static_range(M):
        v = tl.max(keep_v, axis=1)
        s = tl.argmax(keep_v, axis=1)
        sel = slots[None, :] == s[:, None]
        idx = tl.sum(tl.where(sel, keep_i, 0), axis=1)
        tl.store(TOP_R + out_ptrs + j, tl.exp2(v - lz2), mask=mask_m)
        tl.store(TOP_I + out_ptrs + j, idx.to(tl.int64), mask=mask_m)
        keep_v = tl.where(sel, float("-inf"), keep_v)


def _params(x, means, var, log_weights, precision, center, x_absmax):
    if _MODES[precision] == 1 and x_absmax is None:
        x_absmax = absmax(x, center)
    return prepare(means, var, log_weights, precision, x_absmax)


def score(x, means, var, log_weights, precision="tf32", center=None, x_absmax=None):
    """Returns ``(log_norm (n,) float32, best (n,) int64)`` as ``_torch_backend.score``.

    x (n, D), means (K, D), var (K,) or (K, D), log_weights (K,): float32; ``center`` (D,) is subtracted from
    the rows in the kernel; ``x_absmax`` bounds ``|x - center|`` (computed when None)."""
    n, d, k = _check_inputs(x, means, var, log_weights, precision, center)
    params = _params(x, means, var, log_weights, precision, center, x_absmax)
    return launch_logz(x, params, k, var.ndim == 2, precision, with_argmax=True, center=center)


def topk_responsibilities(x, means, var, log_weights, max_assign, precision="tf32", center=None, x_absmax=None):
    """Per row the M = min(max_assign, K) largest responsibilities, best first: ((n, M) float32, (n, M) int64)."""
    n, d, k = _check_inputs(x, means, var, log_weights, precision, center)
    m = min(int(max_assign), k)
    if not 1 <= m <= MAX_ASSIGN:
        raise ValueError(f"max_assign must be in [1, {MAX_ASSIGN}], got {max_assign}")
    diag = var.ndim == 2
    params = _params(x, means, var, log_weights, precision, center, x_absmax)
    logz, _ = launch_logz(x, params, k, diag, precision, center=center)
    top_r = torch.empty((n, m), dtype=torch.float32, device=x.device)
    top_i = torch.empty((n, m), dtype=torch.int64, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _topk_kernel[grid](x, x if center is None else center, logz, params.a, params.a_lo, params.p, params.p_lo,
                       params.bias2, params.coef2, params.cst, top_r, top_i, params.scales, n, k,
                       D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DIAG=diag, HAS_CENTER=center is not None,
                       MODE=_MODES[precision], EMU=_interpret(),
                       M=m, M_PAD=max(2, triton.next_power_of_2(m)), SPLIT_A=_split_a(_MODES[precision], diag))
    return top_r, top_i


def assign(x, means, var, log_weights, tau, max_assign, precision="tf32", center=None, x_absmax=None):
    """CSR multi-assignment ``(counts (n,) int64, lists (nnz,) int64, resp (nnz,) float32)``."""
    top_r, top_i = topk_responsibilities(x, means, var, log_weights, max_assign, precision, center, x_absmax)
    keep = top_r > tau
    keep[:, 0] = True
    return keep.sum(1).to(torch.int64), top_i[keep], top_r[keep]
