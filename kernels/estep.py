"""Fused two-pass E-step for spherical and diagonal Gaussian mixtures.

What it computes
----------------
For one chunk ``x`` (n, D) of centred float32 rows and K components, the contract of
``flashgmm_faiss._torch_backend.estep``: the per-row log-likelihood ``logZ_i = logsumexp_k l_ik`` with
``l_ik = log w_k + log N(x_i | mu_k, var_k)``, and the sufficient statistics ``Nk = sum_i r_ik``,
``Sx = sum_i r_ik x_i`` and ``Sq = sum_i r_ik ||x_i - mu_k||^2`` (spherical) or ``sum_i r_ik (x_i - mu_k)^2``
(diag), with ``r_ik = exp(l_ik - logZ_i)``. Nothing of size n x K ever touches device memory.

Both covariance types share one logit form, prepared once per call on the host side in O(K D):

* spherical: ``dist_ik = max(||x_i||^2 + ||mu_k||^2 - 2 x_i . mu_k, 0)``, ``l_ik = b_k - dist_ik / (2 var_k)``
  (the GEMM accumulates ``x_i . (-2 mu_k)`` onto ``||x_i||^2 + ||mu_k||^2`` in place);
* diag:      ``dist_ik = max((x_i * x_i) . p_k - 2 x_i . (mu_k * p_k) + sum_j mu_kj^2 p_kj, 0)`` with
  ``p = 1 / var``, ``l_ik = b_k - dist_ik / 2``.

Pass 1 (``_logz_kernel``) splits the rows: a program keeps a BLOCK_M x D tile of X on chip, streams the
component parameters in BLOCK_K blocks, and runs an online (base-2) log-sum-exp; it writes logZ (n floats),
optionally with the argmax (``score``/``predict``).

Pass 2 (``_estep_stats_kernel``) splits components x row slabs, in the shape of flash-attention's forward
pass: a program owns BLOCK_K components (the "queries"), keeps their parameters on chip and its accumulators
(Nk, Sx, and Sq or Sxx = sum r x^2) in fp32 registers, and streams its slab of X (the "keys" and "values"),
logZ and ||x||^2 (both written by pass 1). Tiles are (BLOCK_K, BLOCK_M), so R feeds ``R X`` straight from
registers. Each program writes one partial; the launcher sums the partials in a fixed order (in float64):
no floating-point atomics, so two runs with the same device, n and autotuned config are bitwise identical.
Programs are ordered component-block-fastest so that those sharing a slab run together and X comes from HBM
about once per pass, its re-reads from L2. For diag, ``Sq = Sxx - 2 mu Sx + Nk mu^2`` is formed in float64
from the partials (the cancellation is mild once the caller has centred the data).

Cost (spherical; diag doubles the GEMM work): 3 GEMMs of ``2 n K D`` FLOPs (logits twice, ``R^T X`` once)
plus ``2 n K`` exponentials; bytes: X twice (``2 * 4 n D``) + logZ and ||x||^2 (``16 n``) + the partials
(``slabs * K * D * 4`` per statistic, ~17 MB at K=1024, D=128 on 132 SMs). At n=1e6, K=1024, D=128 that is
805 GFLOP (2.2 ms at the measured 364 TFLOP/s tf32 ceiling, 1.2 ms at 690 bf16) against 1 GB (0.25 ms at
4 TB/s): arithmetic-bound.

Precision (``precision`` argument of the launchers)
---------------------------------------------------
Measured on SIFT-like data (integers 0..255 with cluster structure, centred), n=2^20, K=1024, D=128, means from
k-means: max relative error of Nk, Sx, Sq vs float64 (bench_ann/results/kernels_h200.md).

* ``"tf32"`` (default): split-bf16 products. Logits use ``x.mu ~ hi.hi + hi.lo + lo.hi`` with
  ``x = hi + lo`` in two bf16 terms (~16 mantissa bits per operand, fp32 accumulation), and ``R^T X`` uses r in
  bf16 (unbiased rounding that averages out over rows) against both terms of x. 6e-5 (spherical), 1.2e-4
  (diag). This is not a tf32 product, on purpose: a single tf32 product gives 3e-3 on this data (cuBLAS tf32
  in the torch baseline gives the same 3e-3), over the issue's 1e-3 bound, because the logit error grows like
  ``|x| |mu| 2^-11 / var``; and Triton's tf32 wgmma path ran pass 2 2.5x slower than one bf16 product here.
* ``"tf32-mma"``: one tf32 product per GEMM with operands rounded to nearest (the tensor cores truncate fp32
  operands, a bias that does not average out: 4e-3 before the rounding, 3e-3 after). For comparison.
* ``"bf16"``: one bf16 product per GEMM, fp32 accumulation: 2e-2 (spherical), 2e-2 (diag); the issue's 5e-3
  is missed on this data.
* ``"ieee"``: exact fp32 products (slow); the interpreter tests' reference mode.

Caveats
-------
* D <= 256 (the whole padded row stays in one tile); larger D should use the torch backend.
* Autotuning is keyed on (K, D, covariance type, precision), never on n. The slab layout depends on n, K and
  the SM count only, so bitwise reproducibility holds for fixed (device, n, autotuned config).
* Diag in the split mode runs 10 bf16 products per pass-2 tile and spills registers: 3.8x the spherical time.

Tested on: the CPU interpreter (TRITON_INTERPRET=1; the operand rounding of every mode is emulated in fp32,
since the interpreter has no bf16) at tiny odd shapes against float64 torch, and an NVIDIA H200 (torch 2.11,
triton 3.6) at n=2^20, K=1000/1024, D=96/100/128; see ``tests/test_kernels.py`` and ``kernels/NOTES.md``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_D = 256
# GEMM modes: 0 exact fp32 ("ieee"); 1 one tf32 product with round-to-nearest operands ("tf32-mma");
# 2 one bf16 product ("bf16"); 3 split bf16 products, 3 terms for the logits and 2 for R^T X ("tf32", the
# default: tf32-class accuracy or better, see the module docstring for why it is not a tf32 product).
PRECISIONS = ("ieee", "tf32", "bf16", "tf32-mma")
_MODES = {"ieee": 0, "tf32-mma": 1, "bf16": 2, "tf32": 3}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _round_tf32(x):
    """fp32 -> nearest tf32 value (as fp32). The tensor cores truncate fp32 operands to tf32, a bias of
    ~2^-11 per operand that does not average out over a sum."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x1000) & 0xFFFFE000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (as fp32): bf16 arithmetic for the interpreter, which has no bf16."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x8000) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _hi(x, MODE: tl.constexpr, EMU: tl.constexpr):
    """GEMM operand of an fp32 tile: as is (0), tf32-rounded (1), bf16 (2, 3; bf16-valued fp32 if EMU)."""
    if MODE == 1:
        out = _round_tf32(x)
    elif MODE >= 2:
        if EMU:
            out = _round_bf16(x)
        else:
            out = x.to(tl.bfloat16)
    else:
        out = x
    return out


