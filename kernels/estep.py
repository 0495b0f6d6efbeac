"""Fused two-pass E-step for spherical and diagonal Gaussian mixtures.

What it computes
----------------
For one chunk ``x`` (n, D) of float32 rows (centred in the kernels when ``center`` (D,) is given) and K
components, the contract of ``flashgmm_faiss._torch_backend.estep``: the per-row log-likelihood
``logZ_i = logsumexp_k l_ik`` with ``l_ik = log w_k + log N(x_i | mu_k, var_k)``, and the sufficient statistics
``Nk = sum_i r_ik``, ``Sx = sum_i r_ik x_i`` and ``Sq = sum_i r_ik ||x_i - mu_k||^2`` (spherical) or
``sum_i r_ik (x_i - mu_k)^2`` (diag), with ``r_ik = exp(l_ik - logZ_i)``. Nothing of size n x K ever touches
device memory.

Both covariance types share one logit form, prepared once per call in O(K D) by one small kernel (``prepare``;
``prepare_reference`` is its torch form):

* spherical: ``dist_ik = ||x_i||^2 + cst_k + x_i . A_k`` with ``A = -2 mu``, ``cst = ||mu||^2``,
  ``l_ik = b_k - dist_ik / (2 var_k)``; the GEMM accumulates ``x . A`` onto ``||x||^2 + cst`` in place;
* diag: ``dist_ik = (x_i * x_i) . P_k + x_i . A_k + cst_k`` with ``P = 1 / var``, ``A = -2 mu P``,
  ``cst = sum_j mu_kj^2 P_kj``, ``l_ik = b_k - dist_ik / 2``. In the 16-bit modes the squares enter every product
  as two 16-bit terms (``x~^2 = qh + ql`` exactly), in the logits and in ``R^T x^2``; in ``"tf32"`` A does too
  (two fp16 terms: one rounding of A moves each component's implied mean by ~2^-12 mu, see ``DIAG_SPLIT_A``).

Pass 1 (``_logz_kernel``) splits the rows: a program keeps a BLOCK_M x D tile of X on chip, streams the
component parameters in BLOCK_K blocks and runs an online (base-2) log-sum-exp, software-pipelined (the product
of block j + 1 is issued before the exponentials of block j; ``PIPELINE_LOGZ``); it writes logZ (n floats) and
||x||^2, optionally the argmax (``score``/``predict``) and, in the 16-bit modes, the tile in its GEMM operand form
(``xo``: n x D 16-bit values, and the squares for diag), so that pass 2 streams half the bytes and spends no
instructions on conversions in its inner loop.

Pass 2 (``_estep_stats_kernel``) splits components x row slabs, in the shape of flash-attention's forward pass:
a program owns BLOCK_K components (the "queries"), keeps their parameters on chip and its accumulators (Nk, Sx,
and Sq or Sxx = sum r x^2) in fp32 registers, and streams its slab of rows (the "keys" and the "values" at
once), logZ and ||x||^2. Tiles are (BLOCK_K, BLOCK_M), so R feeds ``R X`` straight from registers. Each
program writes one partial; the launcher sums the partials in a fixed order (in float64): no floating-point
atomics, so two runs with the same device, n and autotuned config are bitwise identical. Programs are ordered
component-block-fastest so that those sharing a slab run together and its rows come from HBM about once.

Sparse pass 2 (opt-in, ``order=``): when the rows are visited in a :class:`RowOrder` (sorted by the previous
E-step's most likely component, :func:`row_order`) and the components grouped (:func:`component_order`,
``prepare(comp_perm=)``), pass 1 also records, per 64-row tile, the 64-component blocks in which some
responsibility can reach 2^-SKIP_LOG2, and pass 2 visits only those (tile, block) pairs from per-block work
lists, logits included. Exact up to the dropped terms (each < 2^-SKIP_LOG2[precision]: 2^-24 in "tf32" and
"bf16", 2^-40 in "ieee" and "bf16x3"). On the benchmark's data 12.8 % of the pairs remain: E-step 2.19 -> 1.31 ms
on an H200 (``bench_ann/results/sparse_pass2``); on a fit's state 15.6 % (29.6 % at 2^-40). Without a kept order
(``sort_rows=True``, for data too large to keep 8 bytes per row) pass 1 visits the rows in their own order, keeps
each block's row maxima and writes each row's block bits against its final maximum (exact in any order), the call
sorts the rows by those bit sets (``TRANSIENT_SORT_KEY``) and the sparse pass 2 runs on that transient order (H100,
N=1e6, a fit's state: 1.35 ms spherical, 3.07 ms diag, against 3.27 / 5.87 dense without the row copy and 1.24 /
3.08 under a kept order with the row copy; ``bench_ann/results/v18_bits_sort_key``).

Cost (spherical; diag doubles the GEMM work): 3 GEMMs of ``2 n K D`` FLOPs (logits twice, ``R^T X`` once) plus
``2 n K`` exponentials; bytes: X once in fp32, the 16-bit operand copy written once and read once per slab
(from L2 after the first component block), logZ and ||x||^2, and the partials (``slabs * K * D * 4`` bytes per
statistic). At n=1e6, K=1024, D=128: 805 GFLOP against ~1 GB, arithmetic-bound.

Precision (``precision`` argument of the launchers)
---------------------------------------------------
Every reduced mode computes the E-step *exactly* (up to fp32 accumulation) for the parameters and rows its
operands represent: ``cst`` is computed from the rounded means (``mu~ = A~ / -2``) and ||x||^2 from the rounded
rows, so that ``dist = ||x~ - mu~||^2``. The alternative (``cst`` from the exact means) shifts every component's
logit by a constant ``~ mu . dmu / var``, a bias that does not average out: it is what made a plain tf32 or bf16
product 3e-3 and 2.5e-2 off on centred SIFT-like data, against 3.2e-4 and 2.5e-3 with the consistent form
(H100, n=2^20, K=1024, D=128; diag 6.1e-4 and 4.5e-3; ``kernels/NOTES.md``).

* ``"tf32"`` (default): tf32-class operands, i.e. rounded to nearest with 11 significant bits, and fp32
  accumulation. They are executed as fp16 tensor-core products (fp16 has tf32's 11-bit significand and runs at
  twice tf32's rate): the launcher scales the rows and the parameters by a power of two (exact) so that every
  operand lies below 2^14 in magnitude, well inside fp16's range, and undoes the scale on the fp32 results.
  Components of ``|x|`` more than 2^24 below the largest lose relative precision (fp16 subnormals); their
  contribution to a dot product is below 2^-24 of the largest term.
* ``"bf16"``: bf16 operands (8 significant bits), fp32 accumulation, no scaling needed. Same speed as
  ``"tf32"`` (both are one 16-bit product per GEMM); kept for data whose dynamic range exceeds fp16's. Diag pass 2
  on float32 rows takes the rows and their squares as two bf16 terms each in R X and R x^2
  (``BF16_EXACT_STATS``: the 8-bit rows were most of the statistics' error, 5.5e-3 at K=4096).
* ``"bf16x3"``: split-bf16 products, ``x.mu ~ hi.hi + hi.lo + lo.hi`` with ``x = hi + lo`` (~16 bits per
  operand), and ``R^T X`` against both terms of x: 6e-5 (measured on an H200 with the v3 kernels), at 2.7x the
  products of ``"tf32"``; not re-measured with v4 (its diag variant needs the smaller autotune configs).
* ``"ieee"``: exact fp32 products (slow); the interpreter tests' reference mode.

Caveats
-------
* D <= 256 (the whole padded row stays in one tile); larger D should use the torch backend.
* ``x_absmax`` (an upper bound of ``|x - center|``, used for the fp16 scale) is computed from the chunk when not
  given (one extra read of it); a bound that is too small overflows fp16 and gives NaN.
* Autotuning is keyed on (K, D, covariance type, precision), never on n. The slab layout depends on n, K and
  the SM count only, so bitwise reproducibility holds for fixed (device, n, autotuned config).
* Extra memory per call: the 16-bit operand copy (``2 n D`` bytes; 3 times that for diag: rows, squares and the
  squares' second term), logZ and ||x||^2
  (``8 n``), and the partials; callers bound it by the chunk size.

Tested on: the CPU interpreter (TRITON_INTERPRET=1; the interpreter has no bf16, so every mode's operand
rounding is emulated on fp32 values) at tiny odd shapes against float64 torch (both loop forms), on an NVIDIA
H200 (v1-v3) and on an NVIDIA H100 (v4, v5); see ``tests/test_kernels.py`` and ``kernels/NOTES.md``. Measured
(H100, n=1e6, K=1024, D=128, "tf32"): E-step 2.19 ms spherical (pass 1 0.77), 4.27 ms diag; diag with A in two
terms (v9, H200, one process): 5.23 ms dense, 3.18 ms sparse (one term: 4.32 / 2.76).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LOG2PI = tl.constexpr(math.log(2.0 * math.pi))   # the Gaussian normaliser's log(2 pi), as prepare_reference uses
LN2 = tl.constexpr(0.6931471805599453)
MAX_D = 256
# GEMM modes: 0 exact fp32 ("ieee"); 1 one fp16 product of tf32-precision operands with power-of-two scaling
# ("tf32", the default); 2 one bf16 product ("bf16"); 3 split bf16 products ("bf16x3"). Modes 1 and 2 write a
# 16-bit operand copy of the rows in pass 1 ("copy modes").
PRECISIONS = ("tf32", "bf16", "bf16x3", "ieee")
_MODES = {"ieee": 0, "tf32": 1, "bf16": 2, "bf16x3": 3}
_COPY_MODES = (1, 2)
FP16_BOUND_LOG2 = 14        # scaled fp16 operands stay below 2^14 (fp16 max 65504 ~ 2^16)
_FP16_BOUND = tl.constexpr(FP16_BOUND_LOG2)
_SQ_SCALE = tl.constexpr(2.0 ** -FP16_BOUND_LOG2)   # diag "tf32": the squares' scale
# Pass 1 software-pipelined (the product of the next block issued before this block's exponentials); a module
# switch rather than an autotune parameter so that tests and A/B benchmarks can pin either form. Measured on an
# H100 (N=1e6, K=1024, D=128, "tf32", 3 interleaved rounds, bench_ann/ab_pipeline.py): 0.95 -> 0.77 ms spherical,
# 1.57 -> 1.39 ms diag. The same form was slower in pass 2 (E-step 2.22 -> 2.45 ms with both) and no faster in
# the k-means assignment (0.81 ms); both variants were dropped.
PIPELINE_LOGZ = True
# Sparse pass 2 (under a RowOrder only): pass 1 records, per (FLAG_ROWS-row tile, FLAG_K-component block), an upper
# bound of log2 r over the pair (the block's largest logit minus the running maximum after it: the log-normaliser
# is at least that maximum); pass 2 then visits only the pairs whose bound is >= -SKIP_LOG2, i.e. it drops terms
# r < 2^-SKIP_LOG2, logits included. With rows sorted by their most likely component and components grouped by
# proximity (:func:`row_order`, :func:`component_order`) few pairs remain. A branch around the work inside a dense
# pass 2 was slower than no skipping (it stops Triton's software pipelining): the work list has no branch.
# Threshold per precision: 2^-24 in "tf32" and "bf16" (fp32's unit roundoff: a dropped term is below the rounding of
# its row's responsibility sum, and these modes' 11- or 8-bit operands already put errors of many such units into
# the logits of far pairs); 2^-40 in "ieee" and "bf16x3". Every dropped term is < 2^-SKIP_LOG2, so Nk moves by at
# most n 2^-SKIP_LOG2 per component. On a fit's state (H100, N=1e6, K=1024, D=128, bf16; bench_ann/ab_threshold.py)
# 2^-24 keeps 15.6 % of the pairs instead of 29.6 % (sparse E-step 1.485 -> 1.245 ms) and the statistics move by
# 6e-7 relative to the dense E-step, as much as at 2^-40 (fp32 summation order).
SKIP_LOG2 = {"tf32": 24.0, "bf16": 24.0, "bf16x3": 40.0, "ieee": 40.0}
# Diag "tf32": A = -2 mu / var enters the logits as two fp16 terms (one more product per logits tile in both passes
# and the top-M kernel). One fp16 rounding of A moves every component's implied mean -A~ / (2 P~) by ~2^-12 mu, a
# bias all its rows share: the one-step variance error from random rows was 1.12e-3 (issue bound 1e-3) and the
# float64 model gives 1.9e-4 with the split (NOTES.md, v9). A module switch (read at each launch) for A/B runs.
DIAG_SPLIT_A = True
# Launch sizes of the small per-call kernels (bitwise the same results for any value; H100, K=1024, D=128, CUDA
# graphs of 20 calls, bench_ann/ab_small_kernels.py, NOTES.md v32): ``prepare``'s elements per program (BLOCK_K
# components x padded D; 4096 -> 512: diag 33.6 -> 20.4 us, spherical 12.9 -> 10.6), the partials' reduction per
# covariance type (elements per program, slabs per load; 128 x 32 -> diag 512 x 8: 43.3 -> 28.1 us at 32 slabs,
# 57.4 -> 24.1 at K=4096; spherical 256 x 16: 13.3 -> 12.2, 27.0 -> 13.0) and the sparse pass 2's work-list scan
# (tiles per step, warps; one program per component block scans every tile: 1024 x 4 -> 8192 x 8: 15.7 -> 7.7 us
# at 15,625 tiles, 54.0 -> 24.9 at 65,536).
PREPARE_ELEMS = 512
REDUCE_SIZES = {"spherical": (256, 16), "diag": (512, 8)}
WORK_LIST_BLOCK = 8192
WORK_LIST_WARPS = 8
# Diag bf16, pass 2 on the float32 rows (no operand copy: transient orders, as diag fits run, or copy_rows=False):
# R X and R x^2 take the rows and their float32 squares as two bf16 terms each (x = xh + xl and x^2 = qh + ql to 16
# bits) instead of the bf16-rounded rows, one more product per pair of the sparse pass 2; the logits keep the
# rounded rows. Rounding the rows to 8 bits was most of the statistics' error: a float64 model of the kernel
# (centred SIFT-like rows, K=4096, 131k rows) puts Sq at 3.4e-3 -> 2.1e-3 and Sx at 2.0e-3 -> 1.6e-3, and the H100
# benchmark measured 5.5e-3 at K=4096 (issue bound 5e-3; kernels/NOTES.md v31). A module switch (read at each
# launch, :func:`_exact_stats`) for A/B runs; the operand-copy path keeps the rounded rows.
BF16_EXACT_STATS = True
# The transient row order (estep's sort_rows) sorts the rows by their block bits, the exact set of component blocks
# whose responsibilities reach 2^-SKIP_LOG2, so that each FLAG_ROWS-row tile mostly holds rows with one bit set and
# the tile's union (pass 2's work) stays near the rows' own fraction; pass 1 then needs no per-element argmax.
# "argmax" (v15) sorts by the most likely component, as kept orders do. A CPU simulation on a fit's state (2^16
# SIFT-like rows, K=1024, float64): tile pairs kept 18.8 % -> 9.7 % spherical, 8.1 % -> 6.7 % diag (rows alone:
# 7.6 % and 6.3 %). A module switch (read at each call) for A/B runs.
TRANSIENT_SORT_KEY = "bits"
# The diag "tf32" pass 1 without the argmax (transient orders; assign's logZ) as a
# Gluon kernel on Hopper GPUs (kernels/logz_gluon.py: asynchronous wgmma with one wait per component block,
# parameter tiles through a TMA ring), bit for bit the same outputs as _logz_kernel. H100, N=1e6, K=1024, D=128:
# transient pass 1 2.37 -> 2.08-2.20 ms, sorted E-step 3.41 -> 3.28-3.34 ms; the N=1e8 diag fit in 64 MiB 321.6 ->
# 295.3 ms per EM iteration (same process; NOTES.md v21). Since v30 also the diag bf16 pass 1 of the transient
# orders (three bf16 products, A in one term; bit for bit the Triton kernel's outputs): pass 1 1.82-1.89 ->
# 1.73-1.82 ms, diag bf16 fit 2.61 / 2.66 -> 2.58 / 2.52 ms per EM iteration (H100). A module switch (read at each
# call) for A/B runs; the Triton kernel runs everywhere else.
GLUON_PASS1 = True
# ... and for the kept orders' form too (a row order, the operand copy, the flag tiles' bits). Off: no gain
# measured (H100, N=1e6 diag "tf32" fit, same process: 3.18 / 3.24 ms per EM iteration with it, 3.14 / 3.16 without;
# kernel A/B on a fit's state: pass 1 2.49-2.91 vs 2.49-2.55 ms; NOTES.md v22). Bit for bit the same outputs either
# way (||x||^2 up to its summation order, which the diag E-step does not read).
GLUON_PASS1_KEPT = False
# The sparse pass 2 launches its programs by component block, the longest work lists first (a block's slabs side by
# side), so that the GPU's block scheduler ends the second wave on the short ones (longest-processing-time first).
# Bitwise the same statistics (each program's work is unchanged). H100, N=1e6, K=1024, D=128: sparse diag pass 2
# 530-556 -> 451-469 us on a fit's state, 909-949 -> 713-721 us on the kernel benchmark's; fits diag "tf32" 2.598 ->
# 2.545, spherical 1.176 -> 1.157, diag bf16 2.380 -> 2.290 ms per EM iteration (NOTES.md v39). A module switch
# (read at each call) for A/B runs.
PASS2_HEAVY_FIRST = True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_kernel_device(device) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter: a clear error otherwise."""
    if device.type != "cuda" and not _interpret():
        raise ValueError("the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")


