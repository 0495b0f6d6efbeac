"""Fused multi-assignment and scoring: per-row top components without an n x K matrix.

What it computes
----------------
* ``score`` (``predict`` / ``score_samples``): ``logZ_i`` and ``argmax_k l_ik``, the E-step's pass 1 with the
  argmax switched on (``estep._logz_kernel``).
* ``assign``: the contract of ``flashgmm_faiss._torch_backend.assign``: per row the components with
  responsibility ``r_ik = exp(l_ik - logZ_i) > tau``, best first, at most ``max_assign``, and always the best
  one. Two kernels, both after pass 1 (logZ):

  - ``_topk_kernel`` (caps up to ``TOPK_MAX_ASSIGN``): splits the rows, streams the components in BLOCK_K blocks
    and keeps, per row, a running top-M list (M = min(max_assign, K)) of logits and indices in registers; each
    block is merged by M rounds of "largest candidate replaces the smallest kept entry if larger". The (n, M)
    lists are compacted to CSR by the launcher; memory O(n M). Cost: ``O(n K M)`` compare/select work on top of
    the two logit sweeps, so it is for small caps.
  - ``_threshold_kernel`` (larger caps and no cap, the paper's rule): one sweep finds each row's entries with
    r > tau (and its best component) block by block (per block, extraction rounds take each row's next entry; no
    atomics, deterministic), keeps up to W of them in a register tile of int64 keys (r's bits, component), sorts
    the tile per row at the end (``tl.sort``) and writes it into an (n, W) buffer by decreasing r, with the count.
    Rows with more than W entries run again with 2W slots, alone, until all fit; launches wider than
    THRESHOLD_SORT_WIDTH store in component order and are sorted by torch. The first min(count, max_assign) slots
    of each row are placed in the CSR arrays. Entries and count of a row always come from the same launch,
    hence from the same logits. Memory O(n W) plus at most twice the relaunched rows' entries; two logit sweeps
    (logZ, entries) for the rows that fit in W.

Cost of a logit sweep: ``2 n K D`` FLOPs (spherical; diag as the E-step's pass 1) + ``n K`` exps; bytes: X once,
outputs ``12 nnz`` (threshold) or ``12 n M`` (top-M).

Precision: as the E-step (``"tf32"``, ``"bf16"``, ``"bf16x3"``, ``"ieee"``). In "tf32" the 11-bit rows move the
logits by up to a few 1e-2 nats, so small secondary responsibilities are a few percent off float64's (measured:
at most 2-5e-2 relative) and a component within that of tau may flip; the component lists equal float64's on
99.7-100 % of the rows (``bench_ann/results/v42_assign``). Exact ties between components are broken by the lower
index, as ``torch.topk`` usually does.

Caveats: D <= 256; the top-M kernel keeps M <= MAX_ASSIGN = 64 (the threshold kernel has no limit). Tested on:
the CPU interpreter at tiny odd shapes against float64 top-k, and an NVIDIA H200 and an NVIDIA H100 (invariants at
n=4096, K=1000; ``tests/test_kernels.py``). Measured (H100, n=1e6, K=1024, D=128, tau = 1/K, fitted spherical
model, ``bench_ann/bench_assign.py``): top-M kernel 3.25 ms at max_assign=2, threshold kernel 4.95 ms uncapped,
against 92.6 ms for the torch path (v43).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import (LOG2E, _MODES, _check_inputs, _component_logits, _indexed, _interpret, _load_rows, _prune_row,
                    _row_block, _row_operands, _split_a, absmax, launch_logz, prepare)

MAX_ASSIGN = 64          # largest cap of the top-M kernel (its registers and merge grow with M)
TOPK_MAX_ASSIGN = 8      # caps above this run the threshold kernel (bench_ann/bench_assign.py)
# BLOCK_M, BLOCK_K, num_warps, num_stages of _threshold_kernel on a GPU (H100, bench_ann/ab_threshold_assign.py)
THRESHOLD_CONFIG = (64, 32, 4, 2)
THRESHOLD_WIDTH = 8      # output slots per row of the threshold kernel's first launch (rows with more run again)
THRESHOLD_EXTRACT = True  # entries stored by per-row extraction rounds, not by a rank product (_threshold_kernel)
THRESHOLD_SORT_WIDTH = 32  # launches with at most this many slots (a power of two) sort each row in the kernel


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


@triton.jit
def _threshold_kernel(
    # pointers: data and centre, the rows to visit, logZ and best component per source row, component parameters
    X, CENTER, ROWS, LOGZ, BEST, A, A_LO, P, P_LO, BIAS2, COEF2, CST, SCALES,
    # outputs: (M, W) components and responsibilities, (M,) counts
    LISTS, RESP, COUNTS,
    # sizes and the threshold
    M, K, tau,
    # compile-time: dims, flags, output width, tiles
    D: tl.constexpr, BLOCK_D: tl.constexpr, DIAG: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_ROWS: tl.constexpr,
    MODE: tl.constexpr, EMU: tl.constexpr, SPLIT_A: tl.constexpr, W: tl.constexpr, EXTRACT: tl.constexpr,
    SORT: tl.constexpr, KEYS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """For the M rows ROWS[0:M] (HAS_ROWS; else rows 0..M-1): every component with ``r = 2^(s - logZ2) > tau``
    and the row's best component BEST. Position i's first min(count, W) of them, in component order (SORT: by
    decreasing r), go to ``LISTS / RESP [i, :]`` (row-major, width W); COUNTS[i] receives the row's count. Entries
    and count come from the same logits, so a row with count <= W has all of its entries (the launcher relaunches
    the others wider).
    The slot of an entry is its exclusive rank among the block's kept columns: a (BLOCK_M, BLOCK_K) x
    (BLOCK_K, BLOCK_K) product of the 0/1 kept matrix with a strictly upper-triangular matrix of ones on the tensor
    cores (exact: integers <= BLOCK_K), then the row's count so far. EXTRACT: instead, per block, as many rounds as
    the tile's fullest row has entries there, each storing every row's first remaining entry (one (BLOCK_M,)
    store per round instead of masked (BLOCK_M, BLOCK_K) ones). SORT (with EXTRACT; KEYS_W = W, a power of two):
    the entries stay in a (BLOCK_M, W) register tile of int64 keys ``r_bits << 32 | (2^31 - 1 - k)`` (r >= 0, so
    its float32 bits order as r; ties put the lower component first), sorted per row at the end and stored by
    decreasing r, so the launcher needs no per-row sort; KEYS_W = 1 without it."""
    offs_m, mask_m, offs_d, mask_d = _row_block(M, D, BLOCK_M, BLOCK_D)
    src = _indexed(ROWS, offs_m, mask_m, HAS_ROWS)
    x = _load_rows(X, CENTER, src, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, xsh, xsl, x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), DIAG, MODE, EMU)
    lz2 = tl.load(LOGZ + src, mask=mask_m, other=0.0) * LOG2E
    best = tl.load(BEST + src, mask=mask_m, other=-1)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    cols = tl.arange(0, BLOCK_K)
    upper = tl.where(cols[:, None] < cols[None, :], 1.0, 0.0).to(tl.float16)     # (BK, BK): j < i
    row_base = offs_m[:, None] * W
    key_cols = tl.arange(0, KEYS_W)
    keys = tl.full([BLOCK_M, KEYS_W], -1, tl.int64)                              # -1: empty, sorts last
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + cols
        mask_k = offs_k < K
        s, _ = _component_logits(xh, xl, xsh, xsl, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST,
                                 offs_k, mask_k, offs_d, mask_d, D, DIAG, MODE, EMU, EVEN_K, SPLIT_A)
        r = tl.exp2(s - lz2[:, None])
        keep = ((r > tau) | (offs_k[None, :] == best[:, None])) & mask_k[None, :] & mask_m[:, None]
        n_keep = tl.sum(keep.to(tl.int32), axis=1)
        if EXTRACT:
            rem = keep
            for j in range(0, tl.max(n_keep, axis=0)):
                first = tl.min(tl.where(rem, cols[None, :], BLOCK_K), axis=1)        # (BM,): BLOCK_K if none
                hit = cols[None, :] == first[:, None]
                r_first = tl.sum(tl.where(hit, r, 0.0), axis=1)
                slot = cnt + j
                ok = (first < BLOCK_K) & (slot < W)
                if SORT:
                    key = ((r_first.to(tl.int32, bitcast=True).to(tl.int64) << 32)
                           | (2147483647 - (k0 + first)).to(tl.int64))
                    keys = tl.where((key_cols[None, :] == slot[:, None]) & ok[:, None], key[:, None], keys)
                else:
                    tl.store(LISTS + offs_m * W + slot, k0 + first, mask=ok)
                    tl.store(RESP + offs_m * W + slot, r_first, mask=ok)
                rem = rem & (~hit)
        else:
            rank = tl.dot(keep.to(tl.float16), upper, out_dtype=tl.float32).to(tl.int32)
            slot = cnt[:, None] + rank
            ok = keep & (slot < W)
            tl.store(LISTS + row_base + slot, offs_k[None, :] + tl.zeros([BLOCK_M, BLOCK_K], tl.int32), mask=ok)
            tl.store(RESP + row_base + slot, r, mask=ok)
        cnt += n_keep
    if SORT:
        keys = tl.sort(keys, dim=1, descending=True)
        ok = (key_cols[None, :] < tl.minimum(cnt, W)[:, None]) & mask_m[:, None]
        tl.store(LISTS + row_base + key_cols[None, :], (2147483647 - (keys & 2147483647)).to(tl.int32), mask=ok)
        tl.store(RESP + row_base + key_cols[None, :], (keys >> 32).to(tl.int32).to(tl.float32, bitcast=True),
                 mask=ok)
    tl.store(COUNTS + offs_m, cnt, mask=mask_m)


def _threshold_config():
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of _threshold_kernel."""
    if _interpret():
        return 16, 16, 4, 1
    return THRESHOLD_CONFIG


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


