"""Accuracy of the torch backend's float32 logits when components collapse onto duplicate rows.

A component whose variance sits at the ``reg_covar`` floor (1e-6) on top of exact duplicate rows makes the
float32 GEMM expansion ||x||^2 p - 2 x.mu p + ||mu||^2 p cancel catastrophically (tens of nats of error). The
backend recomputes such components' logits and statistics (``_torch_backend`` module docstring); these tests
compare it with an independent float64 reference computed directly as sum_d (x_d - mu_d)^2 / var_d.
"""
import warnings

import numpy as np
import pytest
import torch

from flashgmm_faiss import ConvergenceWarning, GaussianMixture
from flashgmm_faiss import _torch_backend as tb

FLOOR = 1e-6      # GaussianMixture's default reg_covar


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one intra-op thread (OpenMP hand-offs dominate them, and cost ~15 ms each on a loaded host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- float64 reference
def _ref_log_prob(x, means, var, log_weights):
    """(n, K) float64 weighted log densities by direct differences (broadcasting), from float32 inputs."""
    x, means, var, lw = (np.asarray(t, dtype=np.float64) for t in (x, means, var, log_weights))
    d = x.shape[1]
    var_d = np.repeat(var[:, None], d, 1) if var.ndim == 1 else var
    out = np.empty((x.shape[0], means.shape[0]))
    for s in range(0, x.shape[0], 256):
        quad = ((x[s:s + 256, None, :] - means[None]) ** 2 / var_d[None]).sum(-1)
        out[s:s + 256] = lw - 0.5 * (d * np.log(2 * np.pi) + np.log(var_d).sum(1)) - 0.5 * quad
    return out


def _logsumexp(a):
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def _ref_estep(x, means, var, log_weights):
    """float64 (log_norm, nk, sx, sq) of one E-step, sq around the given means (diag (K, D), spherical (K,))."""
    lp = _ref_log_prob(x, means, var, log_weights)
    log_norm = _logsumexp(lp)
    r = np.exp(lp - log_norm[:, None])
    x64, m64 = np.asarray(x, np.float64), np.asarray(means, np.float64)
    sq = np.stack([r[:, k] @ (x64 - m64[k]) ** 2 for k in range(m64.shape[0])])
    return log_norm, r, r.sum(0), r.T @ x64, (sq.sum(1) if np.asarray(var).ndim == 1 else sq)


def _naive_log_prob(x, means, var, log_weights):
    """The plain float32 expansion (the backend before the fix), to show a problem is hard."""
    d = x.shape[1]
    if var.ndim == 1:
        dist = ((x * x).sum(1, keepdim=True) - 2.0 * (x @ means.T) + (means * means).sum(1)).clamp_min(0.0)
        return log_weights - 0.5 * d * (tb.LOG_2PI + torch.log(var)) - 0.5 * dist / var
    prec = 1.0 / var
    quad = ((x * x) @ prec.T - 2.0 * (x @ (means * prec).T) + (means * means * prec).sum(1)).clamp_min(0.0)
    return log_weights - 0.5 * (d * tb.LOG_2PI + torch.log(var).sum(1)) - 0.5 * quad


# ----------------------------------------------------------------------------- problems
def _collapsed_problem(diag, floor=FLOOR, seed=0, n_base=40, copies=12, n_noise=300, d=32, k=48):
    """Raw rows (n, d) float32 with ``copies`` exact duplicates of each of ``n_base`` points plus N(0, 25) noise,
    a centre (d,), and centred parameters: components 0..n_base-1 on the duplicated points at the variance floor
    (every fourth one a float32 ulp off in a few features, so its statistics are not exactly zero), the others
    broad (variance ~25) on noise rows."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((n_base, d)) * 5 + 0.7).astype(np.float32)
    raw = np.vstack([np.repeat(base, copies, 0), (rng.standard_normal((n_noise, d)) * 5 + 0.7).astype(np.float32)])
    center = raw.astype(np.float64).mean(0).astype(np.float32)
    xc = raw - center                                   # float32, as the backend centres
    means = np.empty((k, d), np.float32)
    means[:n_base] = base - center
    shift = means[:n_base:4]
    shift[:, :5] = np.nextafter(shift[:, :5], np.float32(np.inf))
    means[:n_base:4] = shift
    means[n_base:] = xc[rng.choice(np.arange(n_base * copies, len(raw)), k - n_base, replace=False)]
    shape = (k, d) if diag else (k,)
    var = (rng.uniform(20, 30, shape)).astype(np.float32)
    var[:n_base] = floor * rng.uniform(1.0, 1.5, shape[1:] if diag else ()).astype(np.float32)
    lw = np.log(rng.dirichlet(np.ones(k))).astype(np.float32)
    return [torch.from_numpy(np.ascontiguousarray(t)) for t in (raw, center, xc, means, var, lw)]


def _normal_problem(diag, seed=1, n=800, d=16, k=8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4
    x = (centres[rng.integers(k, size=n)] + rng.standard_normal((n, d))).astype(np.float32)
    x -= x.mean(0)
    means = (centres - centres.mean(0) + 0.1 * rng.standard_normal((k, d))).astype(np.float32)
    var = rng.uniform(0.5, 1.5, (k, d) if diag else (k,)).astype(np.float32)
    lw = np.log(rng.dirichlet(np.ones(k))).astype(np.float32)
    return [torch.from_numpy(np.ascontiguousarray(t)) for t in (x, means, var, lw)]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_log_prob_and_score_on_collapsed_duplicates(diag):
    # (a) per-sample log-likelihood within 1e-3 nats of float64; the naive expansion is off by > 1 nat here
    raw, center, xc, means, var, lw = _collapsed_problem(diag)
    ref = _ref_log_prob(xc, means, var, lw)
    ref_ll = _logsumexp(ref)
    naive = torch.logsumexp(_naive_log_prob(xc, means, var, lw), 1).double().numpy()
    assert np.abs(naive - ref_ll).max() > 1.0, "the problem no longer exercises the cancellation"
    lp = tb.log_prob(xc, means, var, lw).double().numpy()
    near = ref > ref.max(1, keepdims=True) - 30      # the pairs that matter for the sums
    assert np.abs(lp - ref)[near].max() <= 1e-3
    for ll, best in (tb.score(xc, means, var, lw), tb.score(raw, means, var, lw, center=center)):
        assert np.abs(ll.double().numpy() - ref_ll).max() <= 1e-3
        assert np.array_equal(best.numpy(), ref.argmax(1))
    counts, lists, resp = tb.assign(raw, means, var, lw, 0.01, 4, center=center)
    first = np.concatenate([[0], np.cumsum(counts.numpy())[:-1]])
    r_ref = np.exp(ref - ref_ll[:, None])
    assert np.array_equal(lists.numpy()[first], ref.argmax(1))
    assert np.abs(resp.numpy()[first] - r_ref.max(1)).max() <= 1e-4


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_estep_statistics_on_collapsed_duplicates(diag):
    # (b) Nk, sum r x and sum r (x - mu)^2 within 1e-4 (relative) of float64; sq relative to the M-step's variance
    # scale nk * (sq / nk + floor), since the exact-duplicate components have sq = 0
    raw, center, xc, means, var, lw = _collapsed_problem(diag)
    log_norm, _, nk, sx, sq = _ref_estep(xc, means, var, lw)
    st = tb.estep(raw, means, var, lw, center=center)
    got = [t.double().numpy() for t in st]
    assert np.abs(got[0] - log_norm).max() <= 1e-3
    assert np.abs(got[1] - nk).max() <= 1e-4 * nk.max()
    assert np.all(np.abs(got[1] - nk) <= 1e-4 * nk + 1e-6)
    scale_x = np.linalg.norm(sx, axis=1) + nk * np.abs(xc.numpy()).max()
    assert np.all(np.linalg.norm(got[2] - sx, axis=1) <= 1e-4 * scale_x)
    nk_d = nk if sq.ndim == 1 else nk[:, None]
    floor = FLOOR * (xc.shape[1] if sq.ndim == 1 else 1)
    assert np.all(np.abs(got[3] - sq) <= 1e-4 * (sq + nk_d * floor))
    assert (sq[:40] > 0).any() and (sq[:40] == 0).any()       # ulp-shifted and exact components both checked


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_estimator_score_samples_after_collapsed_fit(cov):
    # (c) the reproducer, smaller: a fit on duplicate-heavy data collapses components to the reg_covar floor;
    # score_samples on its own parameters matches float64 within 1e-3 nats
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 16)).astype(np.float32) * 5
    X = np.vstack([np.repeat(base, 12, 0), rng.standard_normal((300, 16)).astype(np.float32) * 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(24, covariance_type=cov, backend="torch", device="cpu", max_iter=25, seed=0).fit(X)
    assert g.covariances_.min() <= 1.5 * FLOOR            # some component did collapse
    lw = np.log(g.weights_.astype(np.float64))
    ref = _logsumexp(_ref_log_prob(X, g.means_, g.covariances_, lw))
    got = g.score_samples(X)
    assert np.abs(got - ref).max() <= 1e-3
    assert abs(g.score(X) - ref.mean()) <= 1e-4
    assert np.array_equal(g.predict(X), _ref_log_prob(X, g.means_, g.covariances_, lw).argmax(1))


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_normal_problem_matches_float32_precision_without_recomputation(diag):
    # (d) nothing is recomputed on a normal problem, and the results are float32-accurate
    x, means, var, lw = _normal_problem(diag)
    x2 = x * x if diag else (x * x).sum(1, keepdim=True)
    assert tb._flagged(x2, means, var) is None
    ref = _ref_log_prob(x, means, var, lw)
    lp = tb.log_prob(x, means, var, lw).double().numpy()
    assert np.abs(lp - ref).max() <= 1e-5 * (1 + np.abs(ref).max())
    log_norm, r, nk, sx, sq = _ref_estep(x, means, var, lw)
    st = [t.double().numpy() for t in tb.estep(x, means, var, lw)]
    assert np.abs(st[0] - log_norm).max() <= 1e-5 * (1 + np.abs(log_norm).max())
    assert np.abs(st[1] - nk).max() <= 1e-5 * nk.max()
    assert np.abs(st[2] - sx).max() <= 1e-5 * np.abs(sx).max()
    # sq cancels in float32 at the precision of its expansion's terms sum_i r (x^2 + mu^2)
    x64, m64 = x.double().numpy(), means.double().numpy()
    terms = r.T @ (x64 * x64) + nk[:, None] * m64 * m64
    terms = terms.sum(1) if sq.ndim == 1 else terms
    assert np.all(np.abs(st[3] - sq) <= 8 * np.finfo(np.float32).eps * terms)


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_float64_inputs_keep_the_plain_expansion(diag):
    # the kernels' float64 oracle: float64 inputs are never recomputed, bit for bit the plain expansion
    _, _, xc, means, var, lw = _collapsed_problem(diag)
    args = [t.double() for t in (xc, means, var, lw)]
    assert torch.equal(tb.log_prob(*args), _naive_log_prob(*args))


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_capture_path_matches_the_indexed_path(diag, monkeypatch):
    # under CUDA-graph capture (no host sync) every component is recomputed and the flagged ones kept: the same
    # results as the indexed recomputation, up to float32 rounding of the float64 values
    raw, center, xc, means, var, lw = _collapsed_problem(diag, n_noise=100)
    want = tb.estep(raw, means, var, lw, center=center)
    want_lp = tb.log_prob(xc, means, var, lw)
    monkeypatch.setattr(tb, "_capturing", lambda t: True)
    assert tb._flagged(xc * xc, means, var).cols is None
    got = tb.estep(raw, means, var, lw, center=center)
    assert torch.allclose(tb.log_prob(xc, means, var, lw), want_lp, rtol=1e-6, atol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("diag", [False, True], ids=["spherical", "diag"])
def test_direct_differences_where_float64_cancels_too(diag):
    # a variance floor of 1e-13 on rows of scale 5: the float64 expansion would be off by ~0.1 nats, so those
    # components are computed as direct differences; the ulp-shifted means give O(1)-nat quadratic forms
    raw, center, xc, means, var, lw = _collapsed_problem(diag, floor=1e-13, n_noise=100)
    x2 = xc * xc if diag else (xc * xc).sum(1, keepdim=True)
    assert len(tb._flagged(x2, means, var).direct) > 0
    log_norm, _, nk, _, sq = _ref_estep(xc, means, var, lw)
    ref = _ref_log_prob(xc, means, var, lw)
    near = ref > ref.max(1, keepdims=True) - 30
    assert np.abs(tb.log_prob(xc, means, var, lw).double().numpy() - ref)[near].max() <= 1e-3
    st = [t.double().numpy() for t in tb.estep(raw, means, var, lw, center=center)]
    assert np.abs(st[0] - log_norm).max() <= 1e-3
    nk_d = nk if sq.ndim == 1 else nk[:, None]
    assert np.all(np.abs(st[3] - sq) <= 1e-4 * (sq + nk_d * 1e-13 * (xc.shape[1] if sq.ndim == 1 else 1)))