# granularity of the sparse pass 2's work items (rows x components); pass 1 runs with these tiles when it writes
# the gaps. The interpreter uses 16 x 16 so that tiny test problems have many pairs
FLAG_ROWS = 16 if _interpret() else 64
FLAG_K = 16 if _interpret() else 64


# ----------------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (as fp32): bf16 arithmetic for the interpreter, which has no bf16."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x8000) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _hi(x, MODE: tl.constexpr, EMU: tl.constexpr):
    """GEMM operand of an fp32 tile: as is (0), fp16 (1), bf16 (2, 3); in the interpreter (EMU) the rounded
    values stay fp32 so that the dot product is exact over them."""
    if MODE == 1:
        if EMU:
            out = x.to(tl.float16).to(tl.float32)
        else:
            out = x.to(tl.float16)
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

    Accumulating in place (rather than ``acc += dot``) keeps one register accumulator per GEMM (a fresh product
    per term cost a second accumulator and register spills, see NOTES.md)."""
    if MODE == 0 or EMU:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, MODE: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b; for MODE 3 the split product lo.hi + hi.lo + hi.hi, small terms first."""
    if MODE == 3:
        acc = _dot(a_lo, b_hi, acc, MODE, EMU)
        acc = _dot(a_hi, b_lo, acc, MODE, EMU)
    return _dot(a_hi, b_hi, acc, MODE, EMU)


@triton.jit
def _row_block(N, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and masks of this program's BLOCK_M rows (int64) and of the BLOCK_D padded features."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return offs_m, offs_m < N, offs_d, offs_d < D


@triton.jit
def _indexed(IDX, offs, mask, HAS_IDX: tl.constexpr):
    """IDX[offs] (int64) when HAS_IDX, else offs (int64): the rows of X processed at positions offs under a row
    order, or the caller's indices of kernel-order components under a component permutation."""
    if HAS_IDX:
        src = tl.load(IDX + offs, mask=mask, other=0).to(tl.int64)
    else:
        src = offs.to(tl.int64)
    return src


@triton.jit
def _load_rows(X, CENTER, offs_m, mask_m, offs_d, mask_d, D: tl.constexpr, HAS_CENTER: tl.constexpr):
    """(BLOCK_M, BLOCK_D) fp32 tile of rows offs_m (source row indices), minus the centre if given; zero outside
    the masks."""
    mask = mask_m[:, None] & mask_d[None, :]
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if HAS_CENTER:
        c = tl.load(CENTER + offs_d, mask=mask_d, other=0.0)
        x = tl.where(mask, x - c[None, :], 0.0)
    return x


@triton.jit
def _row_operands(x, SCALE, SQ_SCALE, DIAG: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr):
    """GEMM operands of an fp32 row tile: (xh, xl, qh, ql, x2).

    x is scaled by SCALE in the fp16 mode; ``x2 = ||x||^2`` (and the diag square ``q = x * x * SQ_SCALE``) are
    formed from the rounded values in the 16-bit modes, so that the logits are exact for the rows the operands
    represent; the lo terms are only meaningful in MODE 3."""
    if MODE == 1:
        x = x * SCALE
    xh = _hi(x, MODE, EMU)
    xl = _lo(x, xh, MODE, EMU)
    if MODE == 1 or MODE == 2:
        xv = xh.to(tl.float32)
    else:
        xv = x
    x2 = tl.sum(xv * xv, axis=1)
    if DIAG:
        if MODE == 1:
            q = xv * xv * SQ_SCALE
        else:
            q = xv * xv
        qh = _hi(q, MODE, EMU)
        if MODE == 1 or MODE == 2:
            # 16-bit modes: a second 16-bit term of the squares, so that qh + ql = x~^2 exactly. R^T x^2 needs it
            # (Sq = Sxx - 2 mu Sx + Nk mu^2 cancels by up to mu^2 / var, and one rounding of integer-valued squares
            # is a bias, not noise) and so do the logits (p x~^2 rounded once is off by p x^2 2^-12 per feature:
            # many nats once a variance collapses onto clipped values, and a 10-step diag fit diverged; NOTES.md)
            ql = _hi(q - qh.to(tl.float32), MODE, EMU)
        else:
            ql = _lo(q, qh, MODE, EMU)
    else:
        qh = xh
        ql = xl
    return xh, xl, qh, ql, x2


@triton.jit
def _component_logits(
    xh, xl, qh, ql, x2,             # row tile as GEMM operands (hi, lo), its square (diag only), ||x||^2
    A, A_LO, P, P_LO,               # component parameters in operand form (see prepare)
    BIAS2, COEF2, CST,
    offs_k, mask_k, offs_d, mask_d,
    D: tl.constexpr, DIAG: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_A: tl.constexpr,
):
    """Base-2 logits s = l * log2(e) (BM, BK) and distances (BM, BK, in the accumulator's units) of a row tile
    against one component block. Components k >= K get bias -inf, hence s = -inf and 2^(s - logZ2) = 0."""
    t_ptrs = offs_d[:, None] + offs_k[None, :] * D            # (BD, BK): parameters read transposed
    if EVEN_K:
        t_mask = mask_d[:, None]
        bias = tl.load(BIAS2 + offs_k)
        coef = tl.load(COEF2 + offs_k)
        cst = tl.load(CST + offs_k)
    else:
        t_mask = mask_d[:, None] & mask_k[None, :]
        bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))
        coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
        cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)
    if DIAG:
        p_t = tl.load(P + t_ptrs, mask=t_mask, other=0.0)
        if MODE == 3:
            p_lo_t = tl.load(P_LO + t_ptrs, mask=t_mask, other=0.0)
        else:
            p_lo_t = p_t
        acc = tl.zeros([xh.shape[0], p_t.shape[1]], tl.float32) + cst[None, :]
        if MODE == 1 or MODE == 2:
            # the squares' second 16-bit term: qh + ql is x~^2 exactly, so the logits are those of the represented
            # rows; with qh alone a narrow variance far from the centre turned rounding into logit errors of many
            # nats and a diag fit diverged (NOTES.md)
            acc = _dot(ql, p_t, acc, MODE, EMU)
        acc = _dot3(qh, ql, p_t, p_lo_t, acc, MODE, EMU)
    else:
        acc = x2[:, None] + cst[None, :]
    a_t = tl.load(A + t_ptrs, mask=t_mask, other=0.0)
    if MODE == 3 or SPLIT_A:
        a_lo_t = tl.load(A_LO + t_ptrs, mask=t_mask, other=0.0)
    else:
        a_lo_t = a_t
    if SPLIT_A:     # A's second fp16 term (see DIAG_SPLIT_A), small term first
        acc = _dot(xh, a_lo_t, acc, MODE, EMU)
    dist = _dot3(xh, xl, a_t, a_lo_t, acc, MODE, EMU)
    s = bias[None, :] + coef[None, :] * dist
    return s, dist


