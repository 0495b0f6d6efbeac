"""Collapsed components (``flashgmm_faiss._collapsed``): the Triton backend keeps components whose float32 expanded
logits cancel out of its kernels and recomputes the rows they explain in torch. Checked against float64 direct
differences, at tiny shapes on the CPU interpreter and at realistic ones on a GPU (``gpu`` tests)."""
from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
from conftest import use_triton_interpreter_without_cuda

HAS_CUDA = use_triton_interpreter_without_cuda()

from flashgmm_faiss import GaussianMixture  # noqa: E402
from flashgmm_faiss import _collapsed  # noqa: E402
from flashgmm_faiss import _torch_backend as tb  # noqa: E402
from flashgmm_faiss import gmm as gmm_module  # noqa: E402
from flashgmm_faiss._triton_backend import (MIN_SPARSE_BLOCKS, TORCH_ENTRY_BYTES, TORCH_FEATURE_BYTES,  # noqa: E402
                                            TritonBackend)

kestep = importlib.import_module("flashgmm_faiss.kernels.estep")   # the module, not the re-exported launcher

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu


def _log_prob64(x, means, var, log_weights):
    """(n, K) float64 log w_k N(x_i | mu_k, var_k) by direct differences (no expansion)."""
    x, m, v, lw = (torch.as_tensor(t).double().cpu() for t in (x, means, var, log_weights))
    v2 = v[:, None].expand_as(m) if v.ndim == 1 else v
    quad = ((x[:, None, :] - m[None]) ** 2 / v2[None]).sum(2)
    return lw - 0.5 * (x.shape[1] * np.log(2 * np.pi) + torch.log(v2).sum(1)) - 0.5 * quad


def _estep64(x, means, var, log_weights):
    """(log_norm, nk, sx, sq) in float64 by direct differences, sq around the given means."""
    lp = _log_prob64(x, means, var, log_weights)
    log_norm = torch.logsumexp(lp, 1)
    r = torch.exp(lp - log_norm[:, None])
    x64, m64 = x.double().cpu(), means.double().cpu()
    d2 = (x64[:, None, :] - m64[None]) ** 2
    sq = torch.einsum("nk,nkd->kd", r, d2)
    return log_norm, r.sum(0), r.T @ x64, (sq.sum(1) if var.ndim == 1 else sq)