@triton.jit
def _lo(x, hi, MODE: tl.constexpr, EMU: tl.constexpr):
    """Second bf16 term of the split x = hi + lo (MODE 3); other modes return hi (unused)."""
    if MODE == 3:
        if EMU:
            out = _round_bf16(x - hi)
        else:
            out = (x - hi.to(tl.float32)).to(tl.bfloat16)
    else:
        out = hi
    return out


@triton.jit
def _dot(a, b, acc, MODE: tl.constexpr, EMU: tl.constexpr):
    """acc + a (M, C) @ b (C, N) of operands from _hi/_lo, fp32 accumulation (exact fp32 products if EMU).

    Accumulating in place (rather than ``acc += dot``) keeps one register accumulator per GEMM: a fresh
    product per term cost a second accumulator, layout conversions and register spills (seen in the SASS
    resource report: 255 registers and 164-1100 bytes of spills per thread before, see NOTES.md)."""
    if MODE == 0 or EMU:
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif MODE == 1:
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, MODE: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b; for MODE 3 the split product lo.hi + hi.lo + hi.hi (~16 mantissa bits of each operand),
    small terms first."""
    if MODE == 3:
        acc = _dot(a_lo, b_hi, acc, MODE, EMU)
        acc = _dot(a_hi, b_lo, acc, MODE, EMU)
    return _dot(a_hi, b_hi, acc, MODE, EMU)


@triton.jit
def _component_logits(
    xh, xl, xsh, xsl, x2,           # row tile as GEMM operands (hi, lo), its square (diag only), ||x||^2
    A, A_LO, P, P_LO,               # component parameters in operand form (see _prepare)
    BIAS2, COEF2, CST,
    offs_k, mask_k, offs_d, mask_d,
    D: tl.constexpr, DIAG: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Base-2 logits s = l * log2(e) (BM, BK) and distances (BM, BK) of a row tile against one component block.

    Invalid components (k >= K) get s = -inf so that 2^(s - logZ2) = 0 there.
    """
    t_ptrs = offs_d[:, None] + offs_k[None, :] * D            # (BD, BK): parameters read transposed
    if EVEN_K:
        t_mask = mask_d[:, None]
        bias = tl.load(BIAS2 + offs_k)
        coef = tl.load(COEF2 + offs_k)
        cst = tl.load(CST + offs_k)
    else:
        t_mask = mask_d[:, None] & mask_k[None, :]
        bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=0.0)
        coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
        cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)
    # dist = cst + (x2 | xsq . p) - 2 x . mu(p), accumulated in place on the tensor cores (A holds -2 mu(p))
    if DIAG:
        p_t = tl.load(P + t_ptrs, mask=t_mask, other=0.0)
        if MODE == 3:
            p_lo_t = tl.load(P_LO + t_ptrs, mask=t_mask, other=0.0)
        else:
            p_lo_t = p_t
        acc = tl.zeros([xh.shape[0], p_t.shape[1]], tl.float32) + cst[None, :]
        acc = _dot3(xsh, xsl, p_t, p_lo_t, acc, MODE, EMU)
    else:
        acc = x2[:, None] + cst[None, :]
    a_t = tl.load(A + t_ptrs, mask=t_mask, other=0.0)
    if MODE == 3:
        a_lo_t = tl.load(A_LO + t_ptrs, mask=t_mask, other=0.0)
    else:
        a_lo_t = a_t
    acc = _dot3(xh, xl, a_t, a_lo_t, acc, MODE, EMU)
    dist = tl.maximum(acc, 0.0)
    s = bias[None, :] + coef[None, :] * dist
    if not EVEN_K:
        s = tl.where(mask_k[None, :], s, float("-inf"))
    return s, dist


