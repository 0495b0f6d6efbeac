"""Collapsed components: the Triton backend's exact path for components whose expanded logits cancel.

The kernels compute every logit from one expansion, ``sum_d p_kd (x_d^2 - 2 x_d mu_kd + mu_kd^2)`` with
``p = 1 / (2 var)``, accumulated in float32. Its rounding error for the pair (row i, component k) is at most about
``EXPANSION_ERROR * eps32 * (A_ik + C_k)`` nats (``_torch_backend.expansion_terms``), where ``A_ik = sum_d x_id^2
p_kd`` and ``C_k = sum_d mu_kd^2 p_kd``. Since ``x^2 <= 2 (x - mu)^2 + 2 mu^2``, ``A_ik <= 2 Q_ik + 2 C_k`` (``Q_ik``
the exact quadratic form), so the error is at most ``EXPANSION_ERROR * eps32 * (2 Q_ik + 3 C_k)``: a relative
~1e-6 of ``Q_ik`` (float32's resolution of any logit, and only large for pairs whose responsibility is 0 anyway)
plus a per-component term. That term is large for a component with a variance far below its mean's squared
magnitude in some feature: a component collapsed onto duplicate rows, its variance at the ``reg_covar`` floor in a
feature whose centred value is far from 0. Real data have them in diag fits (SIFT, MNIST: features that are 0
throughout a cluster, centred to minus the feature's mean; siftsmall, K=64: 11 of 64 components, bounds up to
5.7e4 nats), and the kernels' logits of such a component's own rows were off by 1e2-1e5 nats (NOTES.md v45).

The Triton backend keeps every component whose term ``3 EXPANSION_ERROR eps32 C_k`` exceeds ``COLLAPSED_NATS``
out of the kernels and treats the rows those components explain in torch:

1. the kernels run with the collapsed components switched off (:func:`split`: log weight ``OFF_LOG_WEIGHT``, a
   finite -1e30 so that a block of them is harmless in the kernels' online log-sum-exp, and the largest variance,
   so that the kernels' fp16 operand scales stay those of the other components);
2. the collapsed components' log densities are computed in torch (:func:`collapsed_lse`: float64 quadratic forms,
   ``_torch_backend._exact_quad``, or direct differences), giving ``lse_c`` per row;
3. a row whose collapsed components hold more than ``exp(ROW_LOG_SHARE)`` of its likelihood (``lse_c - logZ_safe >
   ROW_LOG_SHARE``) is recomputed by the torch backend: its kernel contribution is replaced by the torch backend's
   (:func:`repair_estep`, :func:`repair_score`, :func:`repair_assign`); every other row's log-likelihood becomes
   ``logaddexp(logZ_safe, lse_c)`` and its responsibilities are those of the kernels (the collapsed components'
   share, below 1e-13, is dropped as the sparse E-step drops terms below 2^-24).

Step 2 costs a float64 pass over every row, while a collapsed component explains few of them (at K=4096 on 2000
SIFT-like clusters, N=1e6, on an H100: 3-4 components collapsed onto single rows, the exact path took 11-27 ms per
EM iteration where the kernels alone take 4-7 ms). So a :func:`screen` runs first: per collapsed component the
squared differences in its SCREEN_FEATURES narrowest features alone, a lower bound of its quadratic form, give an
upper bound ``ub`` of ``lse_c``. Rows with ``ub - logZ_safe <= threshold - SCREEN_MARGIN`` cannot be recomputed;
their collapsed components hold less than ``exp(threshold - SCREEN_MARGIN)`` of their likelihood (``exp(-31)`` in
the E-step), which is dropped (log-likelihood ``logZ_safe``). The
exact ``lse_c`` is computed for the other rows only. The rule depends on each row's own values, so the results do not
depend on the chunking or the pieces.

In a fit (``GaussianMixture._em``) the M-step's summary counts the collapsed components of the new parameters, and
the next iteration runs with them named (``TritonBackend.exact_components``). A component that collapses during an
iteration the kernels computed has a mean formed from the rows as the kernels' operands hold them ("tf32": 11
significant bits), off its own rows by more than its new spread: on the exact path it would lose them and be
re-seeded every other iteration (siftsmall, diag, K=64, on an H100). So an iteration whose new parameters have
collapsed components it did not run with is redone with them added to the exact path.

In a normal problem no component is collapsed and none of this runs (one O(K D) test of the parameters). The
rows recomputed are those of the collapsed components, a few percent of the data in the SIFT fits above; when most
components are collapsed (diag fits of MNIST: all of them, bounds 1e5-1e6 nats) the backend runs the torch backend
on the whole chunk, which is cheaper than recomputing most rows. The path synchronises with the host
(the rows to recompute), so a fit runs its iterations with collapsed components eagerly (no CUDA-graph replay).
It runs after the chunk's kernels, within ``TritonBackend.torch_bytes`` (the fit's memory plan): the repairs stream
over the chunk in pieces of :func:`lse_piece_rows` rows and recompute rows in batches (:func:`redo_batches`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _torch_backend as _tb
from ._chunk_plan import TORCH_BYTES

# a component whose per-component expansion error term (module docstring) exceeds this many nats is collapsed. On
# normal data the term is far below it (SIFT-like benchmark data, K=1024: < 1e-3 nats); collapsed components of
# real data are at 1e2-1e5
COLLAPSED_NATS = 0.1
# rows whose collapsed components hold more than exp(ROW_LOG_SHARE) of their likelihood are recomputed in torch
ROW_LOG_SHARE = -30.0
# the log weight that switches a component off inside the kernels: finite, so that a block of switched-off
# components seen first by the kernels' online log-sum-exp gives no inf - inf; exp of it is 0 against any real logit
OFF_LOG_WEIGHT = -1e30
# device memory of collapsed_lse per row of a piece (upper estimates of its peak allocations; H100,
# bench_ann/results/v47_torch_bytes: at most 2.96 kB per row at D=128 with 16 collapsed components, against 3.84 kB
# here): per feature the centred float32 row, the float64 row, its square and a direct difference; per collapsed
# component the float64 products, quadratic forms and logits
LSE_FEATURE_BYTES = 24
LSE_COMPONENT_BYTES = 48
# the screen (:func:`screen`): a row is a candidate for the exact log densities only where an upper bound of its
# collapsed components' log-likelihood, from at most SCREEN_FEATURES features per component (the narrowest), comes
# within SCREEN_MARGIN nats of the redo threshold; each (row, component, feature) entry of the bound takes at most
# SCREEN_ENTRY_BYTES of device memory (the gathered float32 value, its float64 difference and weighted square)
SCREEN_FEATURES = 16
SCREEN_MARGIN = 1.0
SCREEN_ENTRY_BYTES = 32
# device memory of :func:`direct_estep` per (row, component, feature) entry: the float64 squared differences and
# one temporary of the same size. A batch of recomputed rows that fits in the torch paths' piece bytes runs it
# instead of the torch backend's E-step (~15 operations instead of ~140: the batches are usually a few rows)
DIRECT_ENTRY_BYTES = 24


def _cancels(means: torch.Tensor, var: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K,) bool: the components whose per-component expansion error term ``3 EXPANSION_ERROR eps C_k`` (eps of
    ``dtype``, C_k = sum_d mu_kd^2 / (2 var_kd)) exceeds COLLAPSED_NATS (module docstring)."""
    half = 0.5 / var.double()
    m2 = means.double().square()
    c = (m2 * half[:, None]).sum(1) if var.ndim == 1 else (m2 * half).sum(1)
    return 3.0 * _tb.EXPANSION_ERROR * torch.finfo(dtype).eps * c > COLLAPSED_NATS