def _sorts_in_kernel(w):
    """Whether a ``_threshold_kernel`` launch with ``w`` slots sorts its rows itself (SORT)."""
    return bool(THRESHOLD_EXTRACT) and w <= THRESHOLD_SORT_WIDTH and w & (w - 1) == 0


def _launch_threshold(x, center, params, logz, best, k, tau, diag, mode, rows, w):
    """One ``_threshold_kernel`` launch (THRESHOLD_CONFIG, THRESHOLD_EXTRACT, SORT as ``_sorts_in_kernel(w)``) on
    the rows ``rows`` (int64 indices into x; None: all rows) with ``w`` slots per row: ``(lists (m, w) int32,
    resp (m, w) float32, counts (m,) int64)``, slots past a row's count unwritten; a row's slots by decreasing r
    when the kernel sorts, else in component order."""
    n, d = x.shape
    m = n if rows is None else rows.numel()
    bm, bk, warps, stages = _threshold_config()
    sort = _sorts_in_kernel(w)
    lists = torch.empty((m, w), dtype=torch.int32, device=x.device)
    resp = torch.empty((m, w), dtype=torch.float32, device=x.device)
    counts = torch.empty(m, dtype=torch.int32, device=x.device)
    _threshold_kernel[(triton.cdiv(m, bm),)](
        x, x if center is None else center, logz if rows is None else rows, logz, best, params.a, params.a_lo,
        params.p, params.p_lo, params.bias2, params.coef2, params.cst, params.scales, lists, resp, counts,
        m, k, float(tau), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DIAG=diag,
        HAS_CENTER=center is not None, HAS_ROWS=rows is not None, MODE=mode, EMU=_interpret(),
        SPLIT_A=_split_a(mode, diag), W=w, EXTRACT=bool(THRESHOLD_EXTRACT), SORT=sort, KEYS_W=w if sort else 1,
        BLOCK_M=bm, BLOCK_K=bk, EVEN_K=k % bk == 0, num_warps=warps, num_stages=stages)
    return lists, resp, counts.to(torch.int64)