# ----------------------------------------------------------------------------------------------------------
# autotune configs: a small generator plus pruning (never keyed on n)
# ----------------------------------------------------------------------------------------------------------
_SMEM_BUDGET = 200 * 1024


def _esize(mode):
    return 4 if mode in (0, 1) else (2 if mode == 2 else 4)   # mode 3: two bf16 terms


def _row_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2))]


def _prune_row(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}           # constexprs arrive as keyword arguments
    D, K = named_args["D"], named_args["K"]
    diag, es = bool(named_args.get("DIAG", False)), _esize(named_args.get("MODE", 1))
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages
        ops = 2 if diag else 1
        smem = ops * bm * bd * es + st * ops * bk * bd * es
        if bk > max(16, triton.next_power_of_2(K)) or smem > _SMEM_BUDGET:
            continue
        if bm * bd * ops > 256 * 128 or (bm == 256 and diag):  # register budget of the row tile
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] * c.num_stages)]


def _stats_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in ((64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2),
                                 (16, 128, 8, 3), (16, 64, 4, 3))]


def _prune_stats(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    D, K, diag, es = named_args["D"], named_args["K"], named_args["DIAG"], _esize(named_args["MODE"])
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages
        ops = 2 if diag else 1
        smem = ops * bk * bd * es + st * bm * bd * 4 + ops * bm * bd * es
        if bk > max(16, triton.next_power_of_2(K)) or smem > _SMEM_BUDGET:
            continue
        regs = (ops * bk * bd + bk * bm + bm * bd * ops) / (32 * c.num_warps)   # accumulators + tiles
        if regs > 200:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] * c.num_stages)]