def _log_const(log_weights: torch.Tensor, var: torch.Tensor, d: int) -> torch.Tensor:
    """(m,) float64 ``log w_k - 0.5 (D log 2 pi + log det var_k)`` of components with log weights (m,) and variances
    (m,) spherical or (m, D) diag: the log density at the mean."""
    v64 = var.double()
    if v64.ndim == 1:
        return log_weights.double() - 0.5 * d * (_tb.LOG_2PI + torch.log(v64))
    return log_weights.double() - 0.5 * (d * _tb.LOG_2PI + torch.log(v64).sum(1))


def collapsed_mask(means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(K,) bool on the parameters' device, no host sync: the components whose expanded float32 logits can be off
    by more than COLLAPSED_NATS for their own rows (module docstring).

    means : (K, D) in the centred frame; var : (K,) spherical or (K, D) diag."""
    return _cancels(means, var, torch.float32)


def collapsed_components(means: torch.Tensor, var: torch.Tensor) -> tuple:
    """:func:`collapsed_mask` as a tuple of component indices, read on the host (one sync)."""
    return tuple(torch.nonzero(collapsed_mask(means, var)).flatten().tolist())


class Split(NamedTuple):
    """The parameters the kernels run with when some components are collapsed (:func:`split`)."""
    cols: torch.Tensor          # (m,) int64, the collapsed components (on the parameters' device)
    var: torch.Tensor           # (K,) or (K, D) float32: the collapsed components' variances replaced
    log_weights: torch.Tensor   # (K,) float32: OFF_LOG_WEIGHT at the collapsed components
    torch_only: bool            # most components are collapsed: the torch backend runs the whole chunk


def torch_only(n_collapsed: int, k: int) -> bool:
    """Whether chunks run wholly in the torch backend (no kernel): most of the k components are collapsed."""
    return 2 * n_collapsed > k


def split(var: torch.Tensor, log_weights: torch.Tensor, cols: tuple) -> Split | None:
    """The kernels' parameters with the components ``cols`` (a tuple of indices) switched off; None when empty."""
    if not cols:
        return None
    k = log_weights.shape[0]
    idx = torch.tensor(cols, dtype=torch.int64, device=var.device)
    off = torch.zeros(k, dtype=torch.bool, device=var.device)
    off[idx] = True
    widest = var.amax(0)                 # (D,) diag or () spherical: the largest variance, per feature
    safe_var = torch.where(off[:, None] if var.ndim == 2 else off, widest, var).contiguous()
    safe_lw = log_weights.masked_fill(off, OFF_LOG_WEIGHT).contiguous()
    return Split(idx, safe_var, safe_lw, torch_only(len(cols), k))


def lse_piece_rows(m: int, d: int, piece_bytes: int) -> int:
    """Rows of one piece of :func:`collapsed_lse` for m collapsed components and d features: at most
    ``piece_bytes`` of device memory."""
    return max(1, piece_bytes // (LSE_FEATURE_BYTES * d + LSE_COMPONENT_BYTES * m))


def collapsed_lse(x, center, means, var, log_weights, cols: torch.Tensor,
                  piece_bytes: int = TORCH_BYTES) -> torch.Tensor:
    """(n,) float32 log sum over the collapsed components ``cols`` of w_k N(x_i | mu_k, var_k): their quadratic forms
    in float64 (``_torch_backend._exact_quad``: the expansion, whose error shrinks by 2^29 against float32's, or
    direct differences for a component whose float64 term ``3 EXPANSION_ERROR eps64 C_k`` still exceeds
    COLLAPSED_NATS), in row pieces of at most ``piece_bytes`` (:func:`lse_piece_rows`).

    x (n, D) float32 raw rows, ``center`` (D,) or None; means (K, D), var, log_weights: all components."""
    m64 = means[cols].double()
    v64 = var[cols].double()
    d = x.shape[1]
    const = _log_const(log_weights[cols], v64, d)
    if var.ndim == 1:
        prec = None
        scale = 0.5 / v64
    else:
        prec = 1.0 / v64
        scale = torch.full_like(const, 0.5)
    direct = tuple(torch.nonzero(_cancels(m64, v64, torch.float64)).flatten().tolist())
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = lse_piece_rows(cols.numel(), d, piece_bytes)
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        quad = _tb._exact_quad(xs if center is None else xs - center, m64, prec, direct)
        out[s:s + step] = torch.logsumexp(const - scale * quad, dim=1)
    return out


def rows_to_redo(log_norm_safe: torch.Tensor, lse_c: torch.Tensor, threshold: float = ROW_LOG_SHARE):
    """(r,) int64 ascending: the rows whose collapsed components hold more than exp(threshold) of their likelihood
    (one host sync)."""
    return torch.nonzero(lse_c - log_norm_safe > threshold).flatten()


class Collapsed(NamedTuple):
    """What the repairs need besides the kernels' outputs: the parameters of every component, the collapsed ones
    (``cols``) and the memory of the torch paths."""
    center: torch.Tensor | None     # (D,) or None: subtracted from the raw rows
    means: torch.Tensor             # (K, D) centred frame
    var: torch.Tensor               # (K,) or (K, D)
    log_weights: torch.Tensor       # (K,)
    cols: torch.Tensor              # (m,) int64
    piece_bytes: int                # bound of one piece of collapsed_lse
    batch_rows: int                 # rows recomputed by the torch backend at once

    def lse(self, x):
        return collapsed_lse(x, self.center, self.means, self.var, self.log_weights, self.cols, self.piece_bytes)


class Screen(NamedTuple):
    """Per collapsed component, the features of :func:`screen_bound` (centred frame)."""
    features: torch.Tensor      # (m * r,) int64: component j's r features at j*r .. j*r + r - 1
    means: torch.Tensor         # (m, r) float64: its means there
    weights: torch.Tensor       # (m, r) float64: the coefficients of (x - mu)^2 in its log density there
    const: torch.Tensor         # (m,) float64: log w - 0.5 (D log 2 pi + log det var)


def screen(c: Collapsed, d: int) -> Screen:
    """The screen of the collapsed components ``c.cols`` (module docstring): per component its ``r`` narrowest
    features (largest ``1 / var``; ties by feature index, so the choice is deterministic), ``r`` at most
    SCREEN_FEATURES and small enough that a row's bound takes no more memory than a row of :func:`collapsed_lse`."""
    m = c.cols.numel()
    r = max(1, min(SCREEN_FEATURES, d, (LSE_FEATURE_BYTES * d + LSE_COMPONENT_BYTES * m) // (SCREEN_ENTRY_BYTES * m)))
    v64 = c.var[c.cols].double()
    coef = (0.5 / v64)[:, None].expand(m, d) if v64.ndim == 1 else 0.5 / v64
    const = _log_const(c.log_weights[c.cols], v64, d)
    feats = torch.argsort(coef, dim=1, descending=True, stable=True)[:, :r]
    return Screen(feats.reshape(-1), c.means[c.cols].double().gather(1, feats), coef.gather(1, feats), const)


def screen_bound(xs: torch.Tensor, center, scr: Screen) -> torch.Tensor:
    """(n,) float64: an upper bound of the collapsed components' log-likelihood ``lse_c`` of the raw rows xs (n, D)
    (the quadratic forms restricted to the screen's features, from the same float32 centred values as
    :func:`collapsed_lse`)."""
    m, r = scr.means.shape
    xc = xs[:, scr.features] if center is None else xs[:, scr.features] - center[scr.features]
    diff = xc.double().view(-1, m, r) - scr.means
    return torch.logsumexp(scr.const - (diff * diff * scr.weights).sum(2), dim=1)


def redo_batches(c: Collapsed, x, log_norm_safe, threshold: float = ROW_LOG_SHARE, log_norm_out=None):
    """The rows of ``x`` to recompute, as (r,) int64 ascending index tensors of at most ``c.batch_rows`` rows: those
    whose collapsed components hold more than exp(threshold) of their likelihood against the kernels'
    ``log_norm_safe`` (n,). Streams over x in pieces of :func:`lse_piece_rows` rows (host syncs in each), so that
    it holds one piece and at most a batch of indices. A finite ``threshold`` screens the rows first
    (:func:`screen`; module docstring): the exact ``lse_c`` is computed for the candidates only, or for the whole
    piece when most of it is. ``log_norm_out`` (n,), when given, gets every row's log-likelihood:
    ``logaddexp(log_norm_safe, lse_c)`` for the candidates, ``log_norm_safe`` for the others (the rows yielded are
    then overwritten by their caller)."""
    n, d = x.shape
    step = lse_piece_rows(c.cols.numel(), d, c.piece_bytes)
    scr = screen(c, d) if math.isfinite(threshold) else None
    pending, count = [], 0
    for s in range(0, n, step):
        xs = x[s:s + step]
        safe = log_norm_safe[s:s + step]
        lse_c, near, cand = None, None, None
        if scr is not None:
            near = screen_bound(xs, c.center, scr) - safe > threshold - SCREEN_MARGIN
            cand = torch.nonzero(near).flatten()
        if cand is None or 2 * cand.numel() > xs.shape[0]:       # the whole piece (most rows: no gathers)
            lse_c = c.lse(xs)
            if near is not None:
                lse_c = torch.where(near, lse_c, -math.inf)
            idx = rows_to_redo(safe, lse_c, threshold)
            if log_norm_out is not None:
                log_norm_out[s:s + step] = torch.logaddexp(safe, lse_c)
        else:
            if log_norm_out is not None:
                log_norm_out[s:s + step] = safe
            idx = cand
            if cand.numel():
                lse_c = c.lse(xs[cand])
                sc = safe[cand]
                idx = cand[rows_to_redo(sc, lse_c, threshold)]
                if log_norm_out is not None:
                    log_norm_out[s + cand] = torch.logaddexp(sc, lse_c)
        del lse_c
        if idx.numel():
            pending.append(idx + s)
            count += idx.numel()
        while count >= c.batch_rows:
            rows = torch.cat(pending)
            rest = rows[c.batch_rows:]
            pending, count = ([rest] if rest.numel() else []), rest.numel()
            yield rows[:c.batch_rows]
    if count:
        yield torch.cat(pending)


def direct_estep(x, center, means, var, log_weights):
    """The E-step of rows x (n, D) float32 raw (``center`` (D,) or None subtracted) over every component, in float64
    direct differences (no expansion, so exact for collapsed components too): ``(log_norm (n,) float32, nk (K,),
    sx (K, D), sq (K, D) diag or (K,) spherical)`` float64, sq = sum r (x - mu)^2 around the given means.
    Memory: n K D DIRECT_ENTRY_BYTES bytes; for the repairs' few rows."""
    x64 = (x if center is None else x - center).double()
    m64, v64 = means.double(), var.double()
    d = x.shape[1]
    diff2 = (x64[:, None, :] - m64[None]).square_()                  # (n, K, D)
    if v64.ndim == 1:
        dist = diff2.sum(2)
        lp = _log_const(log_weights, v64, d) - 0.5 * dist / v64
    else:
        lp = _log_const(log_weights, v64, d) - 0.5 * torch.einsum("nkd,kd->nk", diff2, 1.0 / v64)
    log_norm = torch.logsumexp(lp, dim=1)
    r = torch.exp(lp - log_norm[:, None])
    sq = (r * dist).sum(0) if v64.ndim == 1 else torch.einsum("nk,nkd->kd", r, diff2)
    return log_norm.float(), r.sum(0), r.T @ x64, sq


def repair_estep(out, x, c: Collapsed, kernel_estep, torch_estep):
    """``(log_norm, nk, sx, sq)`` of the chunk with every component, from the kernels' E-step ``out`` (first four
    fields) run with the collapsed components ``c.cols`` switched off: the rows the collapsed components explain
    are replaced by an exact E-step (their kernel contribution ``kernel_estep(rows)`` subtracted, then the exact one
    added: :func:`direct_estep` for a batch within ``c.piece_bytes``, else ``torch_estep(rows)``, the torch
    backend's; both callables take raw rows), in batches (:func:`redo_batches`); the other rows' log-likelihoods
    gain the collapsed components' ``lse_c``. Statistics keep the dtype of ``out``'s."""
    log_norm_safe, nk, sx, sq = out[:4]
    log_norm = torch.empty_like(log_norm_safe)
    k, d = c.means.shape
    for rows in redo_batches(c, x, log_norm_safe, log_norm_out=log_norm):
        xa = x[rows]
        ka = kernel_estep(xa)
        if rows.numel() * k * d * DIRECT_ENTRY_BYTES <= c.piece_bytes:
            ta = direct_estep(xa, c.center, c.means, c.var, c.log_weights)
        else:
            ta = torch_estep(xa)
        del xa
        nk = nk - ka[1].to(nk.dtype) + ta[1].to(nk.dtype)
        sx = sx - ka[2].to(sx.dtype) + ta[2].to(sx.dtype)
        sq = sq - ka[3].to(sq.dtype) + ta[3].to(sq.dtype)
        log_norm[rows] = ta[0].to(log_norm.dtype)
    return log_norm, nk, sx, sq.clamp_min_(0.0)


def repair_score(out, x, c: Collapsed, torch_score):
    """``(log_norm, best)`` with every component, from the kernels' ``out`` run with ``c.cols`` switched off: the
    rows the collapsed components explain come from ``torch_score(raw rows)``, in batches."""
    log_norm_safe, best = out
    log_norm = torch.empty_like(log_norm_safe)
    for i, rows in enumerate(redo_batches(c, x, log_norm_safe, log_norm_out=log_norm)):
        ta = torch_score(x[rows])
        log_norm[rows] = ta[0].to(log_norm.dtype)
        if i == 0:
            best = best.clone()
        best[rows] = ta[1].to(best.dtype)
    return log_norm, best


def repair_assign(out, log_norm_safe, x, c: Collapsed, tau: float, torch_assign):
    """CSR ``(counts, lists, resp)`` with every component, from the kernels' ``out`` run with ``c.cols`` switched
    off (``log_norm_safe`` (n,): the kernels' log-likelihoods without the collapsed components): the rows where the
    collapsed components could reach ``tau`` (their share above exp(ROW_LOG_SHARE), or above tau / 2 when that is
    smaller; every row for tau = 0) are replaced by ``torch_assign(raw rows)``, in batches; the other rows keep
    their entries and their order."""
    counts, lists, resp = out
    threshold = min(ROW_LOG_SHARE, math.log(tau / 2.0)) if tau > 0 else -math.inf
    redone = [(rows, *torch_assign(x[rows])) for rows in redo_batches(c, x, log_norm_safe, threshold)]
    if not redone:
        return counts, lists, resp
    rows, c2, l2, r2 = (torch.cat(f) for f in zip(*redone))
    n = counts.numel()
    redo = torch.zeros(n, dtype=torch.bool, device=counts.device)
    redo[rows] = True
    entry_row = torch.repeat_interleave(torch.arange(n, device=counts.device), counts)
    keep = ~redo[entry_row]
    order = torch.argsort(torch.cat([entry_row[keep], torch.repeat_interleave(rows, c2.to(counts.device))]),
                          stable=True)
    lists = torch.cat([lists[keep], l2.to(lists.dtype)])[order]
    resp = torch.cat([resp[keep], r2.to(resp.dtype)])[order]
    counts = counts.clone()
    counts[rows] = c2.to(counts.dtype)
    return counts, lists, resp
