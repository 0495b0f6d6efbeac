"""GaussianMixture (torch backend) against a float64 numpy EM and scikit-learn."""
import warnings

import h5py
import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGMM

from flashgmm_faiss import ConvergenceWarning, GaussianMixture, NotFittedError
from flashgmm_faiss import gmm as gmm_module

from conftest import assert_close, make_blobs


# ----------------------------------------------------------------------------- float64 reference
def _ref_log_prob(X, means, weights, var):
    d = X.shape[1]
    if var.ndim == 1:
        sq = ((X[:, None, :] - means[None]) ** 2).sum(-1)
        return np.log(weights) - 0.5 * d * np.log(2 * np.pi * var) - 0.5 * sq / var
    sq = (((X[:, None, :] - means[None]) ** 2) / var[None]).sum(-1)
    return np.log(weights) - 0.5 * np.log(2 * np.pi * var).sum(1) - 0.5 * sq


def _logsumexp(a):
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def ref_em(X, means, weights, var, n_iter, reg_covar):
    """Textbook EM in float64 (broadcasting, no GEMM tricks). Returns params and per-iteration mean log-lik."""
    X = X.astype(np.float64)
    means, weights, var = (np.array(a, dtype=np.float64) for a in (means, weights, var))
    lls = []
    for _ in range(n_iter):
        lp = _ref_log_prob(X, means, weights, var)
        lse = _logsumexp(lp)
        lls.append(lse.mean())
        r = np.exp(lp - lse[:, None])
        nk = r.sum(0)
        means = (r.T @ X) / nk[:, None]
        diag = np.einsum("nk,nkd->kd", r, (X[:, None, :] - means[None]) ** 2) / nk[:, None]
        var = diag.mean(1) + reg_covar if var.ndim == 1 else diag + reg_covar
        weights = nk / X.shape[0]
    return means, weights, var, lls


def _start(X, K, cov, seed=0):
    r = np.random.default_rng(seed)
    means = X[r.choice(X.shape[0], K, replace=False)].astype(np.float64)
    weights = r.uniform(0.5, 1.5, K)
    weights /= weights.sum()
    var = r.uniform(1.0, 3.0, K) if cov == "spherical" else r.uniform(1.0, 3.0, (K, X.shape[1]))
    return means, weights, var


def _fit_from(X, means, weights, var, cov, n_iter, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(means.shape[0], covariance_type=cov, init=means, weights_init=weights,
                               covariances_init=var, kmeans_iter=0, max_iter=n_iter, tol=0.0, reg_covar=1e-6,
                               backend="torch", device="cpu", **kw).fit(X)


# ----------------------------------------------------------------------------- EM correctness
@pytest.mark.parametrize("cov", ["spherical", "diag"])
@pytest.mark.parametrize("offset", [0.0, 200.0])  # uncentred data exercises the centring
def test_em_matches_float64_reference(cov, offset):
    X, _ = make_blobs(n=401, d=7, k=5, seed=1, offset=offset)
    means, weights, var = _start(X, 5, cov)
    g = _fit_from(X, means, weights, var, cov, n_iter=8)
    rm, rw, rv, lls = ref_em(X, means, weights, var, 8, 1e-6)
    assert_close(g.means_, rm, rtol=1e-4, atol=1e-4 * max(1.0, offset), what="means")
    assert_close(g.weights_, rw, rtol=1e-4, atol=1e-7, what="weights")
    assert_close(g.covariances_, rv, rtol=1e-4, what="variances")
    assert_close([h["log_likelihood"] for h in g.history_], lls, rtol=1e-5, what="log-likelihood history")
    assert g.covariances_.shape == ((5,) if cov == "spherical" else (5, 7))


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_em_matches_sklearn_from_same_start(cov):
    X, _ = make_blobs(n=500, d=6, k=4, seed=2)
    means, weights, var = _start(X, 4, cov, seed=3)
    n_iter = 12
    ours = _fit_from(X, means, weights, var, cov, n_iter=n_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGMM(4, covariance_type=cov, means_init=means, weights_init=weights, precisions_init=1.0 / var,
                   max_iter=n_iter, tol=0.0, reg_covar=1e-6, random_state=0).fit(X.astype(np.float64))
    assert_close(ours.score_samples(X), sk.score_samples(X), rtol=1e-4, what="per-sample log-likelihood")
    assert_close(ours.means_, sk.means_, rtol=1e-4, atol=1e-5, what="means")
    assert_close(ours.covariances_, sk.covariances_, rtol=1e-4, what="covariances")
    assert_close(ours.weights_, sk.weights_, rtol=1e-4, what="weights")
    assert_close(ours.lower_bound_, sk.lower_bound_, rtol=1e-5, what="lower bound")
    assert_close(ours.predict_proba(X), sk.predict_proba(X), rtol=1e-3, atol=1e-5, what="predict_proba")
    np.testing.assert_array_equal(ours.predict(X), sk.predict(X))
    assert_close(ours.bic(X), sk.bic(X), rtol=1e-5, what="bic")
    assert_close(ours.aic(X), sk.aic(X), rtol=1e-5, what="aic")


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_log_likelihood_never_decreases(cov):
    X, _ = make_blobs(n=2000, d=8, k=12, seed=4, spread=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(12, covariance_type=cov, max_iter=60, tol=0.0, kmeans_iter=2, chunk_size=333,
                            backend="torch", device="cpu", seed=1).fit(X)
    ll = np.array([h["log_likelihood"] for h in g.history_])
    assert len(ll) == 60 and g.n_iter_ == 60
    drops = np.diff(ll)
    assert drops.min() >= -1e-6 * np.abs(ll).max(), f"log-likelihood decreased by {drops.min()}"
    assert all(h["seconds"] >= 0 for h in g.history_)


def test_fit_defaults_kmeans_warm_start_and_attributes():
    X, labels = make_blobs(n=1200, d=4, k=3, seed=5, spread=10.0)
    g = GaussianMixture(3, backend="torch", device="cpu").fit(X)
    assert g.converged_ and 1 <= g.n_iter_ <= 100
    assert len(g.kmeans_history_) == 10
    assert g.means_.shape == (3, 4) and g.weights_.shape == (3,) and g.covariances_.shape == (3,)
    assert abs(g.weights_.sum() - 1) < 1e-5
    # well separated blobs: the fitted partition equals the generating one up to relabelling
    pred = g.predict(X)
    agree = max(np.mean(pred == perm[labels]) for perm in map(np.array, __import__("itertools").permutations(range(3))))
    assert agree > 0.99
    assert np.isclose(g.lower_bound_, g.history_[-1]["log_likelihood"])
    assert np.isclose(g.score(X), g.score_samples(X).mean())


def test_chunking_does_not_change_the_result():
    X, _ = make_blobs(n=777, d=5, k=6, seed=6)
    kw = dict(backend="torch", device="cpu", max_iter=15, tol=0.0, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(6, chunk_size=100, **kw).fit(X)
        b = GaussianMixture(6, chunk_size=10_000, **kw).fit(X)
    assert_close(a.means_, b.means_, rtol=1e-4, atol=1e-4, what="means across chunk sizes")
    assert_close(a.lower_bound_, b.lower_bound_, rtol=1e-6, what="lower bound across chunk sizes")


# ----------------------------------------------------------------------------- input types
def _fit_quick(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(4, max_iter=5, kmeans_iter=2, backend="torch", device="cpu", seed=0, chunk_size=128,
                               **kw).fit(X)


def test_accepts_memmap_torch_h5py_float64_and_noncontiguous(tmp_path):
    X, _ = make_blobs(n=300, d=6, k=4, seed=7)
    ref = _fit_quick(X)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["train"] = X
    wide = np.zeros((300, 12), dtype=np.float32)
    wide[:, ::2] = X
    inputs = {
        "memmap": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "torch": torch.from_numpy(X.copy()),
        "float64": X.astype(np.float64),
        "noncontiguous": wide[:, ::2],
        "fortran": np.asfortranarray(X),
    }
    for name, data in inputs.items():
        g = _fit_quick(data)
        assert_close(g.means_, ref.means_, rtol=1e-5, atol=1e-5, what=f"means from {name} input")
    with h5py.File(tmp_path / "x.h5", "r") as f:
        g = _fit_quick(f["train"])
        assert_close(g.means_, ref.means_, rtol=1e-5, atol=1e-5, what="means from h5py input")
        assert_close(g.score_samples(f["train"]), ref.score_samples(X), rtol=1e-6, what="score from h5py")


@pytest.mark.parametrize("bad,exc,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]] * 5, dtype=np.float32), ValueError, "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]] * 5, dtype=np.float32), ValueError, "Inf"),
    (np.arange(10, dtype=np.float32), ValueError, "Expected 2D array"),
    (np.zeros((0, 3), dtype=np.float32), ValueError, "empty"),
    (np.ones((10, 2), dtype=np.complex64), TypeError, "dtype"),
    (np.array([["a", "b"]] * 10), TypeError, "dtype"),
    ([[1.0, 2.0]] * 10, TypeError, "2-D array"),
])
def test_bad_input_has_clear_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        GaussianMixture(2, backend="torch", device="cpu").fit(bad)


