"""Fused two-pass E-step for spherical and diagonal Gaussian mixtures.

What it computes
----------------
For one chunk ``x`` (n, D) of centred float32 rows and K components, the contract of
``flashgmm_faiss._torch_backend.estep``: the per-row log-likelihood ``logZ_i = logsumexp_k l_ik`` with
``l_ik = log w_k + log N(x_i | mu_k, var_k)``, and the sufficient statistics ``Nk = sum_i r_ik``,
``Sx = sum_i r_ik x_i`` and ``Sq = sum_i r_ik ||x_i - mu_k||^2`` (spherical) or ``sum_i r_ik (x_i - mu_k)^2``
(diag), with ``r_ik = exp(l_ik - logZ_i)``. Nothing of size n x K ever touches device memory.

Both covariance types share one logit form, prepared once per call on the host side in O(K D):

* spherical: ``dist_ik = max(||x_i||^2 + ||mu_k||^2 - 2 x_i . mu_k, 0)``, ``l_ik = b_k - dist_ik / (2 var_k)``;
* diag:      ``dist_ik = max((x_i * x_i) . p_k - 2 x_i . (mu_k * p_k) + sum_j mu_kj^2 p_kj, 0)`` with
  ``p = 1 / var``, ``l_ik = b_k - dist_ik / 2``.

Pass 1 (``_logz_kernel``) splits the rows: a program keeps a BLOCK_M x D tile of X on chip, streams the
component parameters in BLOCK_K blocks, and runs an online (base-2) log-sum-exp; it writes logZ (n floats),
optionally with the argmax (``score``/``predict``).

Pass 2 (``_estep_stats_kernel``) splits components x row slabs: a program owns BLOCK_K components, keeps
their parameters and its accumulators (Nk, Sx, and Sq or Sxx = sum r x^2) in fp32 registers, and streams
its slab of X and logZ; ``R^T X`` (and ``R^T (X*X)`` for diag) run on the tensor cores. Each program writes
one partial, and the partials are summed in a fixed order by the launcher (float64, then cast): no
floating-point atomics, so two runs on the same device, shapes and autotuned config are bitwise identical.
Programs are ordered component-block-fastest so the programs sharing a slab run together and X is read
from HBM about once per pass, the re-reads coming from L2. For diag, ``Sq = Sxx - 2 mu Sx + Nk mu^2`` is
formed in float64 from the fp32 partials (the cancellation is mild once the caller has centred the data).

Cost (spherical; diag doubles the GEMM work): 3 GEMMs of ``2 n K D`` FLOPs (logits twice, ``R^T X`` once)
plus ``2 n K`` exponentials; bytes: X twice (``2 * 4 n D``) + logZ write and read (``8 n``) + the
partials (``slabs * K * D * 4`` per statistic, ~17 MB at K=1024, D=128 on 132 SMs).

Precision (``precision`` argument of the launchers)
---------------------------------------------------
* ``"ieee"``: exact fp32 dot products; the mode the CPU interpreter tests use.
* ``"tf32"``: tf32 operands (10-bit mantissa), fp32 accumulation. The logit error grows like
  ``|x| |mu| 2^-11 / var``, hence the caller's centring. Emulated on SIFT-like data (0..255, centred) the
  relative error of Nk, Sx, Sq vs float64 is ~3e-4 at ~600 rows per component and ~1.3e-3 at ~80.
* ``"bf16"``: bf16 operands for both GEMMs, fp32 accumulation; ~5e-3 in the same emulation.
* ``"bf16x3"``: logits from a three-term bf16 split product (``hi.hi + hi.lo + lo.hi``, ~16 mantissa bits,
  1.5x the tf32 logit cost) and tf32 ``R^T X``: ~1e-5 on Nk and Sq, ~2e-4 on Sx.

Caveats
-------
* D <= 256 (the whole padded row stays in one tile); larger D should use the torch backend.
* Autotuning is keyed on (K, D, covariance type, precision), never on n. The slab layout depends on n, K and
  the SM count only, so bitwise reproducibility holds for fixed (device, n, autotuned config).

Tested on: CPU interpreter (TRITON_INTERPRET=1, "ieee") at tiny odd shapes against float64 torch; see
``tests/test_kernels.py`` and ``kernels/NOTES.md`` for the GPU runs.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_D = 256
PRECISIONS = ("ieee", "tf32", "bf16", "bf16x3")
# (logit GEMM mode, accumulation GEMM mode) per precision: 0 ieee, 1 tf32, 2 bf16, 3 bf16x3 split
_MODES = {"ieee": (0, 0), "tf32": (1, 1), "bf16": (2, 2), "bf16x3": (3, 1)}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, MODE: tl.constexpr):
    """a (M, C) @ b (C, N) with fp32 accumulation; MODE 0 ieee, 1 tf32, 2 bf16, 3 bf16x3 split."""
    if MODE == 0:
        out = tl.dot(a, b, input_precision="ieee")
    elif MODE == 1:
        out = tl.dot(a, b, input_precision="tf32")
    elif MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        out = tl.dot(a_lo, b_hi)
        out = tl.dot(a_hi, b_lo, out)
        out = tl.dot(a_hi, b_hi, out)
    return out


@triton.jit
def _component_logits(
    x, xsq, x2,                     # row tile (BM, BD), its square, and row norms (BM,)
    A, P, BIAS, COEF, CST,          # component parameters (see _prepare)
    offs_k, mask_k, offs_d, mask_d,
    D: tl.constexpr, DIAG: tl.constexpr, MODE: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Logits l (BM, BK) and distances dist (BM, BK) of a row tile against one block of components.

    Invalid components (k >= K) get l = -inf so that exp(l - logZ) = 0 there.
    """
    t_ptrs = offs_d[:, None] + offs_k[None, :] * D            # (BD, BK): parameters read transposed
    if EVEN_K:
        t_mask = mask_d[:, None]
        bias = tl.load(BIAS + offs_k)
        coef = tl.load(COEF + offs_k)
        cst = tl.load(CST + offs_k)
    else:
        t_mask = mask_d[:, None] & mask_k[None, :]
        bias = tl.load(BIAS + offs_k, mask=mask_k, other=0.0)
        coef = tl.load(COEF + offs_k, mask=mask_k, other=0.0)
        cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)
    a_t = tl.load(A + t_ptrs, mask=t_mask, other=0.0)
    cross = _mm(x, a_t, MODE)
    if DIAG:
        p_t = tl.load(P + t_ptrs, mask=t_mask, other=0.0)
        base = _mm(xsq, p_t, MODE)
    else:
        base = x2[:, None]
    dist = tl.maximum(base + cst[None, :] - 2.0 * cross, 0.0)
    logit = bias[None, :] + coef[None, :] * dist
    if not EVEN_K:
        logit = tl.where(mask_k[None, :], logit, float("-inf"))
    return logit, dist