@triton.jit
def _lse_update(s, k0, m_i, l_i, best, bits, bmax, WITH_ARGMAX: tl.constexpr, WRITE_GAPS: tl.constexpr,
                ROW_BITS: tl.constexpr, SKIP: tl.constexpr, BLOCK_K: tl.constexpr, NB_PAD: tl.constexpr):
    """One block of the online base-2 log-sum-exp: running max m_i, running sum l_i of 2^(s - m_i), and the
    running argmax (component index offset k0) of s (BM, BK). WRITE_GAPS: sets bit k0 // BLOCK_K of ``bits`` for
    the rows whose bound of log2 r in this block, ``max_k s - m_new``, is >= -SKIP (the log-normaliser is at least
    the final maximum, which is at least m_new). ROW_BITS: keeps the block's row maxima in column k0 // BLOCK_K of
    ``bmax`` (BM, NB_PAD), for bits against the final maximum (:func:`_final_row_bits`)."""
    if WITH_ARGMAX:
        s_max, s_arg = tl.max(s, axis=1, return_indices=True)
        best = tl.where(s_max > m_i, s_arg + k0, best)
    else:
        s_max = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, s_max)
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
    if WRITE_GAPS:
        bit = tl.full([], 1, tl.int64) << (k0 // BLOCK_K).to(tl.int64)
        bits |= tl.where(s_max - m_new >= -SKIP, bit, 0)
    if ROW_BITS:
        cols = tl.arange(0, NB_PAD)
        bmax = tl.where(cols[None, :] == k0 // BLOCK_K, s_max[:, None], bmax)
    return m_new, l_i, best, bits, bmax


@triton.jit
def _final_row_bits(bmax, m_i, SKIP: tl.constexpr, NB_PAD: tl.constexpr):
    """Per row (BM,) int64: bit b set when block b's largest logit is within SKIP of the row's final maximum
    m_i, an upper bound of log2 r over the block (logZ >= the maximum). Exact for the row in any visiting order
    (the running-maximum bits of WRITE_GAPS are only tight when the best block comes first)."""
    cols = tl.arange(0, NB_PAD)
    one = tl.full([NB_PAD], 1, tl.int64) << cols.to(tl.int64)
    return tl.sum(tl.where(bmax - m_i[:, None] >= -SKIP, one[None, :], 0), axis=1)   # distinct powers: OR


# ----------------------------------------------------------------------------------------------------------
# autotune configs: a small generator plus pruning (never keyed on n)
# ----------------------------------------------------------------------------------------------------------
_SMEM_BUDGET = 220 * 1024     # a rough estimate: configs that still do not fit fail and are skipped


def _esize(mode):
    return 4 if mode in (0, 3) else 2      # mode 3 keeps fp32 tiles and two bf16 terms


def _smallest(configs, m=3):
    """Fallback when the estimate rejects every config: the m smallest, so that the autotuner still benchmarks
    (and skips the ones that run out of resources) instead of launching a single config that may fail."""
    return sorted(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"], c.num_stages))[:m]


def _row_configs():
    if _interpret():    # one config (the interpreter cannot benchmark); 32 rows = two flag tiles per program
        return [triton.Config({"BLOCK_M": 2 * FLAG_ROWS, "BLOCK_K": FLAG_K}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                                 (64, 128, 8, 2), (128, 64, 4, 3), (256, 64, 8, 2), (256, 64, 8, 3))]


def _prune_row(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}           # constexprs arrive as keyword arguments
    gaps = bool(named_args.get("WRITE_GAPS", False)) or bool(named_args.get("ROW_BITS", False))
    D, K = named_args["D"], named_args["K"]
    diag, es = bool(named_args.get("DIAG", False)), _esize(named_args.get("MODE", 1))
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages
        ops = (3 if named_args.get("SPLIT_A", False) else 2) if diag else 1   # parameter tiles: P, A (A's 2nd term)
        row_tiles = (3 if named_args.get("MODE", 1) in _COPY_MODES else 2) if diag else 1   # x, x^2 (2 terms)
        smem = row_tiles * bm * bd * es + st * ops * bk * bd * es
        if bk > max(16, triton.next_power_of_2(K)) or smem > _SMEM_BUDGET:
            continue
        if bm * bd * row_tiles * es > 256 * 128 * 4 or (bm * bk) / (32 * c.num_warps) > 64:   # registers
            continue
        keep.append(c)
    if gaps:    # the gaps' granularity is fixed (FLAG_ROWS x FLAG_K pairs): a program covers whole flag tiles
        # (128-row programs halve the means' traffic of 64-row ones: pass 1 0.94 -> 0.81 ms, H200, NOTES v6d)
        return [c for c in keep or configs if c.kwargs["BLOCK_M"] % FLAG_ROWS == 0 and c.kwargs["BLOCK_K"] == FLAG_K] \
            or [triton.Config({"BLOCK_M": FLAG_ROWS, "BLOCK_K": FLAG_K}, num_warps=4, num_stages=3)]
    return keep or _smallest(configs)


def _stats_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in ((64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                                 (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3),
                                 (32, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1), (16, 32, 4, 1))]


def _prune_stats(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    D, K, diag, mode = named_args["D"], named_args["K"], named_args["DIAG"], named_args["MODE"]
    es = _esize(mode)
    bd = triton.next_power_of_2(D)
    keep = []
    for c in configs:
        bm, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages
        ops = 2 if diag else 1
        copy = named_args.get("COPY", False)
        fp32_rows = mode in _COPY_MODES and not copy     # 16-bit modes without the copy: one fp32 row tile
        # pipelined row tiles: the operand copy's rows, squares (and their 16-bit second term), or the fp32 rows
        tiles = 1 if fp32_rows or not diag else (3 if mode in _COPY_MODES else 2)
        tile_bytes = 2 if copy else 4
        param_tiles = ops + (1 if named_args.get("SPLIT_A", False) else 0)   # P, A (and A's second term)
        smem = param_tiles * bk * bd * es + st * tiles * bm * bd * tile_bytes
        if bk > max(16, triton.next_power_of_2(K)) or smem > _SMEM_BUDGET:
            continue
        regs = (ops * bk * bd + 2 * bk * bm) / (32 * c.num_warps)   # accumulators + logits/R tiles
        if not copy:    # fp32 tiles converted in the loop; in the 16-bit modes one tile, transient (half weight:
            #             sm_90a compile report, diag "tf32" 32 x 128 / 8 warps: 254 registers, no spills, 152 KiB)
            regs += ops * bm * bd * (1 if mode == 0 else 2) / ((2 if fp32_rows else 1) * 32 * c.num_warps)
        if regs > (260 if fp32_rows else 200):
            continue
        keep.append(c)
    if named_args.get("SPARSE", False):       # work items are FLAG_ROWS x FLAG_K
        fits = [c for c in keep or configs if c.kwargs["BLOCK_K"] == FLAG_K and FLAG_ROWS % c.kwargs["BLOCK_M"] == 0]
        return fits or [triton.Config({"BLOCK_M": min(32, FLAG_ROWS), "BLOCK_K": FLAG_K}, num_warps=4, num_stages=3)]
    return keep or _smallest(configs)


# ----------------------------------------------------------------------------------------------------------
# pass 1: logZ (and argmax, ||x||^2, the operand copy), split over rows
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bit_or(a, b):
    return a | b


@triton.autotune(configs=_row_configs(), key=["K", "D", "DIAG", "MODE", "PIPE", "HAS_ORDER", "WRITE_GAPS", "SKIP",
                                              "SPLIT_A", "ROW_BITS"],
                 prune_configs_by={"early_config_prune": _prune_row})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _logz_kernel(
    # pointers: data and centre, row order (source rows, start hints), component parameters, outputs
    X, CENTER, ROWS, HINT, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
    LOGZ, LZP, X2, BEST, XO, XQ, XQL, SCALES, GAPS, ROWBITS,
    # sizes (rows are contiguous, stride D)
    N, K,
    # compile-time: feature dims, flags, tiles
    D: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr, HAS_CENTER: tl.constexpr,
    WITH_ARGMAX: tl.constexpr, WRITE_X2: tl.constexpr, WRITE_COPY: tl.constexpr, MODE: tl.constexpr,
    EMU: tl.constexpr, PIPE: tl.constexpr, HAS_ORDER: tl.constexpr, WRITE_GAPS: tl.constexpr, SKIP: tl.constexpr,
    SPLIT_A: tl.constexpr, FLAG_ROWS: tl.constexpr, ROW_BITS: tl.constexpr, NB_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # SPLIT_A (diag "tf32"): A enters the logits as two fp16 terms (DIAG_SPLIT_A).
    # Position m processes row ROWS[m] (HAS_ORDER) or row m. Outputs indexed by row (LOGZ, BEST) are written at the
    # source row; those pass 2 streams (LZP, X2, the operand copy) at the position. WRITE_GAPS (BLOCK_M a multiple
    # of FLAG_ROWS, BLOCK_K = FLAG_K, at most 64 blocks): GAPS[tile] (int64) has bit b set when some row of the
    # FLAG_ROWS-row flag tile has a bound of log2 r in block b >= -SKIP: the sparse pass 2's work. Row-local bits,
    # one OR-reduction per flag tile at the end. ROW_BITS (BLOCK_K = FLAG_K, NB_PAD >= the number of blocks, at
    # most 64): ROWBITS[row] gets the row's block bits against its final maximum (any visiting order; the input of
    # a transient row order, see estep's sort_rows).
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    src = _indexed(ROWS, offs_m, mask_m, HAS_ORDER)
    x = _load_rows(X, CENTER, src, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, qh, ql, x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), DIAG, MODE, EMU)
    if WRITE_COPY:
        cp = offs_m[:, None] * D + offs_d[None, :]
        cmask = mask_m[:, None] & mask_d[None, :]
        tl.store(XO + cp, xh, mask=cmask)
        if DIAG:
            tl.store(XQ + cp, qh, mask=cmask)
            tl.store(XQL + cp, ql, mask=cmask)

    # component blocks are visited from the block of the tile's hinted component (its first row's most likely
    # component in the previous E-step), so that the running maxima are near final early and skipping pays
    num_kb = tl.cdiv(K, BLOCK_K)
    if HAS_ORDER:
        b0 = tl.load(HINT + tl.program_id(0).to(tl.int64) * BLOCK_M) // BLOCK_K
    else:
        b0 = tl.full([], 0, tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)                   # running sum of 2^(s - m)
    best = tl.zeros([BLOCK_M], tl.int32)
    bits = tl.zeros([BLOCK_M], tl.int64)                    # per row: blocks whose bound reaches -SKIP
    if ROW_BITS:
        bmax = tl.full([BLOCK_M, NB_PAD], float("-inf"), tl.float32)   # per row: each block's largest logit
    else:
        bmax = tl.zeros([1, 1], tl.float32)
    if PIPE:
        # software-pipelined: the product of block j + 1 is issued before the exponentials of block j, so that
        # the tensor cores and the exp/ALU work of one warpgroup can overlap (FA3's intra-warpgroup pipelining)
        k_prev = b0 * BLOCK_K
        offs_k = k_prev + tl.arange(0, BLOCK_K)
        s_nxt, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                      offs_k, offs_k < K, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K,
                                      SPLIT_A)
        for j in range(1, num_kb):
            s = s_nxt
            k0 = ((b0 + j) % num_kb) * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            s_nxt, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                          offs_k, offs_k < K, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K,
                                          SPLIT_A)
            m_i, l_i, best, bits, bmax = _lse_update(s, k_prev, m_i, l_i, best, bits, bmax, WITH_ARGMAX,
                                                     WRITE_GAPS, ROW_BITS, SKIP, BLOCK_K, NB_PAD)
            k_prev = k0
        m_i, l_i, best, bits, bmax = _lse_update(s_nxt, k_prev, m_i, l_i, best, bits, bmax, WITH_ARGMAX,
                                                 WRITE_GAPS, ROW_BITS, SKIP, BLOCK_K, NB_PAD)
    else:
        for j in range(0, num_kb):
            k0 = ((b0 + j) % num_kb) * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            s, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                      offs_k, offs_k < K, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K,
                                      SPLIT_A)
            m_i, l_i, best, bits, bmax = _lse_update(s, k0, m_i, l_i, best, bits, bmax, WITH_ARGMAX, WRITE_GAPS,
                                                     ROW_BITS, SKIP, BLOCK_K, NB_PAD)
    logz = (m_i + tl.log2(l_i)) * LN2
    tl.store(LOGZ + src, logz, mask=mask_m)
    if HAS_ORDER:
        tl.store(LZP + offs_m, logz, mask=mask_m)
    if WRITE_X2:
        tl.store(X2 + offs_m, x2, mask=mask_m)
    if WITH_ARGMAX:
        tl.store(BEST + src, best.to(BEST.dtype.element_ty), mask=mask_m)
    if ROW_BITS:
        rb = _final_row_bits(bmax, m_i, SKIP, NB_PAD)
        tl.store(ROWBITS + src, rb.to(ROWBITS.dtype.element_ty), mask=mask_m)
    if WRITE_GAPS:      # one bit set per FLAG_ROWS-row flag tile (BLOCK_M is a multiple of FLAG_ROWS)
        TILES: tl.constexpr = BLOCK_M // FLAG_ROWS
        bits = tl.where(mask_m, bits, 0)        # rows past N (zeros) would add work items to the last tile
        tile_bits = tl.reduce(tl.reshape(bits, [TILES, FLAG_ROWS]), 1, _bit_or)
        ft = tl.program_id(0) * TILES + tl.arange(0, TILES)
        tl.store(GAPS + ft, tile_bits, mask=ft < tl.cdiv(N, FLAG_ROWS))


# ----------------------------------------------------------------------------------------------------------
# pass 2: responsibilities and statistics, split over component blocks x row slabs
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _stats_tile(
    m0, row_hi, X, CENTER, ROWS, XO, XQ, XQL, SCALES, LOGZ, X2,
    a, a_lo, p, p_lo, bias, coef, cst, offs_d, mask_d, acc_nk, acc_sx, acc_sq,
    D: tl.constexpr, DIAG: tl.constexpr, HAS_CENTER: tl.constexpr, MODE: tl.constexpr, COPY: tl.constexpr,
    EMU: tl.constexpr, HAS_ORDER: tl.constexpr, SPLIT_A: tl.constexpr, EXACT_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Adds the BLOCK_M row positions from m0 (those below row_hi) to one component block's Nk, Sx = R X and Sq
    (spherical: sum r dist; diag: R x^2). r enters the products in the operand precision (unbiased rounding that
    averages out over rows). Diag bf16 from the float32 rows (no operand copy): R X and R x^2 take the rows and their
    squares as two bf16 terms each (EXACT_STATS: 16 of x's 24 bits; see BF16_EXACT_STATS), the logits the rounded
    rows."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_hi
    if COPY:                           # the operand copy written by pass 1
        cp = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
        cmask = mask_m[:, None] & mask_d[None, :]
        xh = tl.load(XO + cp, mask=cmask, other=0.0)
        xl = xh
        qh = xh
        ql = xh
        if DIAG:
            qh = tl.load(XQ + cp, mask=cmask, other=0.0)
            ql = tl.load(XQL + cp, mask=cmask, other=0.0)
    else:
        src = _indexed(ROWS, offs_m, mask_m, HAS_ORDER)
        x = _load_rows(X, CENTER, src, mask_m, offs_d, mask_d, D, HAS_CENTER)
        xh, xl, qh, ql, _x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), DIAG, MODE, EMU)
        if EXACT_STATS:
            xl = _hi(x - xh.to(tl.float32), MODE, EMU)            # x = xh + xl to 16 bits
    # rows past the range get logZ = +inf, hence r = 0, without a mask below
    lz2 = tl.load(LOGZ + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    if DIAG:
        acc = tl.zeros([BLOCK_K, BLOCK_M], tl.float32) + cst[:, None]
        if MODE == 1 or MODE == 2:     # the squares' second term, as in _component_logits
            acc = _dot(p, tl.trans(ql), acc, MODE, EMU)
        acc = _dot3(p, p_lo, tl.trans(qh), tl.trans(ql), acc, MODE, EMU)
    else:
        acc = cst[:, None] + tl.load(X2 + offs_m, mask=mask_m, other=0.0)[None, :]
    if SPLIT_A:     # A's second fp16 term, as in _component_logits
        acc = _dot(a_lo, tl.trans(xh), acc, MODE, EMU)
    acc = _dot3(a, a_lo, tl.trans(xh), tl.trans(xl), acc, MODE, EMU)      # (BK, BM) distances
    r = tl.exp2(bias[:, None] + coef[:, None] * acc - lz2[None, :])
    acc_nk += tl.sum(r, axis=1)
    ro = _hi(r, MODE, EMU)
    if MODE == 3 or EXACT_STATS:
        acc_sx = _dot(ro, xl, acc_sx, MODE, EMU)
    acc_sx = _dot(ro, xh, acc_sx, MODE, EMU)
    if DIAG:
        if EXACT_STATS:                # the float32 rows' squares, not the rounded rows' (x^2 = qh + ql to 16 bits)
            q = x * x
            qh = _hi(q, MODE, EMU)
            ql = _hi(q - qh.to(tl.float32), MODE, EMU)
        if MODE != 0:                  # the squares' second term (16-bit modes) or split remainder
            acc_sq = _dot(ro, ql, acc_sq, MODE, EMU)
        acc_sq = _dot(ro, qh, acc_sq, MODE, EMU)
    else:
        acc_sq += tl.sum(r * acc, axis=1)
    return acc_nk, acc_sx, acc_sq


@triton.autotune(configs=_stats_configs(), key=["K", "D", "DIAG", "MODE", "COPY", "HAS_ORDER", "SPARSE", "SPLIT_A",
                                               "EXACT_STATS"],
                 prune_configs_by={"early_config_prune": _prune_stats})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _estep_stats_kernel(
    # pointers: data and centre (modes 0, 3) or its operand copy (modes 1, 2), logZ and ||x||^2 from pass 1,
    # component parameters (A, P in operand form)
    X, CENTER, ROWS, XO, XQ, XQL, SCALES, LOGZ, X2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
    # sparse work lists: WORK[block, i] tile indices (i < COUNTS[block]), row stride WSTRIDE; with HEAVY_FIRST the
    # blocks in launch order (ORDER, longest lists first)
    WORK, COUNTS, WSTRIDE, ORDER,
    # outputs: one partial per slab, (S, K), (S, K, D), (S, K) or (S, K, D)
    NK_PART, SX_PART, SQ_PART,
    # sizes
    N, K, SLAB_ROWS, N_SLABS,
    # compile-time
    D: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr, HAS_CENTER: tl.constexpr,
    MODE: tl.constexpr, COPY: tl.constexpr, EMU: tl.constexpr, HAS_ORDER: tl.constexpr, SPARSE: tl.constexpr,
    SPLIT_A: tl.constexpr, EXACT_STATS: tl.constexpr, HEAVY_FIRST: tl.constexpr, FLAG_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Rows are streamed by position: LOGZ, X2 and the operand copy are in position order (pass 1, or for a transient
    # order the tile-bits kernel, wrote them so: a gather through ROWS here costs pass 2 ~10 %, v40); without the
    # copy, the float32 rows are gathered through ROWS under a row order.
    # Flash-attention-forward shape: the component block plays the queries, the rows the keys and the values.
    # Tiles are (BLOCK_K, BLOCK_M) so that R feeds the second GEMM without a transpose. The component block
    # varies fastest: programs sharing a slab run side by side (L2 reuse). Dense: program (block, slab) streams
    # its slab of rows. SPARSE (BLOCK_K = FLAG_K): it streams its share of the block's work list, FLAG_ROWS-row
    # tiles whose bound of log2 r reaches the threshold; no branch in the loop.
    # HEAVY_FIRST (SPARSE): program pid is slab pid % N_SLABS of block ORDER[pid // N_SLABS], the blocks with the
    # longest work lists first (ranked by the work-list kernel), so that the GPU's block scheduler ends on short
    # programs
    pid = tl.program_id(0)
    num_kb = tl.cdiv(K, BLOCK_K)
    if HEAVY_FIRST:
        pid_k = tl.load(ORDER + pid // N_SLABS)
        pid_s = pid % N_SLABS
    else:
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
    if MODE == 3 or SPLIT_A:
        a_lo = tl.load(A_LO + kd_ptrs, mask=kd_mask, other=0.0)
    p = a
    p_lo = a
    if DIAG:
        p = tl.load(P + kd_ptrs, mask=kd_mask, other=0.0)
        p_lo = p
        if MODE == 3:
            p_lo = tl.load(P_LO + kd_ptrs, mask=kd_mask, other=0.0)
    # invalid components: bias -inf, so r = 2^-inf = 0 there without a mask in the loop
    bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))
    coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
    cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)

    acc_nk = tl.zeros([BLOCK_K], tl.float32)
    acc_sx = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    if DIAG:
        acc_sq = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)   # sum r x^2 (in the square's units)
    else:
        acc_sq = tl.zeros([BLOCK_K], tl.float32)            # sum r ||x - mu||^2 (in the distance's units)

    if SPARSE:
        cnt = tl.load(COUNTS + pid_k)
        i_lo = (pid_s * cnt) // N_SLABS
        i_hi = ((pid_s + 1) * cnt) // N_SLABS
        for i in range(i_lo, i_hi):
            t = tl.load(WORK + pid_k.to(tl.int64) * WSTRIDE + i).to(tl.int64)
            for sub in tl.static_range(FLAG_ROWS // BLOCK_M):
                acc_nk, acc_sx, acc_sq = _stats_tile(
                    t * FLAG_ROWS + sub * BLOCK_M, N, X, CENTER, ROWS, XO, XQ, XQL, SCALES, LOGZ, X2,
                    a, a_lo, p, p_lo, bias, coef, cst, offs_d, mask_d, acc_nk, acc_sx, acc_sq,
                    D, DIAG, HAS_CENTER, MODE, COPY, EMU, HAS_ORDER, SPLIT_A, EXACT_STATS, BLOCK_M, BLOCK_K)
    else:
        row_lo = pid_s * SLAB_ROWS
        row_hi = tl.minimum(row_lo + SLAB_ROWS, N)
        for m0 in range(row_lo, row_hi, BLOCK_M):
            acc_nk, acc_sx, acc_sq = _stats_tile(
                m0, row_hi, X, CENTER, ROWS, XO, XQ, XQL, SCALES, LOGZ, X2,
                a, a_lo, p, p_lo, bias, coef, cst, offs_d, mask_d, acc_nk, acc_sx, acc_sq,
                D, DIAG, HAS_CENTER, MODE, COPY, EMU, HAS_ORDER, SPLIT_A, EXACT_STATS, BLOCK_M, BLOCK_K)

    base_k = pid_s.to(tl.int64) * K + offs_k
    tl.store(NK_PART + base_k, acc_nk, mask=mask_k)
    out_ptrs = base_k[:, None] * D + offs_d[None, :]
    tl.store(SX_PART + out_ptrs, acc_sx, mask=kd_mask)
    if DIAG:
        tl.store(SQ_PART + out_ptrs, acc_sq, mask=kd_mask)
    else:
        tl.store(SQ_PART + base_k, acc_sq, mask=mask_k)


# ----------------------------------------------------------------------------------------------------------
# pass 3: fixed-order float64 reduction of the per-slab partials, units undone, one launch per statistic shape
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _slab_sum(PART, offs_s0, S, stride, offs, mask, S_BLOCK: tl.constexpr):
    """sum over the slabs s < S of PART[s * stride + offs] in float64: S_BLOCK slabs per load (a tile), summed by a
    fixed tree, the tiles in slab order; deterministic (no atomics), and every load of a tile is in flight at once
    (one dependent load per slab was ~1.5 us each: 50 us for 32 slabs)."""
    acc = tl.zeros(offs.shape, tl.float64)
    for s0 in range(0, S, S_BLOCK):
        offs_s = (s0 + offs_s0).to(tl.int64)
        m = (offs_s < S)[:, None] & mask[None, :]
        t = tl.load(PART + offs_s[:, None] * stride + offs[None, :], mask=m, other=0.0)
        acc += tl.sum(t.to(tl.float64), axis=0)
    return acc


@triton.jit
def _reduce_kd_kernel(SX_PART, SQ_PART, NK_PART, MEANS, INV, PERM, SX, SQ, S, K, D: tl.constexpr,
                      DIAG: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """Sx (K, D) and, for diag, Sq = Sxx - 2 mu Sx + Nk mu^2 (K, D): sums over the S slabs (float64, fixed order);
    INV = [1 / x_scale, 1 / (sq_scale x_scale^2), 1 / dist_unit] (float64). The partials are in kernel order; the
    outputs (and MEANS) in the caller's: kernel component j is PERM[j] (HAS_PERM)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_s0 = tl.arange(0, S_BLOCK)
    mask = offs < K * D
    row = offs // D
    dst = _indexed(PERM, row, mask, HAS_PERM) * D + (offs - row * D)
    sx = _slab_sum(SX_PART, offs_s0, S, K * D, offs, mask, S_BLOCK) * tl.load(INV)
    tl.store(SX + dst, sx.to(SX.dtype.element_ty), mask=mask)
    if DIAG:
        sxx = _slab_sum(SQ_PART, offs_s0, S, K * D, offs, mask, S_BLOCK)
        nk = _slab_sum(NK_PART, offs_s0, S, K, row, mask, S_BLOCK)
        mu = tl.load(MEANS + dst, mask=mask, other=0.0).to(tl.float64)
        sq = sxx * tl.load(INV + 1) - 2.0 * mu * sx + nk * mu * mu
        tl.store(SQ + dst, tl.maximum(sq, 0.0).to(SQ.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_k_kernel(NK_PART, SQ_PART, INV, PERM, NK, SQ, S, K, DIAG: tl.constexpr, HAS_PERM: tl.constexpr,
                     BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """Nk (K,) and, for spherical, Sq (K,): sums over the S slabs (float64, fixed order), written in the caller's
    component order (kernel component j is PERM[j] when HAS_PERM)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_s0 = tl.arange(0, S_BLOCK)
    mask = offs < K
    dst = _indexed(PERM, offs, mask, HAS_PERM)
    nk = _slab_sum(NK_PART, offs_s0, S, K, offs, mask, S_BLOCK)
    tl.store(NK + dst, nk.to(NK.dtype.element_ty), mask=mask)
    if not DIAG:
        sq = _slab_sum(SQ_PART, offs_s0, S, K, offs, mask, S_BLOCK)
        tl.store(SQ + dst, tl.maximum(sq * tl.load(INV + 2), 0.0).to(SQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# parameter preparation (prepare): the per-component operands and terms of the logit form, one launch
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _pow2_scale(b, BOUND_LOG2: tl.constexpr):
    """2^clip(BOUND_LOG2 - ceil(log2 b), -100, 100) for a float64 b (ceil(log2 b) := 0 when b is not a finite
    positive number), exactly, from b's bits: :func:`operand_scale`'s value."""
    bits = b.to(tl.int64, bitcast=True)
    ok = (b > 0) & (((bits >> 52) & 0x7FF) != 0x7FF)
    bits = tl.where(ok, bits, 0x3FF0000000000000)                       # 1.0
    e = ((bits >> 52) & 0x7FF) - 1023 + ((bits & 0xFFFFFFFFFFFFF) != 0).to(tl.int64)
    e = tl.minimum(tl.maximum(BOUND_LOG2 - e, -100), 100)
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _prepare_kernel(MEANS, VAR, LW, PERM, MU_ABSMAX, VAR_MIN, XB, xb_value,
                    A, A_LO, P, P_LO, BIAS2, COEF2, CST, SCALES, INV, K,
                    D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr,
                    MODE: tl.constexpr, EMU: tl.constexpr, HAS_PERM: tl.constexpr, XB_PTR: tl.constexpr,
                    SPLIT_A: tl.constexpr):
    """:func:`prepare_reference` for BLOCK_K components (kernel order; component j is PERM[j]), float64 math in
    the same order of operations. MU_ABSMAX: max |means|; VAR_MIN: min var (diag "tf32" only); the rows' bound is
    XB[0] (XB_PTR) or xb_value. Program 0 also writes SCALES (2,) float32 and INV (3,) float64."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m2 = mask_k[:, None] & mask_d[None, :]
    src = _indexed(PERM, offs_k, mask_k, HAS_PERM)
    mu = tl.load(MEANS + src[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float64)
    lw = tl.load(LW + src, mask=mask_k, other=0.0).to(tl.float64)
    bound = tl.load(MU_ABSMAX).to(tl.float64)
    if XB_PTR:
        bound = tl.maximum(bound, tl.load(XB).to(tl.float64))
    else:
        bound = tl.maximum(bound, tl.cast(xb_value, tl.float64))
    one = tl.full((), 1.0, tl.float64)
    if MODE == 1:
        s = _pow2_scale(bound, _FP16_BOUND)
    else:
        s = one
    sq_scale = one
    out2 = offs_k[:, None].to(tl.int64) * D + offs_d[None, :]          # (BLOCK_K, BLOCK_D) kernel-order offsets
    if DIAG:
        v = tl.load(VAR + src[:, None] * D + offs_d[None, :], mask=m2, other=1.0).to(tl.float64)
        prec = 1.0 / v
        bias = lw - 0.5 * (D * LOG2PI + tl.sum(tl.where(m2, tl.log(v), 0.0), 1))
        if MODE == 1:
            sq_scale = one * _SQ_SCALE
            pp = prec / (s * s)
            c_p = _pow2_scale(1.0 / tl.load(VAR_MIN).to(tl.float64) / (s * s), _FP16_BOUND)   # max_j pp
            unit = sq_scale * c_p
            p_t = pp * c_p
            a_t = -2.0 * (s * mu) * pp * unit
        else:
            unit = one
            p_t = prec
            a_t = -2.0 * mu * prec
        p32 = tl.where(m2, p_t, 0.0).to(tl.float32)                      # padding lanes: 0, not 1 / s^2 c_p
        p = _hi(p32, MODE, EMU)
        tl.store(P + out2, p, mask=m2)
        if MODE == 3:
            tl.store(P_LO + out2, _lo(p32, p, MODE, EMU), mask=m2)
        a32 = a_t.to(tl.float32)
        a = _hi(a32, MODE, EMU)
        a64 = a.to(tl.float64)
        if SPLIT_A:
            a_lo = _hi(a32 - a.to(tl.float32), MODE, EMU)      # exact difference; A~ = a + a_lo (22 bits)
            tl.store(A_LO + out2, a_lo, mask=m2)
            a64 = a64 + a_lo.to(tl.float64)
        if MODE == 1 or MODE == 2:
            w = p.to(tl.float64) * sq_scale
            cst = tl.sum(tl.where(w > 0, a64 * a64 / (4.0 * tl.maximum(w, 1e-300)), 0.0), 1)
        else:
            cst = tl.sum(mu * mu * prec, 1)
        coef = tl.zeros([BLOCK_K], tl.float64) - 0.5 / unit
    else:
        v = tl.load(VAR + src, mask=mask_k, other=1.0).to(tl.float64)
        bias = lw - 0.5 * D * (LOG2PI + tl.log(v))
        a32 = ((-2.0 * s) * mu).to(tl.float32)
        a = _hi(a32, MODE, EMU)
        if MODE == 1 or MODE == 2:
            mu_t = a.to(tl.float64) / -2.0
            cst = tl.sum(mu_t * mu_t, 1)
        else:
            cst = tl.sum(mu * mu, 1) * (s * s)
        unit = s * s
        coef = -0.5 / v / unit
    tl.store(A + out2, a, mask=m2)
    if MODE == 3:
        tl.store(A_LO + out2, _lo(a32, a, MODE, EMU), mask=m2)
    tl.store(BIAS2 + offs_k, (bias * LOG2E).to(tl.float32), mask=mask_k)
    tl.store(COEF2 + offs_k, (coef * LOG2E).to(tl.float32), mask=mask_k)
    tl.store(CST + offs_k, cst.to(tl.float32), mask=mask_k)
    if tl.program_id(0) == 0:
        tl.store(SCALES, s.to(tl.float32))
        tl.store(SCALES + 1, sq_scale.to(tl.float32))
        tl.store(INV, 1.0 / s)
        tl.store(INV + 1, 1.0 / (sq_scale * s * s))
        tl.store(INV + 2, 1.0 / unit)


# ----------------------------------------------------------------------------------------------------------
# host side: checks, operand preparation, launchers
# ----------------------------------------------------------------------------------------------------------
def _split_a(mode: int, diag: bool) -> bool:
    """Whether A is kept as two fp16 terms (diag "tf32", see DIAG_SPLIT_A)."""
    return bool(diag and mode == 1 and DIAG_SPLIT_A)


def _exact_stats(mode: int, diag: bool, copy: bool) -> bool:
    """Whether pass 2 takes the float32 rows as two bf16 terms in R X and R x^2 (diag bf16 without the operand
    copy, see BF16_EXACT_STATS)."""
    return bool(BF16_EXACT_STATS and diag and mode == 2 and not copy)


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_launch(x):
    """Checks every launcher shares once shapes are known: the row fits one tile, x is contiguous and on a
    device the kernels can run on."""
    d = x.shape[1]
    if d > MAX_D:
        raise ValueError(f"the fused kernels keep a whole row in one tile and support D <= {MAX_D}, got D={d}; "
                         "use the torch backend for wider data")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous: call x.contiguous() first")
    _check_kernel_device(x.device)


def _check_inputs(x, means, var, log_weights, precision, center=None):
    _check_precision(precision)
    named = [("x", x), ("means", means), ("var", var), ("log_weights", log_weights)]
    if center is not None:
        named.append(("center", center))
    for name, t in named:
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
    if var.shape not in ((k,), (k, d)):
        raise ValueError(f"var must have shape ({k},) (spherical) or ({k}, {d}) (diag), got {tuple(var.shape)}")
    if log_weights.shape != (k,):
        raise ValueError(f"log_weights must have shape ({k},), got {tuple(log_weights.shape)}")
    if center is not None and center.shape != (d,):
        raise ValueError(f"center must have shape ({d},), got {tuple(center.shape)}")
    _check_launch(x)
    return n, d, k


def _bf16_values(t):
    bits = t.view(torch.int32)
    return ((bits + 0x8000) & ~0xFFFF).view(torch.float32)


def _operand_dtype(mode, emu=None):
    emu = _interpret() if emu is None else emu
    if mode == 0 or emu:
        return torch.float32
    return torch.float16 if mode == 1 else torch.bfloat16


def as_operand(t, mode, emu=None):
    """Host-side operand form (hi, lo) of a float64/float32 parameter matrix, matching the kernels' _hi/_lo
    (float32 tensors holding the rounded values in the interpreter)."""
    emu = _interpret() if emu is None else emu
    t32 = t.float().contiguous()
    if mode == 1:
        hi = t32.half().float() if emu else t32.half()
        return hi, hi
    if mode >= 2:
        hi = _bf16_values(t32) if emu else t32.to(torch.bfloat16)
        if mode == 2:
            return hi, hi
        res = t32 - hi.float()
        lo = _bf16_values(res) if emu else res.to(torch.bfloat16)
        return hi, lo
    return t32, t32


def absmax(x, center=None) -> torch.Tensor:
    """Upper bound of |x - center| over a chunk, as a 0-d device tensor (one read of the chunk, no host sync):
    the input of :func:`operand_scale`."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    if center is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(-lo, hi).double()
    from .column_stats import column_stats   # (imports this module) not torch's aminmax(x, dim=0): 264 MiB
    _, lo, hi = column_stats(x)
    return torch.maximum((hi - center).abs(), (lo - center).abs()).max().double()


def _at_least(t: torch.Tensor, bound) -> torch.Tensor:
    """max(t, bound) for a python float or a 0-d tensor bound, without a host-to-device copy (no sync)."""
    if isinstance(bound, torch.Tensor):
        return torch.maximum(t, bound.to(t.dtype))
    return t.clamp_min(float(bound))


def operand_scale(bound, mode: int):
    """Power of two that maps values of magnitude <= ``bound`` (a 0-d tensor) below 2^14 in the fp16 mode (1),
    as a float64 0-d tensor on bound's device; 1 in the other modes. Computed on the device: no host sync."""
    if mode != 1:
        return torch.ones((), dtype=torch.float64, device=bound.device)
    b = bound.double()
    m, e = torch.frexp(torch.where(torch.isfinite(b) & (b > 0), b, torch.ones_like(b)))  # b = m 2^e, m in [0.5, 1)
    e = e.double() - (m == 0.5).double()                                                 # ceil(log2 b), exactly
    return torch.exp2((FP16_BOUND_LOG2 - e).clamp(-100.0, 100.0))


class Params(NamedTuple):
    """Component parameters in kernel form (see :func:`prepare`): operands, per-component terms, unit factors.

    The unit factors live in device tensors read by the kernels (so that preparing never syncs with the host)."""
    a: torch.Tensor          # (K, D) operand of -2 mu (spherical) or -2 mu / var (diag), scaled
    a_lo: torch.Tensor       # (K, D) split remainder (mode 3, diag "tf32": A's second fp16 term) or a
    p: torch.Tensor          # (K, D) operand of 1 / var (diag) or a placeholder
    p_lo: torch.Tensor
    bias2: torch.Tensor      # (K,) log2(e) * (log w - normaliser)
    coef2: torch.Tensor      # (K,) log2(e) * (-1 / 2 var) in the accumulator's distance units
    cst: torch.Tensor        # (K,) ||mu~||^2 (spherical) or sum mu~^2 / var~ (diag) in those units
    scales: torch.Tensor     # (2,) float32 [x_scale, sq_scale], read by the kernels
    inv: torch.Tensor        # (3,) float64 [1 / x_scale, 1 / (sq_scale x_scale^2), 1 / dist_unit] (reduction),
    #                          where the accumulator's distance is dist_unit times the true distance
    comp_perm: torch.Tensor | None = None   # (K,) int64: kernel component j is component comp_perm[j] (or None)


def _means_scale(mu, x_bound, mode):
    """fp16 operand scale (0-d float64 device tensor) for rows bounded by ``x_bound`` and the means mu (K, D)
    float64, whose own magnitude is always included."""
    bound = mu.abs().amax() if mu.numel() else torch.zeros((), dtype=torch.float64, device=mu.device)
    if x_bound is not None:
        bound = _at_least(bound, x_bound)
    return operand_scale(bound, mode)


def _distance_operands(mu, s, mode):
    """``(A, A_lo, cst)`` with ``||x s - mu s||^2 = ||x s||^2 + cst + (x s) . A``: A = -2 s mu (K, D) in operand
    form (scaling by -2 s is exact in every format) and cst (K,) float64, formed from the rounded means in the
    16-bit modes so that the distances are exact for the represented values."""
    a, a_lo = as_operand(-2.0 * s * mu, mode)
    if mode in _COPY_MODES:
        mu_t = a.double() / -2.0
        cst = (mu_t * mu_t).sum(1)
    else:
        cst = (mu * mu).sum(1) * (s * s)
    return a, a_lo, cst


def prepare(means, var, log_weights, precision, x_bound=None, comp_perm=None) -> Params:
    """Per-component parameters of the shared logit form: :func:`prepare_reference`'s result (same arguments),
    computed by one fused kernel (``_prepare_kernel``) after one or two torch reductions, instead of ~40 small
    torch operations (~75 us of GPU time per EM iteration at K=1024 on an H200, most of it launch gaps). Falls back
    to the reference for D > MAX_D or when no kernel can run (a CPU tensor outside the interpreter)."""
    mode = _MODES[precision]
    if means.ndim != 2 or var.ndim not in (1, 2) or var.shape[0] != means.shape[0]:
        raise ValueError(f"means (K, D) and var (K,) or (K, D) expected, got {tuple(means.shape)} and "
                         f"{tuple(var.shape)}")
    k, d = means.shape
    dev = means.device
    if d > MAX_D or k == 0 or (dev.type != "cuda" and not _interpret()):
        return prepare_reference(means, var, log_weights, precision, x_bound, comp_perm)
    if comp_perm is not None:
        comp_perm = _check_perm(comp_perm, k, dev, "comp_perm")
    diag = var.ndim == 2
    means = means.float().contiguous()
    var = var.float().contiguous()
    log_weights = log_weights.float().contiguous()
    mu_absmax = torch.linalg.vector_norm(means, ord=math.inf)            # one reduction, stays on the device
    var_min = var.amin() if diag and mode == 1 else mu_absmax            # the precisions' fp16 scale (diag "tf32")
    xb_ptr = isinstance(x_bound, torch.Tensor)
    xb_value = 0.0
    if x_bound is not None and not xb_ptr:                               # a python bound, rounded up to fp32
        xb_value = float(x_bound)
        xb32 = float(torch.tensor(xb_value, dtype=torch.float32))       # the kernel argument's value
        if math.isfinite(xb_value) and xb32 < xb_value:
            xb_value = math.nextafter(xb32, math.inf)
    op = _operand_dtype(mode)
    a = torch.empty((k, d), dtype=op, device=dev)
    a_lo = torch.empty_like(a) if mode == 3 or _split_a(mode, diag) else a
    p = torch.empty_like(a) if diag else a
    p_lo = torch.empty_like(a) if diag and mode == 3 else p
    bias2 = torch.empty(k, dtype=torch.float32, device=dev)
    coef2 = torch.empty_like(bias2)
    cst = torch.empty_like(bias2)
    scales = torch.empty(2, dtype=torch.float32, device=dev)
    inv = torch.empty(3, dtype=torch.float64, device=dev)
    block_d = max(16, triton.next_power_of_2(d))
    block_k = max(1, min(32, PREPARE_ELEMS // block_d))
    _prepare_kernel[(triton.cdiv(k, block_k),)](
        means, var, log_weights, comp_perm if comp_perm is not None else bias2, mu_absmax, var_min,
        x_bound if xb_ptr else mu_absmax, xb_value, a, a_lo, p, p_lo, bias2, coef2, cst, scales, inv, k,
        D=d, BLOCK_K=block_k, BLOCK_D=block_d, DIAG=diag, MODE=mode, EMU=_interpret(),
        HAS_PERM=comp_perm is not None, XB_PTR=xb_ptr, SPLIT_A=_split_a(mode, diag), num_warps=4)
    return Params(a, a_lo, p, p_lo, bias2, coef2, cst, scales, inv, comp_perm)


def prepare_reference(means, var, log_weights, precision, x_bound=None, comp_perm=None) -> Params:
    """Per-component parameters of the shared logit form (O(K D), float64 torch math, no host sync): the reference
    of :func:`prepare` (which computes the same in one kernel).

    means (K, D), var (K,) or (K, D), log_weights (K,): float32 tensors; ``x_bound``: float, 0-d tensor or None,
    an upper bound of the rows' magnitude (fp16 scale; the means' own magnitude is always included). In the
    16-bit modes ``cst`` is formed from the rounded operands, so that the accumulator holds exactly
    ``||x~ - mu~||^2`` (spherical) or ``sum_j P~_j (x~_j - mu~_j)^2`` (diag) for the represented values.
    ``comp_perm`` (K,) int64 (from :func:`component_order`) lays the components out in that order inside the
    kernels; :func:`estep` returns statistics in the caller's order either way."""
    mode = _MODES[precision]
    if comp_perm is not None:
        comp_perm = _check_perm(comp_perm, means.shape[0], means.device, "comp_perm")
        means, var, log_weights = means[comp_perm], var[comp_perm], log_weights[comp_perm]
    d = means.shape[1]
    dev = means.device
    mu = means.double()
    v = var.double()
    lw = log_weights.double()
    log2pi = math.log(2.0 * math.pi)
    log2e = 1.0 / math.log(2.0)
    s = _means_scale(mu, x_bound, mode)
    sq_scale = torch.ones((), dtype=torch.float64, device=dev)
    if var.ndim == 1:
        a, a_lo, cst = _distance_operands(mu, s, mode)
        p = p_lo = a                                           # unused placeholders
        bias = lw - 0.5 * d * (log2pi + torch.log(v))
        unit = s * s
        coef = -0.5 / v / unit
    else:
        prec = 1.0 / v
        bias = lw - 0.5 * (d * log2pi + torch.log(v).sum(1))
        if mode == 1:
            sq_scale = sq_scale * 2.0 ** -FP16_BOUND_LOG2      # (x s)^2 <= 2^28 -> squares below 2^14
            pp = prec / (s * s)                                 # precision in the scaled rows' units
            c_p = operand_scale(pp.amax(), 1)
            unit = sq_scale * c_p
            p, p_lo = as_operand(pp * c_p, mode)
            a_t = -2.0 * (s * mu) * pp * unit
            a, a_lo = as_operand(a_t, mode)
            if _split_a(mode, True):       # A's second fp16 term, the remainder of the float32 value
                a_lo, _ = as_operand(a_t.float() - a.float(), mode)
        else:
            unit = torch.ones((), dtype=torch.float64, device=dev)
            p, p_lo = as_operand(prec, mode)
            a, a_lo = as_operand(-2.0 * mu * prec, mode)
        if mode in _COPY_MODES:
            w = p.double() * sq_scale                           # weight of (x~ - mu~)^2 per feature
            a64 = a.double() + a_lo.double() if _split_a(mode, True) else a.double()
            cst = torch.where(w > 0, a64 * a64 / (4.0 * w.clamp_min(1e-300)), torch.zeros_like(a64)).sum(1)
        else:
            cst = (mu * mu * prec).sum(1)
        coef = -0.5 / unit * torch.ones_like(bias)
    scales = torch.stack([s, sq_scale]).float()
    inv = torch.stack([1.0 / s, 1.0 / (sq_scale * s * s), 1.0 / unit]).double()
    return Params(a, a_lo, p, p_lo, (bias * log2e).float().contiguous(), (coef * log2e).float().contiguous(),
                  cst.float().contiguous(), scales, inv, comp_perm)


def _check_perm(perm, size, device, name):
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64) or perm.shape != (size,):
        got = f"{type(perm).__name__} {getattr(perm, 'dtype', '')} {tuple(getattr(perm, 'shape', ()))}"
        raise ValueError(f"{name} must be an integer tensor of shape ({size},), a permutation (got {got})")
    if perm.device != device:
        raise ValueError(f"{name} is on {perm.device} but the data are on {device}")
    return perm.long()


class RowOrder(NamedTuple):
    """Order in which the E-step visits the rows of a chunk (see :func:`row_order`).

    Sorting the rows by their most likely component (and the components by proximity, :func:`component_order`)
    makes the rows of a tile share their few relevant component blocks, so that the sparse pass 2 (``SKIP_LOG2``)
    visits few (row tile, component block) pairs. The statistics are sums over rows: any order gives the same
    result up to fp32 summation order (and skipped terms below 2^-SKIP_LOG2[precision]); a stale order only costs
    speed."""
    rows: torch.Tensor       # (n,) int32: position m processes row rows[m]
    hint: torch.Tensor       # (n,) int32: kernel index of the component expected to dominate position m


def component_order(means, block: int = 64, iters: int = 8) -> torch.Tensor:
    """A permutation (K,) int64 that places nearby components next to each other: the means (K, D) are grouped
    by a small k-means into ``ceil(K / block)`` groups (deterministic start: every block-th mean), then sorted
    by group. Cheap (K x groups x D), run on the means' device without a host sync; any permutation is correct."""
    k = means.shape[0]
    g = max(1, -(-k // block))
    mu = means.float()
    cent = mu[torch.arange(0, k, max(1, k // g), device=mu.device)[:g]].clone()
    lab = torch.zeros(k, dtype=torch.int64, device=mu.device)
    for _ in range(iters):
        lab = torch.cdist(mu, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, lab, mu)
        cnt = torch.zeros(g, dtype=mu.dtype, device=mu.device).index_add_(0, lab, torch.ones_like(lab, dtype=mu.dtype))
        cent = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], cent)
    return torch.argsort(lab * k + torch.arange(k, device=mu.device))


def _argsort_components(key, k=None):
    """Stable argsort (int64) of component indices ``key`` (n,) int32 in [0, k): 16-bit keys when k allows (half
    the radix passes; 0.107 ms per 1M rows on an H200, no faster than an unstable 32-bit argsort's 0.101); the
    stable order is deterministic. k None: unknown range, 32-bit keys."""
    return torch.argsort(key.to(torch.int16) if k is not None and k <= 2**15 else key, stable=True)


def row_order(best, comp_perm=None, out: RowOrder | None = None, row_bits=None) -> RowOrder:
    """The :class:`RowOrder` that sorts rows by ``best`` (n,) (each row's most likely component, e.g. returned by
    :func:`estep` with ``return_best=True``), in the kernel component order ``comp_perm`` when given. With
    ``row_bits`` (n,) int32 or int64 (each row's block bits, :func:`estep`'s ``return_row_bits``), the rows are
    sorted by (the best component's FLAG_K-block, block bits) instead: a tile then mostly holds one bit set and
    one best block, which pass 1 visits first (its running-maximum bits are tight), so pass 2's per-tile union
    stays near the rows' own fraction (see ``TRANSIENT_SORT_KEY``). With ``out`` (an order of the same n rows) it
    is written into out's tensors, which keep their addresses (a CUDA graph that reads them stays valid), and out
    is returned. The hint is each position's best component either way."""
    key = best.long()
    if comp_perm is not None:
        rank = torch.empty_like(comp_perm)
        rank[comp_perm] = torch.arange(comp_perm.numel(), device=comp_perm.device)
        key = rank[key]
    key = key.int()
    k = comp_perm.numel() if comp_perm is not None else None
    if row_bits is not None:
        if row_bits.shape != key.shape or row_bits.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row_bits must be int32 or int64 of the shape of best {tuple(key.shape)}, got "
                             f"{row_bits.dtype} {tuple(row_bits.shape)}")
        # lexicographic (block, bits): a stable sort by bits, then a stable sort of that by block
        n_blocks = triton.cdiv(k, FLAG_K) if k is not None else None      # None: unknown, wide keys
        by_bits = _argsort_bits(row_bits, 64 if n_blocks is None else n_blocks)
        block = torch.div(key, FLAG_K, rounding_mode="floor")[by_bits]
        rows = by_bits[_argsort_components(block, n_blocks)]
    else:
        rows = _argsort_components(key, k)
    if out is not None:
        out.rows.copy_(rows)
        torch.index_select(key, 0, rows, out=out.hint)
        return out
    return RowOrder(rows.int(), key[rows].contiguous())



_SM_COUNT = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _gluon_pass1(x, k, diag, mode, with_argmax, kept=False, row_bits=True) -> bool:
    """Whether pass 1 runs as the Gluon kernel (kernels/logz_gluon.py; GLUON_PASS1, and GLUON_PASS1_KEPT for the
    ``kept`` form: a row order, operand copy or flag-tile bits): diag "tf32" (A in two terms) without the argmax,
    and diag bf16 in the transient orders' form only (``row_bits`` asked, not kept: pass 1 -4 to -6 % on an H100; logZ
    alone ran 1-6 % slower than the Triton kernel, NOTES.md v30), on a Hopper GPU, for the shapes that kernel
    supports."""
    precision_ok = _split_a(mode, diag) or (mode == 2 and row_bits and not kept)
    if not (GLUON_PASS1 and (GLUON_PASS1_KEPT or not kept) and diag and precision_ok and not with_argmax
            and not _interpret() and FLAG_ROWS == 64 and FLAG_K == 64):
        return False
    from . import logz_gluon
    return logz_gluon.supported(x, k, x.shape[1])


def launch_logz(x, params: Params, k, diag, precision, with_argmax=False, x2=None, center=None, copy=None,
                order: RowOrder | None = None, lzp=None, gaps=None, skip=None, best=None, row_bits=None):
    """Pass 1 alone: logZ (n,) float32 and, if asked, the argmax (n,) int64 (kernel component index); fills ``x2``
    with ||x||^2 (in the accumulator's units) and ``copy = (xo, xq, xql)`` with the operand copy (rows and, diag,
    the squares and their second 16-bit term) when given. Under a row ``order``, logZ and the argmax are indexed by
    row, ``x2``, the copy and ``lzp`` (logZ again, required) by position. ``gaps`` (cdiv(n, FLAG_ROWS),) int64,
    when given, receives per FLAG_ROWS-row tile the bit set of the FLAG_K-component blocks (at most 64) in which
    some row's bound of log2 r is >= -skip (None: ``SKIP_LOG2[precision]``; the sparse pass 2's input; pass 1 then
    runs with FLAG_K-component blocks and a multiple of FLAG_ROWS rows per program). ``best`` (n,) int32 or
    int64: where the argmax goes (with_argmax; default a new int64 tensor). ``row_bits`` (n,) int16, int32 or int64,
    when given, receives per row the bit set of the FLAG_K-component blocks whose bound of log2 r against the row's
    final maximum is >= -skip, in any row order (int32 holds at most 31 blocks; int16 at most 16, bit 15 wrapped to
    the sign: :func:`tile_bits` masks it back)."""
    n, d = x.shape
    skip = SKIP_LOG2[precision] if skip is None else skip
    logz = torch.empty(n, dtype=torch.float32, device=x.device)
    if order is not None and lzp is None:
        raise ValueError("a row order needs lzp, the position-ordered logZ buffer")
    n_blocks = triton.cdiv(k, FLAG_K)
    if row_bits is not None and (row_bits.shape != (n,) or row_bits.dtype not in _ROW_BITS_BLOCKS
                                 or n_blocks > _ROW_BITS_BLOCKS[row_bits.dtype]):
        raise ValueError(f"row_bits must be int16 (at most 16 blocks), int32 (at most 31) or int64 (at most 64) of "
                         f"shape ({n},); K={k} has {n_blocks} blocks of {FLAG_K}")
    mode = _MODES[precision]
    if gaps is not None and (gaps.shape != (triton.cdiv(n, FLAG_ROWS),) or gaps.dtype != torch.int64
                             or triton.cdiv(k, FLAG_K) > 64):
        raise ValueError(f"gaps must be int64 of shape ({triton.cdiv(n, FLAG_ROWS)},) and K <= {64 * FLAG_K}")
    if _gluon_pass1(x, k, diag, mode, with_argmax, kept=order is not None or copy is not None or gaps is not None,
                    row_bits=row_bits is not None):
        from . import logz_gluon
        logz_gluon.launch_diag_logz(x, params, k, center, skip, row_bits=row_bits, x2=x2, logz=logz, order=order,
                                    lzp=lzp, copy=copy, gaps=gaps)
        return logz, None
    if best is None:
        best = torch.empty(n if with_argmax else 1, dtype=torch.int64, device=x.device)
    xo, xq, xql = copy if copy is not None else (logz, logz, logz)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    rows, hint = order if order is not None else (logz, logz)
    _logz_kernel[grid](x, x if center is None else center, rows, hint, params.a, params.a_lo, params.p,
                       params.p_lo, params.bias2, params.coef2, params.cst, logz, logz if lzp is None else lzp,
                       logz if x2 is None else x2, best, xo, xq, xql, params.scales,
                       logz if gaps is None else gaps, logz if row_bits is None else row_bits, n, k,
                       D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DIAG=diag, HAS_CENTER=center is not None,
                       WITH_ARGMAX=with_argmax, WRITE_X2=x2 is not None, WRITE_COPY=copy is not None, MODE=mode,
                       EMU=_interpret(), PIPE=bool(PIPELINE_LOGZ), HAS_ORDER=order is not None,
                       WRITE_GAPS=gaps is not None, SKIP=float(skip), SPLIT_A=_split_a(mode, diag),
                       FLAG_ROWS=FLAG_ROWS, ROW_BITS=row_bits is not None,
                       NB_PAD=max(2, triton.next_power_of_2(n_blocks)) if row_bits is not None else 1)
    return logz, (best if with_argmax else None)


@triton.jit
def _work_list_kernel(GAPS, WORK, COUNTS, PAIRS, ORDER, TICKET, n_tiles, n_blocks, WSTRIDE, BLOCK: tl.constexpr,
                      HAS_PAIRS: tl.constexpr, RANK: tl.constexpr, NB_PAD: tl.constexpr):
    # program b compacts the tiles whose bit b is set, in ascending order (a scan per BLOCK tiles: deterministic);
    # with PAIRS, adds its count to PAIRS[0] and program 0 the number of pairs to PAIRS[1] (integer atomics: exact).
    # RANK: the last program to finish (a ticket: TICKET zeroed by the caller, one acquire-release add per program
    # after its count's store) ranks the blocks by count, descending, ties by index, and writes ORDER[place] = block:
    # what torch.argsort(counts, descending=True, stable=True) gives, without a sort's launches
    b = tl.program_id(0)
    base = tl.zeros([], tl.int32)
    for t0 in range(0, n_tiles, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        g = tl.load(GAPS + offs, mask=offs < n_tiles, other=0)
        need = ((g >> b.to(tl.int64)) & 1).to(tl.int32)
        pos = base + tl.cumsum(need, 0) - 1
        tl.store(WORK + b.to(tl.int64) * WSTRIDE + pos, offs, mask=need > 0)
        base += tl.sum(need, 0)
    tl.store(COUNTS + b, base)
    if HAS_PAIRS:
        tl.atomic_add(PAIRS, base.to(tl.int64))
        if b == 0:
            tl.atomic_add(PAIRS + 1, n_tiles.to(tl.int64) * n_blocks)
    if RANK:
        if tl.atomic_add(TICKET, 1, sem="acq_rel") == n_blocks - 1:     # every other count is stored and visible
            blk = tl.arange(0, NB_PAD)
            c = tl.load(COUNTS + blk, mask=blk < n_blocks, other=-1, volatile=True)
            ahead = (c[None, :] > c[:, None]) | ((c[None, :] == c[:, None]) & (blk[None, :] < blk[:, None]))
            rank = tl.sum(ahead.to(tl.int32), axis=1)                   # blocks placed before block blk
            tl.store(ORDER + rank, blk, mask=blk < n_blocks)


def _work_lists(gaps, n_blocks, pairs=None, rank=False):
    """The sparse pass 2's work lists from pass 1's per-tile block bits (n_tiles,) int64: ``work`` (n_blocks,
    n_tiles) int32 whose row b starts with the tiles (ascending) that need block b (the rest is not written),
    ``counts`` (n_blocks,) int32 and, with ``rank``, ``order`` (n_blocks,) int32, the blocks by count, descending,
    ties by index (as ``torch.argsort(counts, descending=True, stable=True)``; else None). One launch after a
    one-word fill, no host sync (the torch form, eight ops, cost 0.1-0.2 ms at 15625 tiles on an H200; the
    argsort three more launches, ~10 us). ``pairs``: (2,) int64 or None; adds the kept (tile, block) pairs (the
    sum of ``counts``) and all pairs (n_tiles n_blocks) to it, in the same launch."""
    n_tiles = gaps.shape[0]
    work = torch.empty((n_blocks, max(1, n_tiles)), dtype=torch.int32, device=gaps.device)
    counts = torch.empty(n_blocks, dtype=torch.int32, device=gaps.device)
    order = torch.empty(n_blocks, dtype=torch.int32, device=gaps.device) if rank else None
    ticket = torch.zeros(1, dtype=torch.int32, device=gaps.device) if rank else counts
    if pairs is not None and (pairs.dtype != torch.int64 or pairs.shape != (2,) or pairs.device != gaps.device):
        raise ValueError(f"pair_counts must be a (2,) int64 tensor on {gaps.device}, got {pairs.dtype} "
                         f"{tuple(pairs.shape)} on {pairs.device}")
    _work_list_kernel[(n_blocks,)](gaps, work, counts, counts if pairs is None else pairs,
                                   order if rank else counts, ticket, n_tiles, n_blocks, work.shape[1],
                                   BLOCK=WORK_LIST_BLOCK, HAS_PAIRS=pairs is not None, RANK=bool(rank),
                                   NB_PAD=max(2, triton.next_power_of_2(n_blocks)), num_warps=WORK_LIST_WARPS)
    return work, counts, order


@triton.jit
def _tile_bits_kernel(ROW_BITS, ROWS, GAPS, ROWS32, LOGZ, LZP, X2, X2P, N, n_tiles, FLAG_ROWS: tl.constexpr,
                      TILES: tl.constexpr, WRAP16: tl.constexpr, GATHER: tl.constexpr, HAS_X2: tl.constexpr):
    # GAPS[t] = OR of ROW_BITS[ROWS[p]] over the positions p of flag tile t (the rows it visits in the order).
    # GATHER: also, per position p, ROWS32[p] = ROWS[p] (int32), LZP[p] = LOGZ[ROWS[p]] and (HAS_X2) X2P[p] =
    # X2[ROWS[p]]: the position-ordered inputs of pass 2, in the same pass over the order
    t = tl.program_id(0) * TILES + tl.arange(0, TILES)
    pos = t.to(tl.int64)[:, None] * FLAG_ROWS + tl.arange(0, FLAG_ROWS)[None, :]
    mask = pos < N
    src = tl.load(ROWS + pos, mask=mask, other=0).to(tl.int64)
    b = tl.load(ROW_BITS + src, mask=mask, other=0).to(tl.int64)     # int32 bits: bit 31 is never set
    if WRAP16:
        b = b & 0xFFFF                                                # int16 bits: bit 15 came back sign-extended
    tl.store(GAPS + t, tl.reduce(b, 1, _bit_or), mask=t < n_tiles)
    if GATHER:
        tl.store(ROWS32 + pos, src.to(tl.int32), mask=mask)
        tl.store(LZP + pos, tl.load(LOGZ + src, mask=mask), mask=mask)
        if HAS_X2:
            tl.store(X2P + pos, tl.load(X2 + src, mask=mask), mask=mask)


def tile_bits(row_bits, rows, logz=None, x2=None):
    """Per FLAG_ROWS-row tile of the order ``rows`` (n,) int32 or int64 (position -> row), the OR of the rows' block
    bits ``row_bits`` (n,) int16, int32 or int64 (by row; see :func:`launch_logz`): (cdiv(n, FLAG_ROWS),) int64,
    the sparse pass 2's ``gaps``. With ``logz`` (n,) float32 by row (and ``x2``, same, or None), the same launch
    also gathers pass 2's position-ordered inputs: returns ``(gaps, rows32, lzp, x2p)`` with rows32 (n,) int32 the
    order, lzp = logz[rows] and x2p = x2[rows] (None without x2)."""
    n = rows.shape[0]
    n_tiles = triton.cdiv(n, FLAG_ROWS)
    dev = rows.device
    gaps = torch.empty(n_tiles, dtype=torch.int64, device=dev)
    gather = logz is not None
    rows32 = torch.empty(n, dtype=torch.int32, device=dev) if gather else None
    lzp = torch.empty(n, dtype=torch.float32, device=dev) if gather else None
    x2p = torch.empty(n, dtype=torch.float32, device=dev) if gather and x2 is not None else None
    tiles = 16
    _tile_bits_kernel[(triton.cdiv(n_tiles, tiles),)](
        row_bits, rows, gaps, rows32 if gather else gaps, logz if gather else gaps, lzp if gather else gaps,
        x2 if x2p is not None else gaps, x2p if x2p is not None else gaps, n, n_tiles, FLAG_ROWS=FLAG_ROWS,
        TILES=tiles, WRAP16=row_bits.dtype == torch.int16, GATHER=gather, HAS_X2=x2p is not None, num_warps=4)
    return (gaps, rows32, lzp, x2p) if gather else gaps


_ROW_BITS_BLOCKS = {torch.int16: 16, torch.int32: 31, torch.int64: 64}    # row-bit dtype -> blocks it holds


def _row_bits_buffer(n, n_blocks, device, narrow=False):
    """Per-row block bits (n,): int32 for at most 31 blocks (bit 31 stays clear), int64 up to 64; with ``narrow``,
    int16 for at most 16 blocks (bit 15 wraps to the sign: the sort key itself, :func:`_argsort_bits`)."""
    if narrow and n_blocks <= 16:
        return torch.empty(n, dtype=torch.int16, device=device)
    return torch.empty(n, dtype=torch.int32 if n_blocks <= 31 else torch.int64, device=device)


def _argsort_bits(row_bits, n_blocks):
    """Stable argsort (int64) that groups equal block bit sets ``row_bits`` (n,) int16, int32 or int64: 16-bit keys
    for at most 16 blocks (the narrowing wraps bit 15, a bijection, so equal sets stay adjacent; no copy when the
    bits are int16 already)."""
    return torch.argsort(row_bits.to(torch.int16) if n_blocks <= 16 else row_bits, stable=True)


def transient_order(x, params: Params, k, diag, precision, center=None, x2=None, skip=None, with_best=False):
    """Pass 1 in the rows' own order with each row's exact block bits, then an order of the rows that groups them
    (:data:`TRANSIENT_SORT_KEY`: by block bit set, or by most likely component in the kernel order, grouped by
    prepare's ``comp_perm`` when one is given): the first half of ``estep(sort_rows=True)``. Returns ``(logz,
    best, rows, gaps, lzp, x2p)``: logZ (n,) float32 and best (n,) int32 (kernel component index; None unless
    ``with_best`` or the argmax key) by row, rows (n,) int32 (position -> row, stable), the order's per-tile block
    bits (cdiv(n, FLAG_ROWS),) int64, and pass 2's position-ordered inputs lzp = logZ[rows] and x2p = x2[rows]
    (None without x2), all from one :func:`tile_bits` launch. ``x2``: as in :func:`launch_logz` (by row). The row
    bits are int16 for at most 16 blocks (the sort's keys: no copy)."""
    if TRANSIENT_SORT_KEY not in ("bits", "argmax"):
        raise ValueError(f"TRANSIENT_SORT_KEY must be 'bits' or 'argmax', got {TRANSIENT_SORT_KEY!r}")
    n = x.shape[0]
    n_blocks = triton.cdiv(k, FLAG_K)
    by_bits = TRANSIENT_SORT_KEY == "bits"
    row_bits = _row_bits_buffer(n, n_blocks, x.device, narrow=by_bits)
    with_best = with_best or not by_bits
    best = torch.empty(n, dtype=torch.int32, device=x.device) if with_best else None
    logz, _ = launch_logz(x, params, k, diag, precision, with_argmax=with_best, x2=x2, center=center, skip=skip,
                          best=best, row_bits=row_bits)
    rows = _argsort_bits(row_bits, n_blocks) if by_bits else _argsort_components(best, k)    # int64
    gaps, rows32, lzp, x2p = tile_bits(row_bits, rows, logz, x2)
    return logz, best, rows32, gaps, lzp, x2p


PARTIAL_BYTES = 16 << 20    # bound of the Sx partials (S x K x D float32): caps the slab count for large K D


def slab_layout(n: int, k: int, device, d: int = 128) -> tuple[int, int]:
    """(number of slabs, rows per slab): about two programs per SM, slabs a multiple of 256 rows, and at most
    ``PARTIAL_BYTES`` of Sx partials."""
    target = max(1, (2 * _sm_count(device)) // max(1, triton.cdiv(k, 128)))
    target = min(target, max(1, PARTIAL_BYTES // (4 * k * d)))
    slabs = max(1, min(target, triton.cdiv(n, 2048)))
    slab_rows = triton.cdiv(triton.cdiv(n, slabs), 256) * 256
    return triton.cdiv(n, slab_rows), slab_rows


def estep(x, means, var, log_weights, precision="tf32", center=None, x_absmax=None, params=None, copy_rows=True,
          order: RowOrder | None = None, skip_log2: float | None = None, return_best: bool = False,
          sort_rows: bool = False, return_row_bits: bool = False, pair_counts: torch.Tensor | None = None,
          stats_dtype: torch.dtype = torch.float32):
    """Fused E-step over one chunk; returns ``(log_norm, nk, sx, sq)`` as in ``_torch_backend.estep``.

    Parameters
    ----------
    x : (n, D) float32, contiguous, on the GPU (or the CPU under ``TRITON_INTERPRET=1``)
    means : (K, D) float32, in the centred frame when ``center`` is given
    var : (K,) spherical or (K, D) diag float32 variances
    log_weights : (K,) float32
    precision : {"tf32", "bf16", "bf16x3", "ieee"}
    center : (D,) float32 or None; the kernels subtract it from every row (no centred copy of x is made)
    x_absmax : float or None; an upper bound of ``|x - center|`` (fp16 operand scale); computed when None
    params : :class:`Params` from :func:`prepare` for these means/var/log_weights/precision and a bound of this
        chunk, to skip the O(K D) preparation when several chunks share the parameters
    copy_rows : bool; in the 16-bit modes, pass 1 writes the rows' operand copy for pass 2 (``2 n D`` bytes,
        3 times that for diag; fastest). False: pass 2 re-reads the float32 rows and converts them in its loop (no
        O(n D) buffer at all, so huge chunks fit in a few MiB; slower per row)
    order : :class:`RowOrder` or None; the order in which the rows are visited (:func:`row_order` of the previous
        E-step's ``best``), for block skipping. Any order gives the same statistics up to summation order
    skip_log2 : float or None; with an ``order``, the sparse pass 2's threshold (None: ``SKIP_LOG2[precision]``;
        0: dense pass 2). A (row tile, component block) pair whose responsibilities pass 1 bounds below 2^-skip_log2 is
        skipped, logits included: each dropped term is < 2^-skip_log2. Sparse only for K <= 64 FLAG_K (4096)
    return_best : bool; also return each row's most likely component (argmax of its responsibilities), the input
        of :func:`row_order` for the next E-step
    return_row_bits : bool; also return each row's block bits (n,) int32 (int64 past 31 blocks of FLAG_K), bit b
        set when block b's responsibilities reach 2^-skip_log2 (against the row's final maximum), the other input
        of :func:`row_order`; not with ``sort_rows``
    sort_rows : bool; the sparse pass 2 without a kept order (for data too large to hold one, 8 bytes per row):
        pass 1 visits the rows in their own order and records each row's block bits against its final maximum
        (exact in any order); the rows are then sorted by those bit sets within this call (a transient order,
        freed at return; :data:`TRANSIENT_SORT_KEY`) and pass 2 visits the kept (tile, block) pairs of that order.
        Implies ``copy_rows=False`` (pass 2 gathers the float32 rows); not with ``order``. Same statistics as
        ``order`` up to summation order and dropped terms; ~50 bytes per row while pass 1 and the sort run (bits,
        the sort, logZ and ||x||^2), then ~17 beside the partial sums (bench_ann/estep_memory.py). Sparse only
        for K <= 64 FLAG_K (4096) and ``skip_log2`` > 0, else dense
    pair_counts : (2,) int64 tensor on x's device, or None; when the sparse pass 2 runs, adds to it the number of
        (FLAG_ROWS-row tile, FLAG_K-component block) pairs it visits and the number of pairs there are (inside the
        work-list kernel: no extra launch and no host sync, so a CUDA graph records it). Their ratio is how much of
        the work the data lets the sparse E-step skip (``TritonBackend.dense_above`` reads it)
    stats_dtype : torch.float32 or torch.float64; the dtype of nk, sx and sq. They are sums in float64 over pass 2's
        float32 partials either way: float64 returns them unrounded (a fit's M-step runs in float64: no cast)

    Returns
    -------
    log_norm (n,) float32, nk (K,), sx (K, D), sq (K,) or (K, D) of ``stats_dtype``: statistics in the centred
    frame, in the caller's component order; then best (n,) int64 if ``return_best``, then the row bits if
    ``return_row_bits``
    """
    n, d, k = _check_inputs(x, means, var, log_weights, precision, center)
    diag = var.ndim == 2
    mode = _MODES[precision]
    skip = SKIP_LOG2[precision] if skip_log2 is None else float(skip_log2)
    if not skip >= 0:
        raise ValueError(f"skip_log2 must be >= 0 (0 disables block skipping), got {skip_log2!r}")
    if sort_rows and order is not None:
        raise ValueError("sort_rows=True builds its own transient row order: pass order=None with it")
    if sort_rows and return_row_bits:
        raise ValueError("return_row_bits is for building kept row orders (row_order); not with sort_rows=True")
    sort_rows = bool(sort_rows) and skip > 0 and triton.cdiv(k, FLAG_K) <= 64
    copy_mode = mode in _COPY_MODES and bool(copy_rows) and not sort_rows
    if order is not None:
        if not isinstance(order, RowOrder):
            raise TypeError(f"order must be a RowOrder (see row_order), got {type(order).__name__}")
        for name, t in zip(order._fields, order):
            if t.dtype != torch.int32 or t.shape != (n,) or t.device != x.device:
                raise ValueError(f"order.{name} must be an int32 tensor of shape ({n},) on {x.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}: build it with row_order() for this chunk")
    if params is None:
        if mode == 1 and x_absmax is None:
            x_absmax = absmax(x, center)
        params = prepare(means, var, log_weights, precision, x_absmax)
    perm = params.comp_perm
    if diag:
        means = means.contiguous()   # the diag reduction reads it (no copy when already contiguous)
    dev = x.device
    # ||x~||^2 per row, written by pass 1 for the spherical pass 2 (the diag pass 2 never reads it: no write, v36)
    x2 = None if diag else torch.empty(n, dtype=torch.float32, device=dev)
    lzp = torch.empty(n, dtype=torch.float32, device=dev) if order is not None else None
    copy = None
    if copy_mode:
        dt = _operand_dtype(mode)
        copy = (torch.empty((n, d), dtype=dt, device=dev), torch.empty((n, d) if diag else (1,), dtype=dt, device=dev),
                torch.empty((n, d) if diag else (1,), dtype=dt, device=dev))
    n_blocks = triton.cdiv(k, FLAG_K)
    sparse = (order is not None and skip > 0 and n_blocks <= 64) or sort_rows
    if sort_rows:
        # pass 2 reads logZ (and, spherical, ||x||^2) by position: gathered with the tile bits
        logz, best, rows, gaps, lzp, x2 = transient_order(x, params, k, diag, precision, center=center, x2=x2,
                                                          skip=skip, with_best=return_best)
        order = RowOrder(rows, rows)            # the hint is not read by pass 2
        best = best.long() if return_best else None
    else:
        gaps = torch.empty(triton.cdiv(n, FLAG_ROWS), dtype=torch.int64, device=dev) if sparse else None
        row_bits = _row_bits_buffer(n, n_blocks, dev) if return_row_bits else None
        logz, best = launch_logz(x, params, k, diag, precision, with_argmax=return_best, x2=x2, center=center,
                                 copy=copy, order=order, lzp=lzp, gaps=gaps, skip=skip, row_bits=row_bits)
    # ORDER gets an int32 tensor with the flag on or off: the autotuner keys on the tensor arguments' dtypes, and a
    # None here would tune the two launch orders separately (a different BLOCK_M, different sums)
    heavy_first = sparse and PASS2_HEAVY_FIRST
    work, counts, block_order = (_work_lists(gaps, n_blocks, pair_counts, rank=heavy_first) if sparse
                                 else (logz, logz, logz))

    slabs, slab_rows = slab_layout(n, k, dev, d)
    nk_part = torch.empty((slabs, k), dtype=torch.float32, device=dev)
    sx_part = torch.empty((slabs, k, d), dtype=torch.float32, device=dev)
    sq_part = torch.empty((slabs, k, d) if diag else (slabs, k), dtype=torch.float32, device=dev)
    xo, xq, xql = copy if copy is not None else (x, x, x)

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]) * slabs,)

    try:
        _estep_stats_kernel[grid](x, x if center is None else center, logz if order is None else order.rows,
                                  xo, xq, xql, params.scales, logz if order is None else lzp,
                                  logz if x2 is None else x2,
                                  params.a, params.a_lo, params.p, params.p_lo, params.bias2, params.coef2,
                                  params.cst, work, counts, work.shape[-1] if sparse else 0,
                                  block_order if heavy_first else counts,
                                  nk_part, sx_part, sq_part, n, k, slab_rows, slabs,
                                  D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DIAG=diag,
                                  HAS_CENTER=center is not None, MODE=mode, COPY=copy_mode, EMU=_interpret(),
                                  HAS_ORDER=order is not None, SPARSE=sparse,
                                  SPLIT_A=_split_a(mode, diag), EXACT_STATS=_exact_stats(mode, diag, copy_mode),
                                  HEAVY_FIRST=heavy_first, FLAG_ROWS=FLAG_ROWS)
    except triton.runtime.errors.OutOfResources as e:
        raise RuntimeError(
            f"the E-step statistics kernel for precision={precision!r}, "
            f"{'diag' if diag else 'spherical'} covariances and D={d} needs more shared memory than this GPU "
            f"offers in every autotune config ({e}); use precision='tf32' (the default) or 'ieee'") from e
    del copy, xo, xq, xql, x2, lzp, gaps, work, counts, order   # dead: free the operand copy before the reduction

    nk, sx, sq = reduce_partials(nk_part, sx_part, sq_part, means, params.inv, perm, dtype=stats_dtype)
    if perm is not None and return_best:
        best = perm[best]
    out = (logz, nk, sx, sq) + ((best,) if return_best else ())
    return out + (row_bits,) if return_row_bits else out


def reduce_partials(nk_part, sx_part, sq_part, means, inv, perm=None, dtype=torch.float32):
    """The statistics from pass 2's per-slab partials: a fixed-order float64 sum over the S slabs with the units
    undone, in two launches and without a host sync. nk_part (S, K), sx_part (S, K, D), sq_part (S, K, D) (diag:
    scaled Sxx) or (S, K) (spherical: scaled Sq), float32, in kernel component order; means (K, D) float32
    (diag: Sq = Sxx - 2 mu Sx + Nk mu^2); inv (3,) float64 (``Params.inv``); perm (K,) int64 or None (kernel
    component j is perm[j]). Returns nk (K,), sx (K, D) and sq (K, D) or (K,) in the caller's order, of ``dtype``
    (float32, or float64: the float64 sums unrounded)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    slabs, k, d = sx_part.shape
    diag = sq_part.ndim == 3
    dev = sx_part.device
    nk = torch.empty(k, dtype=dtype, device=dev)
    sx = torch.empty((k, d), dtype=dtype, device=dev)
    sq = torch.empty((k, d) if diag else (k,), dtype=dtype, device=dev)
    block, s_block = REDUCE_SIZES["diag" if diag else "spherical"]
    s_block = min(s_block, triton.next_power_of_2(slabs))
    perm_arg = perm if perm is not None else nk                  # (written back to the caller's component order)
    _reduce_kd_kernel[(triton.cdiv(k * d, block),)](sx_part, sq_part, nk_part, means, inv, perm_arg, sx, sq,
                                                     slabs, k, D=d, DIAG=diag, HAS_PERM=perm is not None,
                                                     BLOCK=block, S_BLOCK=s_block, num_warps=4)
    _reduce_k_kernel[(triton.cdiv(k, block),)](nk_part, sq_part, inv, perm_arg, nk, sq, slabs, k, DIAG=diag,
                                               HAS_PERM=perm is not None, BLOCK=block, S_BLOCK=s_block, num_warps=4)
    return nk, sx, sq