def test_nan_in_later_chunk_names_the_row():
    X = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    X[321, 1] = np.nan
    with pytest.raises(ValueError, match="row: 321"):
        GaussianMixture(2, chunk_size=100, backend="torch", device="cpu").fit(X)


def test_k_larger_than_n_and_bad_params():
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="larger than the number of training vectors"):
        GaussianMixture(6, backend="torch").fit(X)
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(2, covariance_type="full", backend="torch").fit(X)
    with pytest.raises(ValueError, match="backend"):
        GaussianMixture(2, backend="cuda-magic").fit(X)
    with pytest.raises(TypeError, match="n_components"):
        GaussianMixture(2.5, backend="torch").fit(X)
    with pytest.raises(ValueError, match="data_on_device"):
        GaussianMixture(2, backend="torch", data_on_device="always").fit(X)


def test_dimension_mismatch_and_not_fitted():
    X, _ = make_blobs(n=100, d=4, k=2)
    g = GaussianMixture(2, backend="torch", device="cpu")
    with pytest.raises(NotFittedError):
        g.predict(X)
    g.fit(X)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        g.predict(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        g.score_samples(np.full((3, 4), np.nan, dtype=np.float32))


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    X, _ = make_blobs(n=50, d=3, k=2)
    with pytest.raises(ValueError, match="CUDA"):
        GaussianMixture(2, backend="triton", device="cpu").fit(X)


# ----------------------------------------------------------------------------- degenerate components
def test_empty_component_is_reseeded_not_nan():
    X, _ = make_blobs(n=400, d=3, k=3, seed=8)
    means = np.concatenate([X[:3], np.full((1, 3), 1e4, dtype=np.float32)])  # one mean far from all data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(4, init=means, kmeans_iter=0, max_iter=20, backend="torch", device="cpu").fit(X)
    assert sum(h["n_reseeded"] for h in g.history_) >= 1
    for a in (g.means_, g.covariances_, g.weights_):
        assert np.all(np.isfinite(a))
    assert np.all(g.weights_ > 0) and np.all(g.covariances_ > 0)
    assert np.abs(g.means_).max() < 1e3  # the far mean was moved onto the data


def test_single_row_component_is_not_reseeded_over_rounding(monkeypatch):
    # a component that owns one isolated row has Nk = 1 only up to rounding (the kernels can put it at 1 - 2^-24
    # when pass 2 recomputes the logits): it must stay, not be re-seeded every iteration as with the rule Nk < 1
    X, _ = make_blobs(n=400, d=3, k=2, seed=8)
    X = np.concatenate([X, np.full((1, 3), 500.0, dtype=np.float32)])        # one isolated row
    means = np.stack([X[0], X[-2], X[-1]])                                  # one component starts on it
    estep_pass = GaussianMixture._estep_pass

    def rounded(self, *args):                      # a rounding of a responsibility of 1, on every Nk
        nk, sx, sq, ll_sum = estep_pass(self, *args)
        return nk * (1 - 2.0 ** -23), sx, sq, ll_sum
    monkeypatch.setattr(GaussianMixture, "_estep_pass", rounded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(3, covariance_type="diag", init=means, kmeans_iter=0, max_iter=8, tol=0.0,
                            backend="torch", device="cpu").fit(X)
    assert [h["n_reseeded"] for h in g.history_] == [0] * 8
    own = int(np.argmin(np.abs(g.means_ - 500.0).sum(1)))
    np.testing.assert_allclose(g.means_[own], X[-1], rtol=1e-6)
    assert g.weights_[own] * len(X) == pytest.approx(1.0, rel=1e-5)


def test_kmeans_empty_cluster_is_reseeded():
    X, _ = make_blobs(n=300, d=2, k=3, seed=9)
    means = np.stack([X[0], X[0], X[1]])  # duplicate seeds: one cluster starts empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(3, init=means, kmeans_iter=5, max_iter=3, backend="torch", device="cpu").fit(X)
    assert g.kmeans_history_[0]["n_reseeded"] == 1
    assert np.all(np.isfinite(g.means_)) and len(np.unique(g.means_.round(4), axis=0)) == 3


def _fit_counting_steps(monkeypatch, lookahead, X, K, degenerate_at=None, **kw):
    """A CPU fit with lookahead forced on or off; returns it and its (EM, k-means) step calls. ``degenerate_at``:
    the EM step of that call reports component 0 degenerate (a re-seed after the first iteration)."""
    calls = {"em": 0, "kmeans": 0}
    em_step, kmeans_step = GaussianMixture._em_step, GaussianMixture._kmeans_step

    def counting_em(self, *args):
        calls["em"] += 1
        means, var, weights, degenerate, summary, used = em_step(self, *args)
        if calls["em"] == degenerate_at:
            degenerate[0] = True
            summary[1] = degenerate.sum()
        return means, var, weights, degenerate, summary, used

    def counting_kmeans(self, *args):
        calls["kmeans"] += 1
        return kmeans_step(self, *args)
    monkeypatch.setattr(GaussianMixture, "_em_step", counting_em)
    monkeypatch.setattr(GaussianMixture, "_kmeans_step", counting_kmeans)
    monkeypatch.setattr(gmm_module, "MAX_LOOKAHEAD_SECONDS", float("inf"))   # whatever this machine's speed
    g = GaussianMixture(K, backend="torch", device="cpu", **kw)
    g._lookahead = lookahead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g.fit(X)
    monkeypatch.undo()
    return g, calls


@pytest.mark.parametrize("case", ["converges", "em_reseed", "kmeans_reseed", "max_iter"])
def test_lookahead_gives_the_fit_without_it(case, monkeypatch):
    # lookahead issues iteration t + 1 before reading t's summary and discards it when t stops the fit or
    # re-seeds: parameters, history and decisions must be those of the plain loop, with the discarded steps
    # the only difference
    X, _ = make_blobs(n=400, d=3, k=3, seed=8)
    if case == "em_reseed":    # one mean far from all data: re-seeded by EM in iteration 1, one forced in 3
        kw = dict(init=np.concatenate([X[:3], np.full((1, 3), 1e4, dtype=np.float32)]), kmeans_iter=0,
                  max_iter=12, tol=0.0, degenerate_at=3)
    elif case == "kmeans_reseed":   # duplicate seeds: k-means re-seeds an empty cluster
        kw = dict(init=np.stack([X[0], X[0], X[1], X[2]]), kmeans_iter=5, max_iter=4, tol=0.0)
    elif case == "converges":
        kw = dict(kmeans_iter=3, max_iter=200, tol=1e-3)
    else:
        kw = dict(kmeans_iter=2, max_iter=5, tol=0.0)
    a, calls_a = _fit_counting_steps(monkeypatch, False, X, 4, **kw)
    b, calls_b = _fit_counting_steps(monkeypatch, True, X, 4, **kw)
    for name in ("means_", "covariances_", "weights_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.n_iter_, a.converged_, a.lower_bound_) == (b.n_iter_, b.converged_, b.lower_bound_)
    drop = [{k: v for k, v in h.items() if k != "seconds"} for h in a.history_]
    assert drop == [{k: v for k, v in h.items() if k != "seconds"} for h in b.history_]
    assert [h["inertia"] for h in a.kmeans_history_] == [h["inertia"] for h in b.kmeans_history_]
    # (the first EM iteration's time is unknown before it ends: no step ahead of it)
    em_reseeds = sum(h["n_reseeded"] > 0 for h in a.history_[1:-1])
    km_reseeds = sum(h["n_reseeded"] > 0 for h in a.kmeans_history_[:-1])
    assert calls_a == {"em": a.n_iter_, "kmeans": kw["kmeans_iter"]}
    if case == "em_reseed":
        assert a.history_[0]["n_reseeded"] == 1 and a.history_[2]["n_reseeded"] >= 1
    # each re-seed (before the last iteration) and an early stop discard one step issued ahead
    assert calls_b["em"] == a.n_iter_ + em_reseeds + (1 < a.n_iter_ < kw["max_iter"])
    assert calls_b["kmeans"] == kw["kmeans_iter"] + km_reseeds
    assert {"converges": a.converged_ and a.n_iter_ < 200, "em_reseed": em_reseeds >= 1,
            "kmeans_reseed": km_reseeds >= 1, "max_iter": a.n_iter_ == 5}[case]


def test_duplicate_points_and_variance_floor():
    X = np.repeat(np.eye(3, dtype=np.float32) * 5, 40, axis=0)  # three exact point masses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(3, reg_covar=1e-3, backend="torch", device="cpu", max_iter=10).fit(X)
    assert np.all(np.isfinite(g.means_)) and np.all(g.covariances_ >= 1e-3 * 0.999)
    assert np.isfinite(g.lower_bound_)
    # the exact answer: one component on each point mass, zero spread plus the floor, equal weights
    order = np.argsort(np.argmax(g.means_, axis=1))
    assert_close(g.means_[order], np.eye(3) * 5, rtol=1e-6, atol=1e-5, what="means")
    # float32 statistics of values ~5: the spread reads ~1e-7 of the squares (25), not 0
    assert_close(g.covariances_, np.full(3, 1e-3), rtol=0, atol=25 * 1e-7, what="variances (the floor)")
    assert_close(g.weights_, np.full(3, 1 / 3), rtol=1e-6, what="weights")


# ----------------------------------------------------------------------------- inference API
def test_predict_proba_bound_and_rows_sum_to_one(monkeypatch):
    X, _ = make_blobs(n=200, d=3, k=3)
    g = GaussianMixture(3, backend="torch", device="cpu").fit(X)
    p = g.predict_proba(X)
    assert p.shape == (200, 3)
    assert_close(p.sum(1), np.ones(200), rtol=1e-5, what="row sums")
    monkeypatch.setattr(gmm_module, "PREDICT_PROBA_MAX_ELEMENTS", 100)
    with pytest.raises(ValueError, match="assign"):
        g.predict_proba(X)


@pytest.mark.parametrize("cov", ["spherical", "diag"])
@pytest.mark.parametrize("tau,cap", [(None, None), (0.05, 2), (0.0, 3), (0.9, None)])
def test_assign_matches_float64_responsibilities(cov, tau, cap):
    X, _ = make_blobs(n=300, d=4, k=6, seed=10, spread=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(6, covariance_type=cov, max_iter=10, backend="torch", device="cpu",
                            chunk_size=64).fit(X)
    offsets, lists, resp = g.assign(X, tau=tau, max_assign=cap)
    lp = _ref_log_prob(X.astype(np.float64), g.means_.astype(np.float64), g.weights_.astype(np.float64),
                       g.covariances_.astype(np.float64))
    R = np.exp(lp - _logsumexp(lp)[:, None])
    t = 1 / 6 if tau is None else tau
    m = 6 if cap is None else cap
    assert offsets.shape == (301,) and offsets[0] == 0 and offsets[-1] == lists.size == resp.size
    for i in range(300):
        li, ri = lists[offsets[i]:offsets[i + 1]], resp[offsets[i]:offsets[i + 1]]
        order = np.argsort(-R[i], kind="stable")
        expected = [c for c in order[:m] if R[i, c] > t] or [order[0]]
        if order[0] not in expected:
            expected = [order[0]] + expected
        assert li[0] == R[i].argmax(), f"row {i}: argmax list missing"
        assert 1 <= li.size <= m and len(set(li.tolist())) == li.size
        assert np.all(np.diff(ri) <= 1e-7), "not sorted by responsibility"
        # components whose responsibility is clearly above / below tau are decided the same way
        clear = np.abs(R[i] - t) > 1e-5
        assert set(li.tolist()) & set(np.nonzero(clear)[0]) == set(expected) & set(np.nonzero(clear)[0]), f"row {i}"
        assert_close(ri, R[i, li], rtol=1e-4, atol=1e-6, what=f"responsibilities of row {i}")


def test_assign_validates_arguments():
    X, _ = make_blobs(n=100, d=3, k=2)
    g = GaussianMixture(2, backend="torch", device="cpu").fit(X)
    with pytest.raises(ValueError, match="tau"):
        g.assign(X, tau=1.5)
    with pytest.raises(ValueError, match="max_assign"):
        g.assign(X, max_assign=0)


def test_convergence_warning_and_verbose_progress(capsys):
    X, _ = make_blobs(n=500, d=3, k=5, spread=1.0)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        GaussianMixture(5, max_iter=2, tol=0.0, backend="torch", device="cpu", verbose=2).fit(X)
    err = capsys.readouterr().err
    assert "EM 1/2" in err and "EM 2/2" in err and "k-means" in err


def test_default_triton_chunk_bounds_the_per_chunk_buffers():
    # 16-bit operand copy (2 D bytes per row, 6 D for diag) plus the float32 upload unless X is resident, within
    # 512 MiB, or 1/8 of the free device memory when that is smaller (never below 64 MiB)
    from flashgmm_faiss._chunk_plan import TRITON_CHUNK_BYTES, default_chunk_rows
    dev = torch.device("cpu")
    assert TRITON_CHUNK_BYTES == 2 ** 29
    for free, budget in ((None, 2 ** 29), (2 ** 40, 2 ** 29), (2 ** 31, 2 ** 28), (2 ** 20, 2 ** 26)):
        for d in (50, 96, 128, 256):
            for diag in (False, True):
                for resident in (False, True):
                    rows = default_chunk_rows("triton", dev, 1024, d, diag, resident, free)
                    per_row = (6 if diag else 2) * d + (0 if resident else 4 * d)
                    assert rows * per_row <= budget < (rows + 1) * per_row, (free, d, diag, resident, rows)
    # resident D=128: one chunk per 2^21 rows spherical, 2^29 / 768 = 699,050 rows diag
    assert default_chunk_rows("triton", dev, 1024, 128, False, True) == 2 ** 21
    assert default_chunk_rows("triton", dev, 1024, 128, True, True) == 699_050


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_working_memory_plan_stays_within_the_budget(backend):
    # the O(K D) estimate plus an EM iteration's chunk buffers (with or without the operand copy) and row orders,
    # and plus the k-means step's pieces (beside the uploaded chunk), each stay within the budget; the copy is
    # kept only when 2^20 of its rows (or the whole data) fit
    from flashgmm_faiss import _chunk_plan as cp
    dev = torch.device("cpu")
    for n in (5_000, 2_000_000, 100_000_000):
        for k, d in ((64, 50), (1024, 128), (4096, 96)):
            for diag in (False, True):
                for resident in (False, True):
                    for mib in (64, 512, 8192):
                        args = (backend, dev, n, k, d, diag, resident, None, mib)
                        fixed = cp.fixed_bytes(backend, k, d, diag)
                        per_row = cp._row_bytes(backend, k, d, resident)
                        budget = mib * cp.MIB
                        if fixed + cp.MIN_CHUNK_ROWS * per_row > budget:
                            with pytest.raises(ValueError, match="give at least"):
                                cp.plan_chunks(*args)
                            continue
                        try:
                            p = cp.plan_chunks(*args)
                        except ValueError as e:    # the uploaded chunk and the k-means pieces need more
                            assert "give at least" in str(e) and not resident and backend == "triton"
                            continue
                        assert p.rows >= min(n, cp.MIN_CHUNK_ROWS) and p.order_bytes >= 0
                        if backend == "torch":
                            assert fixed + p.rows * per_row <= budget and p.order_bytes == 0
                            continue
                        copy_row = (6 if diag else 2) * d
                        partials = cp.partial_bytes(backend, diag)
                        if p.order_bytes:   # kept orders (8 bytes per row) and the row copy
                            em = fixed + p.rows * (per_row + cp.ORDER_ROW_BYTES + copy_row * p.copy_rows) \
                                + p.order_bytes
                        else:   # a transient order per E-step (no copy): pass 1 and the sort, then pass 2
                            em = max(fixed - partials + p.rows * (per_row + cp.SORT_ROW_BYTES),
                                     fixed + p.rows * (per_row + cp.PASS2_ROW_BYTES))
                        upload = 0 if resident else 4 * d
                        kmeans = fixed - partials + p.rows * upload + p.kmeans_rows * cp.KMEANS_ROW_BYTES
                        assert em <= budget and kmeans <= budget, (n, k, d, diag, resident, mib, p)
                        # the torch paths (collapsed components) after the kernels: beside the chunk's outputs and
                        # the kept orders, in at least the room of the partial sums
                        torch_paths = fixed - partials + p.order_bytes + p.torch_bytes + p.rows * per_row
                        assert torch_paths <= budget and p.torch_bytes >= partials, (n, k, d, diag, resident, mib, p)
                        assert p.kmeans_rows <= p.rows and (p.order_bytes == 0 or p.order_bytes >= 8 * p.rows)
                        share = 1 if resident else 2
                        fits_copy = fixed + share * min(n, cp.MIN_COPY_ROWS) * (per_row + copy_row) <= budget
                        assert p.copy_rows == fits_copy, (n, k, d, diag, resident, mib, p)
    # the N=1e8, K=1024, D=128 in 64 MiB: no operand copy, no kept row orders (each E-step sorts its
    # chunk), spherical chunks of ~720k rows (the sort, not the partials, limits them), diag ~560k (the partials)
    kd = cp.KD_BYTES * 1024 * 128
    for diag in (False, True):
        p = cp.plan_chunks("triton", dev, 10 ** 8, 1024, 128, diag, True, None, 64)
        assert not p.copy_rows and p.order_bytes == 0 and 2 ** 19 < p.kmeans_rows <= p.rows
        sort_phase = kd + p.rows * (cp.ESTEP_ROW_BYTES + cp.SORT_ROW_BYTES)
        pass2_phase = kd + cp.partial_bytes("triton", diag) + p.rows * (cp.ESTEP_ROW_BYTES + cp.PASS2_ROW_BYTES)
        assert max(sort_phase, pass2_phase) <= 64 * cp.MIB
        assert 64 * cp.MIB - (sort_phase if not diag else pass2_phase) < 72   # the binding phase leaves < a row
        assert 2 ** 19 < p.rows < 2 ** 20
    # a fit that runs the dense E-step (sparse_estep=False) keeps chunks of more than 2^20 rows
    q = cp.plan_chunks("triton", dev, 10 ** 8, 1024, 128, False, True, None, 64, sort_rows=False)
    assert not q.copy_rows and q.order_bytes == 0 and q.rows > 2 ** 20 and q.kmeans_rows < q.rows
    # without a budget: the defaults
    assert cp.plan_chunks("triton", dev, 10 ** 8, 1024, 128) == (2 ** 29 // (6 * 128), True, cp.ROW_ORDER_BYTES,
                                                                 None, cp.TORCH_BYTES)


def test_plan_without_kept_orders_sizes_chunks_for_transient_orders():
    # kept_orders=False (diag fits, TritonBackend.kept_orders): no operand copy and no row orders even when the
    # memory allows them; default chunks fill the 512 MiB chunk budget (or 1/8 of the free memory) with the
    # transient E-step's per-row buffers, k-means pieces stay within it; a budget gives the chunks of a plan whose
    # budget leaves no orders; a dense fit (sort_rows=False) and the torch backend are unaffected
    from flashgmm_faiss import _chunk_plan as cp
    dev = torch.device("cpu")
    for free, budget in ((None, 2 ** 29), (2 ** 31, 2 ** 28), (2 ** 20, 2 ** 26)):
        for d in (50, 128, 256):
            for resident in (False, True):
                p = cp.plan_chunks("triton", dev, 10 ** 7, 1024, d, True, resident, free, kept_orders=False)
                per_row = cp.ESTEP_ROW_BYTES + cp.SORT_ROW_BYTES + (0 if resident else 4 * d)
                assert not p.copy_rows and p.order_bytes == 0
                assert p.rows * per_row <= budget < (p.rows + 1) * per_row, (free, d, resident, p)
                kmeans = p.rows if p.kmeans_rows is None else p.kmeans_rows
                assert kmeans <= p.rows and kmeans * cp.KMEANS_ROW_BYTES <= budget
    # resident D=128: 9.6M rows per chunk (one chunk at N=1e6; 699,050 rows with the diag operand copy)
    assert cp.plan_chunks("triton", dev, 10 ** 6, 1024, 128, True, True, kept_orders=False).rows == 2 ** 29 // 56
    for n in (5_000, 2_000_000, 100_000_000):
        for diag in (False, True):
            for resident in (False, True):
                for mib in (512, 8192):
                    args = ("triton", dev, n, 1024, 128, diag, resident, None, mib)
                    p = cp.plan_chunks(*args, kept_orders=False)
                    assert not p.copy_rows and p.order_bytes == 0
                    fixed, partials = cp.fixed_bytes("triton", 1024, 128, diag), cp.partial_bytes("triton", diag)
                    per_row = cp._row_bytes("triton", 1024, 128, resident)
                    share = 1 if resident else 2
                    assert max(fixed - partials + share * p.rows * (per_row + cp.SORT_ROW_BYTES),
                               fixed + share * p.rows * (per_row + cp.PASS2_ROW_BYTES)) <= mib * cp.MIB
                    assert p.rows == min(n, (cp.MIB * mib - fixed + partials) // share // (per_row + cp.SORT_ROW_BYTES),
                                         (cp.MIB * mib - fixed) // share // (per_row + cp.PASS2_ROW_BYTES))
                    kept = cp.plan_chunks(*args)
                    assert p.rows <= n and (kept.order_bytes > 0 or kept.rows == p.rows)
                    assert cp.plan_chunks(*args, sort_rows=False, kept_orders=False) == \
                        cp.plan_chunks(*args, sort_rows=False)
    for args in (("torch", dev, 10 ** 6, 1024, 128, True), ("torch", dev, 10 ** 6, 1024, 128, True, True, None, 512)):
        assert cp.plan_chunks(*args, kept_orders=False) == cp.plan_chunks(*args)
    assert cp.plan_chunks("triton", dev, 10 ** 6, 1024, 128, True, True, sort_rows=False, kept_orders=False) == \
        cp.plan_chunks("triton", dev, 10 ** 6, 1024, 128, True, True)


def test_working_memory_is_validated_and_sets_the_chunks():
    X, _ = make_blobs(n=3000, d=8, k=4, seed=2)
    for bad in (-1, 0, "64", float("nan"), True):
        with pytest.raises(ValueError, match="working_memory"):
            GaussianMixture(4, backend="torch", device="cpu", working_memory=bad).fit(X)
    with pytest.raises(ValueError, match="give at least"):
        GaussianMixture(4, backend="torch", device="cpu", working_memory=0.01).fit(X)
    # a budget that leaves ~700 rows per chunk (torch backend: 16 K + 8 D bytes per row beyond the O(K D) part)
    from flashgmm_faiss import _chunk_plan as cp
    mib = (cp.fixed_bytes("torch", 4, 8, False) + 1100 * cp._row_bytes("torch", 4, 8, False)) / cp.MIB
    kw = dict(max_iter=5, tol=0.0, backend="torch", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(4, working_memory=mib, **kw).fit(X)
        b = GaussianMixture(4, chunk_size=1100, **kw).fit(X)
    assert a._chunk_rows(X, torch.device("cpu"), 8) == 1100
    assert a.get_params()["working_memory"] == mib
    for name in ("means_", "covariances_", "weights_"):
        assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, what=name)


def test_triton_backend_torch_fallbacks_run_in_bounded_pieces():
    # rows wider than the kernels' tile (D > 256) take the torch path, on pieces whose (rows, K) matrices stay
    # of at most TritonBackend.torch_bytes: same results as the whole chunk at once
    from flashgmm_faiss import _torch_backend as tb
    from flashgmm_faiss import _triton_backend as tbe
    g = torch.Generator().manual_seed(0)
    x = torch.randn(47, 260, generator=g)
    means, center = torch.randn(5, 260, generator=g), 0.1 * torch.randn(260, generator=g)
    lw = torch.log_softmax(torch.randn(5, generator=g), 0)
    be = tbe.TritonBackend("ieee")
    be.torch_bytes = 11 * (tbe.TORCH_ENTRY_BYTES * 5 + tbe.TORCH_FEATURE_BYTES * 260) + 7
    assert be.torch_piece_rows(5, 260) == 11    # pieces of 11 rows
    for var in (torch.rand(5, generator=g) * 50 + 250, torch.rand(5, 260, generator=g) + 1.5):
        for got, want in ((be.estep(x, means, var, lw, center), tb.estep(x, means, var, lw, center)),
                          (be.score(x, means, var, lw, center), tb.score(x, means, var, lw, center)),
                          (be.kmeans_step(x, means, center), tb.kmeans_step(x, means, center)),
                          (be.assign(x, means, var, lw, 0.01, 40, center), tb.assign(x, means, var, lw, 0.01, 40,
                                                                                     center))):
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert_close(a.double().numpy(), b.double().numpy(), rtol=1e-5, atol=1e-4, what="fallback")


def test_resident_data_is_recognised():
    # a float32 tensor on the fit device needs no upload buffer; anything else is streamed through one
    from flashgmm_faiss.gmm import _resident
    cpu = torch.device("cpu")
    assert _resident(torch.zeros(3, 2), cpu)
    assert not _resident(torch.zeros(3, 2, dtype=torch.float64), cpu)
    assert not _resident(np.zeros((3, 2), dtype=np.float32), cpu)
    assert not _resident(torch.zeros(3, 2), torch.device("cuda", 0))


# ------------------------------------------------------------------------------------------ k-means++ seeding
def test_kmeans_plusplus_samples_proportionally_to_squared_distance():
    # 1-D rows 0, 1, 3: once row 0 is the first seed, the second is row 1 with probability 1 / (1 + 9) and
    # row 2 with 9 / 10 (D^2 sampling); counted over many generator seeds
    from flashgmm_faiss.gmm import kmeans_plusplus
    x = torch.tensor([[0.0], [1.0], [3.0]])
    second = []
    for s in range(3000):
        rng = np.random.default_rng(s)
        probe = np.random.default_rng(s)
        probe.random(2)
        if int(probe.integers(3)) != 0:       # the same draws kmeans_plusplus makes: keep first seed = row 0
            continue
        seeds = kmeans_plusplus(x, 2, rng)
        assert float(seeds[0, 0]) == 0.0
        second.append(float(seeds[1, 0]))
    second = np.array(second)
    assert len(second) > 700 and set(np.unique(second)) <= {1.0, 3.0}
    p3 = float(np.mean(second == 3.0))
    assert abs(p3 - 0.9) < 4 * np.sqrt(0.9 * 0.1 / len(second)), p3


def test_kmeans_plusplus_returns_distinct_rows_even_on_degenerate_data():
    from flashgmm_faiss.gmm import kmeans_plusplus
    x = torch.tensor([[1.0, 2.0]] * 4 + [[5.0, 5.0]] * 3 + [[9.0, 0.0]])   # 3 distinct values, 8 rows
    seeds = kmeans_plusplus(x, 6, np.random.default_rng(0))
    assert seeds.shape == (6, 2)
    # the 3 distinct values all come first (positive distance while any is unseeded), then unused rows
    assert {tuple(r) for r in seeds[:3].tolist()} == {(1.0, 2.0), (5.0, 5.0), (9.0, 0.0)}
    # distinct rows of x: match each seed to a row index, never the same index twice
    rows = x.tolist()
    used = []
    for r in seeds.tolist():
        idx = next(i for i, v in enumerate(rows) if v == r and i not in used)
        used.append(idx)
    assert len(set(used)) == 6



def test_graph_replay_first_call_bookkeeping_can_be_forgotten():
    # a key's first call runs the function eagerly (the second would capture a CUDA graph); the estimator forgets a
    # first call whose iteration it discarded, so that the next call runs eagerly again, as without the discard
    from flashgmm_faiss._cuda_graphs import GraphReplay
    seen = []
    replay = GraphReplay(lambda t: (seen.append(1), t + 1)[1:])
    x = torch.zeros(3)
    assert replay.first_call("plain") and not replay.first_call(None)
    assert torch.equal(replay("plain", x)[0], x + 1) and torch.equal(replay(None, x)[0], x + 1)
    assert not replay.first_call("plain") and len(seen) == 2
    replay.forget_first_call("plain")
    assert replay.first_call("plain")
    assert torch.equal(replay("plain", x)[0], x + 1) and len(seen) == 3 and replay.replays == 0


# ----------------------------------------------------------------------------- inputs read as data, parameter types
KW = dict(backend="torch", device="cpu", max_iter=20)


def _quiet_fit(X, K=4, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(K, **{**KW, **kw}).fit(X)


def _same_fit(a, b):
    for attr in ("means_", "covariances_", "weights_", "lower_bound_", "n_iter_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr), err_msg=attr)


def test_tensor_that_requires_grad_is_read_as_data():
    X, _ = make_blobs(n=700, d=4, k=4, seed=21)
    Xt = torch.from_numpy(X.copy()).requires_grad_()
    ref = _quiet_fit(X, chunk_size=256)
    g = _quiet_fit(Xt, chunk_size=256)
    _same_fit(g, ref)                   # the same fit as on the detached array, bit for bit
    init = torch.from_numpy(ref.means_.copy()).requires_grad_()
    w = torch.from_numpy(ref.weights_.astype(np.float64)).requires_grad_()
    v = torch.from_numpy(ref.covariances_.astype(np.float64)).requires_grad_()
    _same_fit(_quiet_fit(Xt, init=init, weights_init=w, covariances_init=v, kmeans_iter=0),
              _quiet_fit(X, init=ref.means_, weights_init=ref.weights_, covariances_init=ref.covariances_,
                         kmeans_iter=0))
    for name in ("score_samples", "score", "predict", "predict_proba", "bic", "aic"):
        np.testing.assert_array_equal(getattr(g, name)(Xt), getattr(ref, name)(X), err_msg=name)
    for a, b in zip(g.assign(Xt, tau=0.05), ref.assign(X, tau=0.05)):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_array_equal(GaussianMixture(4, **KW).fit_predict(Xt), ref.predict(X))
    # never modified, never part of a graph
    assert torch.equal(Xt.detach(), torch.from_numpy(X)) and Xt.requires_grad and Xt.grad is None


def test_numpy_scalar_parameters_are_accepted_and_bools_refused():
    X, _ = make_blobs(n=500, d=3, k=4, seed=22)
    f32 = np.float32(1e-3)
    _same_fit(_quiet_fit(X, tol=f32), _quiet_fit(X, tol=float(f32)))
    _same_fit(_quiet_fit(X, reg_covar=f32), _quiet_fit(X, reg_covar=float(f32)))
    _same_fit(_quiet_fit(X, tol=np.int64(0), max_iter=np.int64(3)), _quiet_fit(X, tol=0, max_iter=3))
    g = _quiet_fit(X)
    for a, b in zip(g.assign(X, tau=np.float32(0.1)), g.assign(X, tau=float(np.float32(0.1)))):
        np.testing.assert_array_equal(a, b)
    for name, bad in [("tol", True), ("reg_covar", np.bool_(False)), ("tol", "1e-3"), ("reg_covar", None)]:
        with pytest.raises(TypeError, match=f"{name} must be a real number, got"):
            GaussianMixture(4, **{**KW, name: bad}).fit(X)
    with pytest.raises(ValueError, match=r"tol must be a number >= 0, got np.float32\(nan\)"):
        GaussianMixture(4, **{**KW, "tol": np.float32("nan")}).fit(X)
    with pytest.raises(TypeError, match="tau must be a real number, got True"):
        g.assign(X, tau=True)
    with pytest.raises(ValueError, match=r"tau must be a finite number in \[0, 1\), got np.float32\(1.0\)"):
        g.assign(X, tau=np.float32(1.0))


def test_seed_none_draws_a_fresh_seed_and_bad_seeds_are_named():
    X, _ = make_blobs(n=500, d=3, k=4, seed=23)
    a, b = _quiet_fit(X, seed=None), _quiet_fit(X, seed=None)
    assert isinstance(a.seed_, int) and 0 <= a.seed_ < 2 ** 64 and a.seed_ != b.seed_
    _same_fit(_quiet_fit(X, seed=a.seed_), a)           # the drawn seed reproduces the fit
    _same_fit(_quiet_fit(X, seed=np.int64(7)), _quiet_fit(X, seed=7))
    assert _quiet_fit(X, seed=7).seed_ == 7
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\) or None"):
            GaussianMixture(4, seed=bad, **KW).fit(X)
    for bad in (1.5, "0", True):
        with pytest.raises(TypeError, match="seed must be a non-negative integer or None"):
            GaussianMixture(4, seed=bad, **KW).fit(X)


def test_reg_covar_must_be_finite_and_verbose_is_checked():
    X, _ = make_blobs(n=300, d=3, k=3, seed=24)
    for bad in (np.inf, float("nan"), -1e-6):
        with pytest.raises(ValueError, match="reg_covar must be a finite number >= 0"):
            GaussianMixture(3, reg_covar=bad, **KW).fit(X)
    with pytest.raises(ValueError, match=r"verbose must be a bool or an int >= 0 .*got -1"):
        GaussianMixture(3, verbose=-1, **KW).fit(X)
    for bad in ("yes", 1.0, None):
        with pytest.raises(TypeError, match="verbose must be a bool or an int >= 0"):
            GaussianMixture(3, verbose=bad, **KW).fit(X)
    for ok in (True, np.int64(0), 0):
        _quiet_fit(X, K=3, verbose=ok)


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_max_iter_zero_keeps_the_warm_start_and_measures_its_bound(cov):
    X, _ = make_blobs(n=800, d=4, k=4, seed=25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no ConvergenceWarning: no EM iteration was asked for
        g0 = GaussianMixture(4, covariance_type=cov, kmeans_iter=5, seed=3, chunk_size=300,
                             **{**KW, "max_iter": 0}).fit(X)
    assert (g0.n_iter_, g0.converged_, g0.history_) == (0, False, [])
    # the bound of the fitted (k-means) parameters: float64 textbook log-likelihood of the same parameters
    ref = _logsumexp(_ref_log_prob(X.astype(np.float64), g0.means_.astype(np.float64),
                                   g0.weights_.astype(np.float64), g0.covariances_.astype(np.float64))).mean()
    assert_close(g0.lower_bound_, ref, rtol=1e-6, what="lower bound of the starting parameters")
    # the same parameters are where a max_iter=1 fit starts: its first (and only) E-step measures the same
    g1 = _quiet_fit(X, covariance_type=cov, kmeans_iter=5, seed=3, chunk_size=300, max_iter=1)
    assert_close(g0.lower_bound_, g1.history_[0]["log_likelihood"], rtol=1e-7, what="bound vs EM iteration 1")


def test_values_beyond_float32_range_are_named_not_called_inf():
    X = np.random.default_rng(26).normal(size=(2100, 3))
    big = X.copy()
    big[1234, 2] = -1e39                    # finite in float64, Inf in float32
    msg = r"X has values beyond float32's range \(\|x\| > 3.4e\+38; first bad row: 1234\)"
    g = _quiet_fit(X.astype(np.float32), K=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for data in (big, torch.from_numpy(big), np.asfortranarray(big)):
            with pytest.raises(ValueError, match=msg):
                GaussianMixture(2, chunk_size=500, **KW).fit(data)
        with pytest.raises(ValueError, match=msg):
            g.score_samples(big)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)], "numpy's overflow warning leaked"
    # the first bad row decides what is reported: a NaN or a real Inf before the large value
    for value, kind in ((np.nan, "NaN"), (np.inf, "Inf")):
        both = big.copy()
        both[700, 0] = value
        with pytest.raises(ValueError, match=rf"X contains {kind} \(first bad row: 700\)"):
            GaussianMixture(2, chunk_size=500, **KW).fit(both)
    # whole arrays (as_float32_matrix): the initial means
    means = X[:2].copy()
    means[1, 0] = 1e39
    with pytest.raises(ValueError, match=r"init \(initial means\) has values beyond float32's range .*bad row: 1\)"):
        GaussianMixture(2, init=means, kmeans_iter=0, **KW).fit(X)
    # large integers are converted to float32 (rounded above 2^24), documented and accepted
    ints = (X * 1e3).astype(np.int64) + 2 ** 40
    _same_fit(_quiet_fit(ints, K=2), _quiet_fit(ints.astype(np.float32), K=2))


def test_convergence_warning_says_when_reseeding_blocked_convergence():
    # 5 distinct values for 8 components: some component owns less than half a row in every iteration and is
    # re-seeded, so the fit cannot converge however small the gain
    X = np.array([0.35] * 23 + [-1.05] * 29 + [-1.14] * 23 + [-0.18, 0.27], dtype=np.float32)[:, None]
    with pytest.warns(ConvergenceWarning) as rec:
        g = GaussianMixture(8, reg_covar=1e-3, seed=0, **{**KW, "max_iter": 15}).fit(X)
    reseeded = [h["n_reseeded"] for h in g.history_]
    assert reseeded[-1] > 0 and not g.converged_, reseeded     # the situation this test is about
    streak = len(reseeded) - max(i + 1 for i, r in enumerate(reseeded) if r == 0)
    msg = str(rec[0].message)
    assert f"the last iteration re-seeded {reseeded[-1]} degenerate component(s) (re-seeding in each of the last " \
           f"{streak} iterations)" in msg, msg
    assert "converges at an iteration that re-seeds none" in msg and ">=" not in msg, msg
    # otherwise the gain is what failed, with its absolute value; one iteration has no gain at all
    X, _ = make_blobs(n=500, d=3, k=5, spread=1.0)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 iterations \(last \|gain\| [0-9.e+-]+ >= tol=0.0\)"):
        GaussianMixture(5, tol=0.0, **{**KW, "max_iter": 2}).fit(X)
    with pytest.warns(ConvergenceWarning, match="one iteration gives no log-likelihood gain to compare with tol"):
        GaussianMixture(5, **{**KW, "max_iter": 1}).fit(X)