# ----------------------------------------------------------------------------------------------------------
# autotune configs: a small generator plus pruning (never keyed on n)
# ----------------------------------------------------------------------------------------------------------
def _row_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm in (128, 256) for bk in (64, 128) for w in (8,) for s in (2, 3)]


def _prune_row(configs, named_args, **kwargs):
    D, K = named_args["D"], named_args["K"]
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if bk > max(16, triton.next_power_of_2(K)):
            continue
        if bm * bd > 256 * 128 or (bm == 256 and bd > 64 and bk > 64):  # register budget of the X tile
            continue
        keep.append(c)
    return keep or configs[:1]


def _stats_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm in (64, 128) for bk in (64, 128) for w in (8,) for s in (2, 3)]


def _prune_stats(configs, named_args, **kwargs):
    D, K, diag = named_args["D"], named_args["K"], named_args["DIAG"]
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if bk > max(16, triton.next_power_of_2(K)):
            continue
        n_acc = 2 if diag else 1                           # Sx (and Sxx) accumulators in registers
        if n_acc * bk * bd > 128 * 128 or (bm * bd > 128 * 128):
            continue
        keep.append(c)
    return keep or configs[:1]


# ----------------------------------------------------------------------------------------------------------
# pass 1: logZ (and argmax), split over rows
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_row_configs(), key=["K", "D", "DIAG", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _logz_kernel(
    # pointers: data, component parameters, outputs
    X, A, P, BIAS, COEF, CST,
    LOGZ, BEST,
    # sizes (rows are contiguous, stride D)
    N, K,
    # compile-time: feature dims, flags, tiles
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    DIAG: tl.constexpr, WITH_ARGMAX: tl.constexpr, MODE: tl.constexpr,
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)                   # running sum of 2^(l - m)
    best = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logit, dist = _component_logits(x, xsq, x2, A, P, BIAS, COEF, CST, offs_k, mask_k, offs_d, mask_d,
                                        D, DIAG, MODE, EVEN_K)
        s = logit * LOG2E
        s_max = tl.max(s, axis=1)
        if WITH_ARGMAX:
            s_arg = tl.argmax(s, axis=1) + k0
            best = tl.where(s_max > m_i, s_arg, best)
        m_new = tl.maximum(m_i, s_max)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    logz = (m_i + tl.log2(l_i)) * LN2
    tl.store(LOGZ + offs_m, logz, mask=mask_m)
    if WITH_ARGMAX:
        tl.store(BEST + offs_m, best.to(tl.int64), mask=mask_m)


# ----------------------------------------------------------------------------------------------------------
# pass 2: responsibilities and statistics, split over component blocks x row slabs
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_stats_configs(), key=["K", "D", "DIAG", "MODE", "ACC_MODE"],
                 prune_configs_by={"early_config_prune": _prune_stats})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _estep_stats_kernel(
    # pointers: data, logZ, component parameters
    X, LOGZ, A, P, BIAS, COEF, CST,
    # outputs: one partial per slab, (S, K), (S, K, D), (S, K) or (S, K, D)
    NK_PART, SX_PART, SQ_PART,
    # sizes
    N, K, SLAB_ROWS,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    DIAG: tl.constexpr, MODE: tl.constexpr, ACC_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # component block varies fastest: the programs sharing a slab of X run side by side (L2 reuse)
    pid = tl.program_id(0)
    num_kb = tl.cdiv(K, BLOCK_K)
    pid_k = pid % num_kb
    pid_s = pid // num_kb
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    acc_nk = tl.zeros([BLOCK_K], tl.float32)
    acc_sx = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    if DIAG:
        acc_sq = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)   # sum r x^2
    else:
        acc_sq = tl.zeros([BLOCK_K], tl.float32)            # sum r ||x - mu||^2

    row_lo = pid_s.to(tl.int64) * SLAB_ROWS
    row_hi = tl.minimum(row_lo + SLAB_ROWS, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_hi
        x = tl.load(X + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0)
        lz = tl.load(LOGZ + offs_m, mask=mask_m, other=0.0)
        xsq = x * x
        x2 = tl.sum(xsq, axis=1)
        logit, dist = _component_logits(x, xsq, x2, A, P, BIAS, COEF, CST, offs_k, mask_k, offs_d, mask_d,
                                        D, DIAG, MODE, EVEN_K)
        r = tl.exp2((logit - lz[:, None]) * LOG2E)
        r = tl.where(mask_m[:, None], r, 0.0)
        acc_nk += tl.sum(r, axis=0)
        r_t = tl.trans(r)
        acc_sx += _mm(r_t, x, ACC_MODE)
        if DIAG:
            acc_sq += _mm(r_t, xsq, ACC_MODE)
        else:
            acc_sq += tl.sum(r * dist, axis=0)

    base_k = pid_s.to(tl.int64) * K + offs_k
    tl.store(NK_PART + base_k, acc_nk, mask=mask_k)
    kd_ptrs = base_k[:, None] * D + offs_d[None, :]
    kd_mask = mask_k[:, None] & mask_d[None, :]
    tl.store(SX_PART + kd_ptrs, acc_sx, mask=kd_mask)
    if DIAG:
        tl.store(SQ_PART + kd_ptrs, acc_sq, mask=kd_mask)
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


def _prepare(means, var, log_weights):
    """Per-component parameters of the shared logit form (O(K D), float64 math then float32)."""
    d = means.shape[1]
    mu = means.double()
    v = var.double()
    lw = log_weights.double()
    log2pi = math.log(2.0 * math.pi)
    if var.ndim == 1:
        a = means.contiguous()
        p = a                                                # unused placeholder
        bias = lw - 0.5 * d * (log2pi + torch.log(v))
        coef = -0.5 / v
        cst = (mu * mu).sum(1)
    else:
        prec = 1.0 / v
        a = (mu * prec).float().contiguous()
        p = prec.float().contiguous()
        bias = lw - 0.5 * (d * log2pi + torch.log(v).sum(1))
        coef = torch.full_like(bias, -0.5)
        cst = (mu * mu * prec).sum(1)
    return a, p, bias.float().contiguous(), coef.float().contiguous(), cst.float().contiguous()


_SM_COUNT = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def launch_logz(x, params, k, diag, precision, with_argmax=False):
    """Pass 1 alone: logZ (n,) float32 and, if asked, the argmax (n,) int64."""
    n, d = x.shape
    a, p, bias, coef, cst = params
    logz = torch.empty(n, dtype=torch.float32, device=x.device)
    best = torch.empty(n if with_argmax else 1, dtype=torch.int64, device=x.device)
    mode = _MODES[precision][0]

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _logz_kernel[grid](x, a, p, bias, coef, cst, logz, best, n, k,
                       D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                       DIAG=diag, WITH_ARGMAX=with_argmax, MODE=mode)
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
    params = _prepare(means, var, log_weights)
    logz, _ = launch_logz(x, params, k, diag, precision)

    slabs, slab_rows = slab_layout(n, k, x.device)
    dev = x.device
    nk_part = torch.empty((slabs, k), dtype=torch.float32, device=dev)
    sx_part = torch.empty((slabs, k, d), dtype=torch.float32, device=dev)
    sq_part = torch.empty((slabs, k, d) if diag else (slabs, k), dtype=torch.float32, device=dev)
    a, p, bias, coef, cst = params
    lmode, amode = _MODES[precision]

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]) * slabs,)

    _estep_stats_kernel[grid](x, logz, a, p, bias, coef, cst, nk_part, sx_part, sq_part,
                              n, k, slab_rows,
                              D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                              DIAG=diag, MODE=lmode, ACC_MODE=amode)

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