def threshold_assign(x, means, var, log_weights, tau, max_assign=None, precision="tf32", center=None,
                     x_absmax=None, width=None):
    """CSR multi-assignment by threshold: per row every component with responsibility > tau and the best one,
    best first, at most ``max_assign`` (None: no cap) -- any cap, where :func:`topk_responsibilities` keeps at most
    MAX_ASSIGN.

    x (n, D), means (K, D), var (K,) or (K, D), log_weights (K,): float32. Returns ``(counts (n,) int64,
    lists (nnz,) int64, resp (nnz,) float32)``. Pass 1 (logZ and the argmax), then ``_threshold_kernel`` on all
    rows with ``width`` (default THRESHOLD_WIDTH) slots per row; the rows with more entries than slots run again,
    alone, with twice the slots, until every row fits (each launch's rows are complete: their entries and counts
    come from the same logits). Each row's slots are sorted by decreasing responsibility, ties lower component
    first (in the kernel for launches of at most THRESHOLD_SORT_WIDTH slots, by torch's stable sort for wider
    ones), and the first min(count, max_assign) are placed at the row's CSR offset. Memory
    O(n * width) plus at most twice the entries of the relaunched rows."""
    n, _, k = _check_inputs(x, means, var, log_weights, precision, center)
    if not (0.0 <= float(tau) < 1.0):
        raise ValueError(f"tau must be in [0, 1), got {tau!r}")
    if max_assign is not None and int(max_assign) < 1:
        raise ValueError(f"max_assign must be >= 1, got {max_assign}")
    cap = k if max_assign is None else min(int(max_assign), k)
    width = THRESHOLD_WIDTH if width is None else int(width)
    diag = var.ndim == 2
    mode = _MODES[precision]
    dev = x.device
    params = _params(x, means, var, log_weights, precision, center, x_absmax)
    logz, best = launch_logz(x, params, k, diag, precision, with_argmax=True, center=center)
    kept = torch.empty(n, dtype=torch.int64, device=dev)
    pieces = []       # (rows or None, lists (m, w), resp (m, w), counts (m,), kept (m,), done (m,) bool)
    rows, w = None, min(width, k)
    while True:
        lists, resp, counts = _launch_threshold(x, center, params, logz, best, k, tau, diag, mode, rows, w)
        done = counts <= w
        kept_rows = counts.clamp(max=cap)
        if rows is None:
            kept.copy_(kept_rows)
        else:
            kept[rows] = kept_rows
        pieces.append((rows, lists, resp, counts, kept_rows, done))
        if w >= k or bool(done.all()):
            break
        rows = torch.arange(n, device=dev)[~done] if rows is None else rows[~done]
        w = min(2 * w, k)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    torch.cumsum(kept, 0, out=offsets[1:])
    nnz = int(offsets[-1])
    out_l = torch.empty(nnz + 1, dtype=torch.int64, device=dev)      # the last entry takes the unused slots
    out_r = torch.empty(nnz + 1, dtype=torch.float32, device=dev)
    for rows, lists, resp, counts, kept_rows, done in pieces:
        w = lists.shape[1]
        slot = torch.arange(w, device=dev)
        if not _sorts_in_kernel(w):
            filled = counts.clamp(max=w)
            multi = torch.nonzero((filled >= 2) & done).squeeze(1)     # rows whose slots need sorting
            if multi.numel():
                sub_r, order = torch.sort(torch.where(slot[None, :] < filled[multi][:, None], resp[multi], -1.0),
                                          dim=1, descending=True, stable=True)
                resp[multi] = sub_r
                lists[multi] = torch.gather(lists[multi], 1, order)
        start = offsets[:-1] if rows is None else offsets[rows]
        take = (slot[None, :] < kept_rows[:, None]) & done[:, None]
        dst = torch.where(take, start[:, None] + slot[None, :], nnz).reshape(-1)
        out_l.index_copy_(0, dst, lists.reshape(-1).to(torch.int64))
        out_r.index_copy_(0, dst, resp.reshape(-1))
    return kept, out_l[:nnz], out_r[:nnz]


def assign(x, means, var, log_weights, tau, max_assign, precision="tf32", center=None, x_absmax=None):
    """CSR multi-assignment ``(counts (n,) int64, lists (nnz,) int64, resp (nnz,) float32)``: per row the
    components with responsibility > tau, best first, always the best one, at most ``max_assign`` (None: K).

    Caps up to TOPK_MAX_ASSIGN run the one-sweep top-M kernel (:func:`topk_responsibilities`); larger caps and no
    cap the threshold kernel (:func:`threshold_assign`)."""
    k = means.shape[0]
    if max_assign is not None and int(max_assign) < 1:
        raise ValueError(f"max_assign must be >= 1, got {max_assign}")
    m = k if max_assign is None else min(int(max_assign), k)
    if m > TOPK_MAX_ASSIGN:
        return threshold_assign(x, means, var, log_weights, tau, None if m == k else m, precision, center, x_absmax)
    top_r, top_i = topk_responsibilities(x, means, var, log_weights, m, precision, center, x_absmax)
    keep = top_r > tau
    keep[:, 0] = True
    return keep.sum(1).to(torch.int64), top_i[keep], top_r[keep]