def _collapsed_problem(k, n_collapsed, d, diag, seed, repeats=12, extra=60, spread=5.0):
    """Rows: n_collapsed distinct rows far from the origin, each repeated ``repeats`` times, plus ``extra`` random
    rows. Components 0..n_collapsed-1 sit on the repeated rows with variance 1e-6 (collapsed onto them), the others
    on random rows with unit-scale variances. Returns float32 (x, means, var, log_weights) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    dup = torch.randn(n_collapsed, d, generator=g) * spread
    x = torch.cat([dup.repeat_interleave(repeats, 0), torch.randn(extra, d, generator=g) * spread])
    others = x[n_collapsed * repeats:][torch.randperm(extra, generator=g)[:k - n_collapsed]]
    means = torch.cat([dup, others + 0.2 * torch.randn(k - n_collapsed, d, generator=g)])
    shape = (k, d) if diag else (k,)
    var = 2.0 + 20.0 * torch.rand(shape, generator=g)
    var[:n_collapsed] = 1e-6
    lw = torch.log_softmax(torch.randn(k, generator=g), 0)
    return [t.float().contiguous().to(DEVICE) for t in (x, means, var, lw)]


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_collapsed_mask_bounds_the_float32_expansion_error(diag):
    # the float32 expanded quadratic form sum_d p (x^2 - 2 x mu + mu^2), p = 1 / (2 var), against float64 direct
    # differences: its error is within EXPANSION_ERROR eps32 (2 Q + 3 C) for every pair (the module's bound), and
    # collapsed_mask names exactly the components whose per-component term 3 EXPANSION_ERROR eps32 C is large
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((400, 16)) * 5).astype(np.float32)
    mu = np.concatenate([x[:3], rng.standard_normal((3, 16)) * 5]).astype(np.float32)
    var = np.concatenate([np.full((3, 16), 1e-6), rng.uniform(0.5, 30, (3, 16))]).astype(np.float32)
    v = var if diag else var.mean(1)
    p = (0.5 / (v[:, None] if v.ndim == 1 else v) * np.ones_like(mu)).astype(np.float32)
    got = (x * x) @ p.T - 2 * (x @ (mu * p).T) + (mu * mu * p).sum(1)
    x64, m64, p64 = x.astype(np.float64), mu.astype(np.float64), p.astype(np.float64)
    q = np.stack([((x64 - m64[k]) ** 2 * p64[k]).sum(1) for k in range(6)], 1)
    c = (m64 * m64 * p64).sum(1)
    bound = tb.EXPANSION_ERROR * np.finfo(np.float32).eps * (2 * q + 3 * c)
    assert np.all(np.abs(got - q) <= bound)
    assert np.abs(got - q)[:3, :3].max() > 1.0          # the collapsed components' own rows: real damage
    mask = _collapsed.collapsed_mask(torch.as_tensor(mu), torch.as_tensor(v)).numpy()
    assert mask.tolist() == [True] * 3 + [False] * 3
    assert _collapsed.collapsed_components(torch.as_tensor(mu), torch.as_tensor(v)) == (0, 1, 2)


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_triton_backend_recomputes_collapsed_components(diag):
    # FLAG_K collapsed components (one whole block of the kernels, the first they visit) among 2 FLAG_K + 8: the
    # kernels alone are off by up to 1e2 nats on their rows; the backend's estep, score and assign match float64
    k = 2 * kestep.FLAG_K + 8
    x, means, var, lw = _collapsed_problem(k, kestep.FLAG_K, 8, diag, seed=1, repeats=6, extra=2 * k)
    b = TritonBackend("ieee")
    cols = _collapsed.collapsed_components(means, var)
    assert cols == tuple(range(kestep.FLAG_K))
    plain = kestep.estep(x, means, var, lw, precision="ieee")
    ref = _estep64(x, means, var, lw)
    assert (plain[0].double().cpu() - ref[0]).abs().max() > 1.0      # what the kernels alone give
    got = b.estep(x, means, var, lw)
    assert (got.log_norm.double().cpu() - ref[0]).abs().max() < 1e-3
    for name, g, r in zip(("nk", "sx", "sq"), got[1:], ref[1:]):
        err = (g.double().cpu() - r).abs().max() / r.abs().max()
        assert err < 1e-5, (name, err.item())
    log_norm, best = b.score(x, means, var, lw)
    lp = _log_prob64(x, means, var, lw)
    assert (log_norm.double().cpu() - ref[0]).abs().max() < 1e-3
    assert (best.cpu() == lp.argmax(1)).all()
    r64 = torch.exp(lp - ref[0][:, None])
    for tau, cap in ((1.0 / k, None), (1.0 / k, 2), (0.0, 3)):
        counts, lists, resp = b.assign(x, means, var, lw, tau, cap)
        c0, l0, r0 = tb.assign(*(t.double().cpu() for t in (x, means, var, lw)), tau, cap if cap else k)
        assert counts.tolist() == c0.tolist() and lists.tolist() == l0.tolist(), (tau, cap)
        assert np.allclose(resp.double().cpu(), r0, rtol=1e-4, atol=1e-7)
        assert torch.allclose(r64[torch.repeat_interleave(torch.arange(len(x)), c0), l0], r0.double(), rtol=1e-4)


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_collapsed_repairs_stay_within_the_torch_memory_bound(diag, monkeypatch):
    # TritonBackend.torch_bytes (a fit's working_memory plan) bounds the repairs: collapsed_lse's float64 pieces and
    # the batches of rows the torch backend recomputes; a bound of ~17 rows gives the results of one piece
    k = 2 * kestep.FLAG_K + 8
    x, means, var, lw = _collapsed_problem(k, kestep.FLAG_K, 8, diag, seed=1, repeats=6, extra=2 * k)
    whole = TritonBackend("ieee")
    want = (whole.estep(x, means, var, lw), whole.score(x, means, var, lw),
            whole.assign(x, means, var, lw, 1.0 / k, None))
    b = TritonBackend("ieee")
    b.torch_bytes = 17 * (TORCH_ENTRY_BYTES * k + TORCH_FEATURE_BYTES * 8)
    batch = b.torch_piece_rows(k, 8)
    piece = _collapsed.lse_piece_rows(kestep.FLAG_K, 8, b.torch_bytes)
    assert batch == 17 and 10 < piece < 40 and len(x) > 4 * piece
    seen = {"quad": [], "torch": []}

    def spy(name, fn):
        def wrapped(xs, *args, **kwargs):
            seen[name].append(xs.shape[0])
            return fn(xs, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(tb, "_exact_quad", spy("quad", tb._exact_quad))
    for fn in ("estep", "score", "assign"):
        monkeypatch.setattr(tb, fn, spy("torch", getattr(tb, fn)))
    got = (b.estep(x, means, var, lw), b.score(x, means, var, lw), b.assign(x, means, var, lw, 1.0 / k, None))
    assert max(seen["quad"]) == piece and max(seen["torch"]) <= batch and len(seen["torch"]) >= 3 * 6
    ref = _estep64(x, means, var, lw)
    assert (got[0].log_norm.double().cpu() - ref[0]).abs().max() < 1e-3
    for name, g, w, r in zip(("nk", "sx", "sq"), got[0][1:], want[0][1:], ref[1:]):
        # each batch's kernel statistics are subtracted from the chunk's float32 partial sums: within float32
        # rounding of the single-piece result, and float64's as closely as that one (the test above)
        assert (g.double().cpu() - r).abs().max() / r.abs().max() < 1e-5, name
        assert (g.double().cpu() - w.double().cpu()).abs().max() / r.abs().max() < 1e-5, name
    assert torch.allclose(got[1][0], want[1][0], rtol=1e-6, atol=1e-4) and torch.equal(got[1][1], want[1][1])
    assert torch.equal(got[2][0], want[2][0]) and torch.equal(got[2][1], want[2][1])
    assert torch.allclose(got[2][2], want[2][2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_screen_bounds_the_collapsed_likelihood_and_leaves_the_exact_path_to_few_rows(diag, monkeypatch):
    # the screen's bound (the quadratic forms on each collapsed component's narrowest features) is above the float64
    # log-likelihood of the collapsed components for every row; redo_batches computes the exact one only for rows
    # near their own (here the 3 x 4 rows they sit on, out of 212) and yields the rows and log-likelihoods of the
    # unscreened rule (float64 reference: rows with lse_c - logZ_safe > ROW_LOG_SHARE; every other row
    # logaddexp(logZ_safe, lse_c), which is logZ_safe to float32 for the rows the screen drops)
    k, m, d = 12, 3, 8
    x, means, var, lw = _collapsed_problem(k, m, d, diag, seed=3, repeats=4, extra=200)
    center = x.mean(0)
    means = means - center
    cols = torch.arange(m, device=x.device)
    c = _collapsed.Collapsed(center, means, var, lw, cols, 1 << 20, 1 << 20)
    lp = _log_prob64(x - center, means, var, lw)
    lse64 = torch.logsumexp(lp[:, :m], 1)
    safe64 = torch.logsumexp(lp[:, m:], 1)
    ub = _collapsed.screen_bound(x, center, _collapsed.screen(c, d)).cpu()
    assert torch.all(ub >= lse64 - 1e-9 * lse64.abs())
    seen = []
    exact = _collapsed.collapsed_lse
    monkeypatch.setattr(_collapsed, "collapsed_lse",
                        lambda xs, *a, **kw: seen.append(xs.shape[0]) or exact(xs, *a, **kw))
    safe = safe64.float().to(x.device)
    out = torch.empty_like(safe)
    rows = torch.cat(list(_collapsed.redo_batches(c, x, safe, log_norm_out=out))).cpu()
    want = torch.nonzero(lse64 - safe.double().cpu() > _collapsed.ROW_LOG_SHARE).flatten()
    assert rows.tolist() == want.tolist() == list(range(m * 4))
    assert sum(seen) < 2 * m * 4
    ref = torch.logaddexp(safe.double().cpu(), lse64)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[rows] = False
    assert torch.allclose(out.double().cpu()[keep], ref[keep], rtol=1e-6, atol=1e-6)
    # a threshold no row misses: every row is a candidate, the whole piece runs the exact path, same rule
    seen.clear()
    out2 = torch.empty_like(safe)
    rows2 = torch.cat(list(_collapsed.redo_batches(c, x, safe, -1e9, log_norm_out=out2))).cpu()
    assert rows2.tolist() == list(range(len(x))) and seen == [len(x)]


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_direct_estep_of_recomputed_rows_matches_float64(diag):
    # the repairs' E-step of a few rows (direct float64 differences over every component, collapsed ones included)
    # against the float64 reference, with the rows given raw and the centre subtracted inside
    k, m, d = 10, 2, 8
    x, means, var, lw = _collapsed_problem(k, m, d, diag, seed=4, repeats=3, extra=20)
    center = x.mean(0)
    got = _collapsed.direct_estep(x, center, means - center, var, lw)
    ref = _estep64(x - center, means - center, var, lw)
    assert got[0].dtype == torch.float32 and all(t.dtype == torch.float64 for t in got[1:])
    assert torch.allclose(got[0].double().cpu(), ref[0], rtol=1e-6, atol=1e-4)
    for g, r in zip(got[1:], ref[1:]):
        assert torch.allclose(g.cpu(), r, rtol=1e-9, atol=1e-9 * r.abs().max().item())


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_triton_fit_estep_with_a_component_order_and_collapsed_components(diag):
    # the fit's sparse E-step (kept row orders, the component permutation) with collapsed components named by the
    # estimator (exact_components): float64's statistics
    k = MIN_SPARSE_BLOCKS * kestep.FLAG_K + 3
    x, means, var, lw = _collapsed_problem(k, 7, 8, diag, seed=2, extra=2 * k)
    b = TritonBackend("ieee")
    b.x_absmax = float((x - x.mean(0)).abs().max()) * 1.01
    b.exact_components = _collapsed.collapsed_components(means, var)
    ref = _estep64(x, means, var, lw)
    for _ in range(2):      # the first call builds the row order, the second runs under it
        b.begin_em_iteration()
        got = b.fit_estep(0, x, means, var, lw)
        assert (got.log_norm.double().cpu() - ref[0]).abs().max() < 1e-3
        for name, g, r in zip(("nk", "sx", "sq"), got[1:], ref[1:]):
            err = (g.double().cpu() - r).abs().max() / r.abs().max()
            assert err < 5e-5, (name, err.item())     # H100, "ieee" diag sq: 1.6e-5
    assert b.order_stats["sparse_chunks"] == 1 and b.graph_key() is None   # eager: the repair reads rows


def test_triton_backend_runs_torch_when_most_components_collapse():
    x, means, var, lw = _collapsed_problem(5, 3, 6, True, seed=3)
    sp = _collapsed.split(var, lw, _collapsed.collapsed_components(means, var))
    assert sp.torch_only
    b = TritonBackend("ieee")
    got = b.estep(x, means, var, lw)
    want = tb.estep(x, means, var, lw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    ref = _estep64(x, means, var, lw)
    assert (got.log_norm.double().cpu() - ref[0]).abs().max() < 1e-3


@pytest.mark.filterwarnings("ignore::flashgmm_faiss.gmm.ConvergenceWarning")
@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_triton_fit_with_collapsing_components(cov, monkeypatch):
    # 8 distinct rows repeated 20 times among 300 random ones: components collapse onto the duplicates during EM.
    # The Triton fit (which used to be off by 8-30 nats in its scores and by 4-25x in the collapsed variances)
    # ends where the torch backend does, scores as float64 on its own parameters, and lookahead (which discards an
    # iteration issued with a stale set of collapsed components) changes nothing
    g = torch.Generator().manual_seed(0)
    dup = torch.randn(8, 16, generator=g) * 5
    x = torch.cat([dup.repeat_interleave(20, 0), torch.randn(300, 16, generator=g) * 5]).numpy()
    kw = dict(covariance_type=cov, kmeans_iter=2, max_iter=8, tol=0.0, seed=0, device=DEVICE, reg_covar=1e-6)
    monkeypatch.setattr(gmm_module, "MAX_LOOKAHEAD_SECONDS", float("inf"))
    fits = {}
    for lookahead in (False, True):
        fit = GaussianMixture(12, backend="triton", precision="ieee", **kw)
        fit._lookahead = lookahead
        fits[lookahead] = fit.fit(x)
    a, a2 = fits[False], fits[True]
    assert [h["log_likelihood"] for h in a.history_] == [h["log_likelihood"] for h in a2.history_]
    assert (a.means_ == a2.means_).all() and (a.covariances_ == a2.covariances_).all()
    assert a._impl.exact_components is None                      # reset after the fit
    final = _collapsed.collapsed_components(torch.as_tensor(a.means_ - a.center_), torch.as_tensor(a.covariances_))
    assert len(final) >= 3                                       # the fit did end with collapsed components
    b = GaussianMixture(12, backend="torch", **kw).fit(x)
    assert np.abs(a.means_ - b.means_).max() < 1e-3
    assert np.abs(a.covariances_ / b.covariances_ - 1).max() < 1e-3
    assert a.lower_bound_ == pytest.approx(b.lower_bound_, abs=1e-3)    # H100, diag: 1.7e-4 apart
    lp = _log_prob64(x, a.means_, a.covariances_, np.log(a.weights_))
    ref = torch.logsumexp(lp, 1).numpy()
    assert np.abs(a.score_samples(x) - ref).max() < 1e-2
    assert (a.predict(x) == lp.argmax(1).numpy()).all()


@pytest.mark.filterwarnings("ignore::flashgmm_faiss.gmm.ConvergenceWarning")
def test_triton_fit_with_most_components_collapsed_runs_each_iteration_once(monkeypatch):
    # most components collapsed (as diag fits of SIFT at K=1024 or MNIST): every chunk runs wholly in torch, whose
    # statistics do not depend on which components are named collapsed, so no iteration is redone or discarded when
    # more collapse (siftsmall resampled to 2^20 rows, K=1024 diag on an H100: 434 ms per iteration with the redos,
    # the torch backend 158). The fit is the torch backend's. Here 7 distinct rows repeated 30 times among 40 random
    # ones, K=9: 5 components start collapsed onto them (5 of 9: wholly torch), 2 more collapse during EM (the same
    # fit with redos launched 8 iterations)
    g = torch.Generator().manual_seed(1)
    dup = torch.randn(7, 8, generator=g) * 5
    x = torch.cat([dup.repeat_interleave(30, 0), torch.randn(40, 8, generator=g) * 5]).numpy()
    cov = np.full((9, 8), 25.0)
    cov[:5] = 1e-6
    kw = dict(covariance_type="diag", init=np.concatenate([dup.numpy(), x[-2:]]), covariances_init=cov,
              kmeans_iter=0, max_iter=6, tol=0.0, device=DEVICE, reg_covar=1e-6)
    runs = []
    monkeypatch.setattr(TritonBackend, "begin_em_iteration",
                        lambda self, _f=TritonBackend.begin_em_iteration: (runs.append(1), _f(self))[1])

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernels' E-step ran")

    monkeypatch.setattr(importlib.import_module("flashgmm_faiss.kernels"), "estep", no_kernel)  # the launcher
    for lookahead in (False, True):
        runs.clear()
        fit = GaussianMixture(9, backend="triton", precision="ieee", **kw)
        fit._lookahead = lookahead
        a = fit.fit(x)
        assert len(runs) == 6, lookahead      # each iteration launched once
        assert [h["n_reseeded"] for h in a.history_] == [0] * 6
    cols = _collapsed.collapsed_components(torch.as_tensor(a.means_ - a.center_), torch.as_tensor(a.covariances_))
    assert len(cols) == 7 and TritonBackend.torch_only(cols, 9)
    b = GaussianMixture(9, backend="torch", **kw).fit(x)
    assert np.abs(a.means_ - b.means_).max() < 1e-4
    assert a.lower_bound_ == pytest.approx(b.lower_bound_, abs=1e-4)


@gpu
@pytest.mark.filterwarnings("ignore::flashgmm_faiss.gmm.ConvergenceWarning")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_triton_fit_with_collapsed_components_on_gpu(cov, precision):
    # NOTES.md v45's reproducer: 100 distinct rows of N(0, 25) in D=32, each repeated 30 times, plus 1000 random
    # rows, K=64, 50 EM iterations. The kernels alone scored the fitted model 1e2-4e2 nats off float64; now the
    # scores and the fitted parameters follow the torch backend's
    g = torch.Generator().manual_seed(0)
    dup = torch.randn(100, 32, generator=g) * 5
    x = torch.cat([dup.repeat_interleave(30, 0), torch.randn(1000, 32, generator=g) * 5]).numpy()
    kw = dict(covariance_type=cov, kmeans_iter=5, max_iter=50, tol=0.0, seed=0, device="cuda", reg_covar=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = GaussianMixture(64, backend="triton", precision=precision, **kw).fit(x)
    lp = _log_prob64(x, a.means_, a.covariances_, np.log(a.weights_))
    err = np.abs(a.score_samples(x) - torch.logsumexp(lp, 1).numpy())
    assert err.max() < (0.05 if precision == "tf32" else 0.5), err.max()
    assert (a.predict(x) == lp.argmax(1).numpy()).mean() > 0.999
    assert len(_collapsed.collapsed_components(torch.as_tensor(a.means_ - a.center_),
                                               torch.as_tensor(a.covariances_))) > 0