# ----------------------------------------------------------------------------------------------------------
# pass 1: logZ (and argmax), split over rows
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_row_configs(), key=["K", "D", "DIAG", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _logz_kernel(
    # pointers: data, component parameters, outputs
    X, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
    LOGZ, X2, BEST,
    # sizes (rows are contiguous, stride D)
    N, K,
    # compile-time: feature dims, flags, tiles
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    DIAG: tl.constexpr, WITH_ARGMAX: tl.constexpr, WRITE_X2: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(X + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    xsq = x * x
    x2 = tl.sum(xsq, axis=1)
    xh = _hi(x, MODE, EMU)
    xl = _lo(x, xh, MODE, EMU)
    if DIAG:
        xsh = _hi(xsq, MODE, EMU)
        xsl = _lo(xsq, xsh, MODE, EMU)
    else:
        xsh = xh
        xsl = xl

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)                   # running sum of 2^(s - m)
    best = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        s, dist = _component_logits(xh, xl, xsh, xsl, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                    offs_k, mask_k, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K)
        s_max = tl.max(s, axis=1)
        if WITH_ARGMAX:
            s_arg = tl.argmax(s, axis=1) + k0
            best = tl.where(s_max > m_i, s_arg, best)
        m_new = tl.maximum(m_i, s_max)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    logz = (m_i + tl.log2(l_i)) * LN2
    tl.store(LOGZ + offs_m, logz, mask=mask_m)
    if WRITE_X2:
        tl.store(X2 + offs_m, x2, mask=mask_m)
    if WITH_ARGMAX:
        tl.store(BEST + offs_m, best.to(tl.int64), mask=mask_m)


# ----------------------------------------------------------------------------------------------------------
# pass 2: responsibilities and statistics, split over component blocks x row slabs
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_stats_configs(), key=["K", "D", "DIAG", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_stats})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _estep_stats_kernel(
    # pointers: data, logZ and ||x||^2 from pass 1, component parameters (A, P in operand form)
    X, LOGZ, X2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
    # outputs: one partial per slab, (S, K), (S, K, D), (S, K) or (S, K, D)
    NK_PART, SX_PART, SQ_PART,
    # sizes
    N, K, SLAB_ROWS,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    DIAG: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Flash-attention-forward shape: the component block plays the queries, the rows of X the keys and
    # the values. Tiles are (BLOCK_K, BLOCK_M) so that R feeds the second GEMM without a transpose.
    # The component block varies fastest: programs sharing a slab of X run side by side (L2 reuse).
    pid = tl.program_id(0)
    num_kb = tl.cdiv(K, BLOCK_K)
    pid_k = pid % num_kb
    pid_s = pid // num_kb
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    kd_mask = mask_k[:, None] & mask_d[None, :]
    kd_ptrs = offs_k[:, None] * D + offs_d[None, :]
    a = tl.load(A + kd_ptrs, mask=kd_mask, other=0.0)
    a_lo = a
    if MODE == 3:
        a_lo = tl.load(A_LO + kd_ptrs, mask=kd_mask, other=0.0)
    if DIAG:
        p = tl.load(P + kd_ptrs, mask=kd_mask, other=0.0)
        p_lo = p
        if MODE == 3:
            p_lo = tl.load(P_LO + kd_ptrs, mask=kd_mask, other=0.0)
    bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=0.0)
    coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
    cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)

    acc_nk = tl.zeros([BLOCK_K], tl.float32)
    acc_sx = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    if DIAG:
        acc_sq = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)   # sum r x^2
    else:
        acc_sq = tl.zeros([BLOCK_K], tl.float32)            # sum r ||x - mu||^2

    row_lo = pid_s * SLAB_ROWS
    row_hi = tl.minimum(row_lo + SLAB_ROWS, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_hi
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lz2 = tl.load(LOGZ + offs_m, mask=mask_m, other=0.0) * LOG2E
        xh = _hi(x, MODE, EMU)
        xl = _lo(x, xh, MODE, EMU)
        if DIAG:
            xsq = x * x
            xsh = _hi(xsq, MODE, EMU)
            xsl = _lo(xsq, xsh, MODE, EMU)
            acc = tl.zeros([BLOCK_K, BLOCK_M], tl.float32) + cst[:, None]
            acc = _dot3(p, p_lo, tl.trans(xsh), tl.trans(xsl), acc, MODE, EMU)
        else:
            acc = cst[:, None] + tl.load(X2 + offs_m, mask=mask_m, other=0.0)[None, :]
        acc = _dot3(a, a_lo, tl.trans(xh), tl.trans(xl), acc, MODE, EMU)      # (BK, BM), A = -2 mu(p)
        dist = tl.maximum(acc, 0.0)
        r = tl.exp2(bias[:, None] + coef[:, None] * dist - lz2[None, :])
        if EVEN_K:
            r = tl.where(mask_m[None, :], r, 0.0)
        else:
            r = tl.where(mask_m[None, :] & mask_k[:, None], r, 0.0)
        acc_nk += tl.sum(r, axis=1)
        # R^T X: r in the operand precision (mode 3: bf16, unbiased rounding that averages out over rows)
        # against x (mode 3: both split terms, so x keeps ~16 bits)
        ro = _hi(r, MODE, EMU)
        if MODE == 3:
            acc_sx = _dot(ro, xl, acc_sx, MODE, EMU)
        acc_sx = _dot(ro, xh, acc_sx, MODE, EMU)
        if DIAG:
            if MODE == 3:
                acc_sq = _dot(ro, xsl, acc_sq, MODE, EMU)
            acc_sq = _dot(ro, xsh, acc_sq, MODE, EMU)
        else:
            acc_sq += tl.sum(r * dist, axis=1)

    base_k = pid_s.to(tl.int64) * K + offs_k
    tl.store(NK_PART + base_k, acc_nk, mask=mask_k)
    out_ptrs = base_k[:, None] * D + offs_d[None, :]
    tl.store(SX_PART + out_ptrs, acc_sx, mask=kd_mask)
    if DIAG:
        tl.store(SQ_PART + out_ptrs, acc_sq, mask=kd_mask)
    else:
        tl.store(SQ_PART + base_k, acc_sq, mask=mask_k)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(x, means, var, log_weights, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, t in (("x", x), ("means", means), ("var", var), ("log_weights", log_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}: convert with .float()")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.ndim != 2 or means.ndim != 2:
        raise ValueError(f"x and means must be 2-D, got shapes {tuple(x.shape)} and {tuple(means.shape)}")
    n, d = x.shape
    k = means.shape[0]
    if means.shape[1] != d:
        raise ValueError(f"means has {means.shape[1]} features but x has {d}")
    if d > MAX_D:
        raise ValueError(f"the fused kernels keep a whole row in one tile and support D <= {MAX_D}, got D={d}; "
                         "use the torch backend for wider data")
    if var.shape not in ((k,), (k, d)):
        raise ValueError(f"var must have shape ({k},) (spherical) or ({k}, {d}) (diag), got {tuple(var.shape)}")
    if log_weights.shape != (k,):
        raise ValueError(f"log_weights must have shape ({k},), got {tuple(log_weights.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous: call x.contiguous() first")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError("the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return n, d, k


def _bf16_values(t):
    bits = t.view(torch.int32)
    return ((bits + 0x8000) & ~0xFFFF).view(torch.float32)


def as_operand(t, mode, emu=None):
    """Host-side operand form (hi, lo) of a parameter matrix, matching the kernels' _hi/_lo."""
    emu = _interpret() if emu is None else emu
    t = t.float().contiguous()
    if mode == 1:
        hi = ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
        return hi, hi
    if mode >= 2:
        hi = _bf16_values(t) if emu else t.to(torch.bfloat16)
        if mode == 2:
            return hi, hi
        res = t - hi.float()
        lo = _bf16_values(res) if emu else res.to(torch.bfloat16)
        return hi, lo
    return t, t


def _prepare(means, var, log_weights, precision):
    """Per-component parameters of the shared logit form (O(K D), float64 math).

    Returns (A, A_lo, P, P_lo, bias2, coef2, cst): A and P in the GEMM operand form of ``precision`` (the lo
    terms are only read in the split mode), base-2 bias and
    coefficient, so that ``s = bias2 + coef2 * max(base + cst - 2 x.A, 0)`` is ``log2(e)`` times the logit.
    """
    mode = _MODES[precision]
    d = means.shape[1]
    mu = means.double()
    v = var.double()
    lw = log_weights.double()
    log2pi = math.log(2.0 * math.pi)
    if var.ndim == 1:
        a = as_operand(-2.0 * means, mode)              # scaling by -2 is exact in every operand format
        p = a                                                # unused placeholders
        bias = lw - 0.5 * d * (log2pi + torch.log(v))
        coef = -0.5 / v
        cst = (mu * mu).sum(1)
    else:
        prec = 1.0 / v
        a = as_operand(-2.0 * mu * prec, mode)
        p = as_operand(prec, mode)
        bias = lw - 0.5 * (d * log2pi + torch.log(v).sum(1))
        coef = torch.full_like(bias, -0.5)
        cst = (mu * mu * prec).sum(1)
    log2e = 1.0 / math.log(2.0)
    return (a[0], a[1], p[0], p[1], (bias * log2e).float().contiguous(), (coef * log2e).float().contiguous(),
            cst.float().contiguous())


_SM_COUNT = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def launch_logz(x, params, k, diag, precision, with_argmax=False, x2=None):
    """Pass 1 alone: logZ (n,) float32 and, if asked, the argmax (n,) int64; fills ``x2`` with ||x||^2 if given."""
    n, d = x.shape
    a, a_lo, p, p_lo, bias, coef, cst = params
    logz = torch.empty(n, dtype=torch.float32, device=x.device)
    best = torch.empty(n if with_argmax else 1, dtype=torch.int64, device=x.device)
    mode = _MODES[precision]

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _logz_kernel[grid](x, a, a_lo, p, p_lo, bias, coef, cst, logz, logz if x2 is None else x2, best, n, k,
                       D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                       DIAG=diag, WITH_ARGMAX=with_argmax, WRITE_X2=x2 is not None, MODE=mode, EMU=_interpret())
    return logz, (best if with_argmax else None)


def slab_layout(n: int, k: int, device) -> tuple[int, int]:
    """(number of slabs, rows per slab): about two programs per SM, slabs a multiple of 256 rows."""
    target = max(1, (2 * _sm_count(device)) // max(1, triton.cdiv(k, 128)))
    slabs = max(1, min(target, triton.cdiv(n, 2048)))
    slab_rows = triton.cdiv(triton.cdiv(n, slabs), 256) * 256
    return triton.cdiv(n, slab_rows), slab_rows


def estep(x, means, var, log_weights, precision="tf32"):
    """Fused E-step over one chunk; returns ``(log_norm, nk, sx, sq)`` as in ``_torch_backend.estep``."""
    n, d, k = _check_inputs(x, means, var, log_weights, precision)
    diag = var.ndim == 2
    params = _prepare(means, var, log_weights, precision)
    x2 = None if diag else torch.empty(n, dtype=torch.float32, device=x.device)
    logz, _ = launch_logz(x, params, k, diag, precision, x2=x2)

    slabs, slab_rows = slab_layout(n, k, x.device)
    dev = x.device
    nk_part = torch.empty((slabs, k), dtype=torch.float32, device=dev)
    sx_part = torch.empty((slabs, k, d), dtype=torch.float32, device=dev)
    sq_part = torch.empty((slabs, k, d) if diag else (slabs, k), dtype=torch.float32, device=dev)
    a, a_lo, p, p_lo, bias, coef, cst = params

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]) * slabs,)

    _estep_stats_kernel[grid](x, logz, logz if x2 is None else x2, a, a_lo, p, p_lo, bias, coef, cst,
                              nk_part, sx_part, sq_part,
                              n, k, slab_rows,
                              D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                              DIAG=diag, MODE=_MODES[precision], EMU=_interpret())

    # fixed-order reduction of the partials, cast on the fly (no float64 copy of the partials)
    nk64 = nk_part.sum(0, dtype=torch.float64)
    sx64 = sx_part.sum(0, dtype=torch.float64)
    if diag:
        sxx64 = sq_part.sum(0, dtype=torch.float64)
        mu = means.double()
        sq = (sxx64 - 2.0 * mu * sx64 + nk64[:, None] * mu * mu).clamp_min_(0.0).float()
    else:
        sq = sq_part.sum(0, dtype=torch.float64).float()
    return logz, nk64.float(), sx64.float(), sq

