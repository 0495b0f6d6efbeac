"""GMM-IVF index: multi-assignment invariants, deduplicated search, FAISS interop, save/load."""
import warnings

import faiss
import numpy as np
import pytest

from flashgmm_faiss import (ConvergenceWarning, GaussianMixture, GMMIVFIndex, NotFittedError, add_multi_assigned,
                            add_preassigned, build_gmm_ivf, recall_at_k, search_with_dco, train_ivf_with_gmm)
from flashgmm_faiss.ivf import list_sizes, posting_ids

from conftest import make_blobs

K = 16
KW = dict(backend="torch", device="cpu", max_iter=20)


@pytest.fixture(scope="module")
def data():
    xb, _ = make_blobs(n=3000, d=8, k=40, seed=21, spread=3.0)
    xq, _ = make_blobs(n=60, d=8, k=40, seed=21, spread=3.0)  # same centres, different draws
    xq = xq + np.random.default_rng(1).normal(scale=0.3, size=xq.shape).astype(np.float32)
    return xb, xq


@pytest.fixture(scope="module")
def gmm(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(K, max_iter=30, backend="torch", device="cpu", seed=0).fit(data[0])


def _postings(index):
    """(ids, list_no) pairs stored in a faiss IVF index."""
    ivf = index.faiss_index if isinstance(index, GMMIVFIndex) else index
    ids, lists = [], []
    for l in range(ivf.nlist):
        sz = ivf.invlists.list_size(l)
        if sz:
            ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(l), sz).copy())
            lists.append(np.full(sz, l))
    return np.concatenate(ids), np.concatenate(lists)


def _brute_force(xb, xq, k):
    """Exact neighbours in float64 numpy."""
    d = ((xq[:, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1)
    I = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, I, 1), I


# ----------------------------------------------------------------------------- multi-assignment invariants
@pytest.mark.parametrize("tau,cap", [(None, None), (None, 2), (0.2, None), (0.0, 1)])
def test_multi_assignment_invariants(data, gmm, tau, cap):
    xb, _ = data
    index = build_gmm_ivf(xb, gmm=gmm, tau=tau, max_assign=cap)
    ids, lists = _postings(index)
    offsets, alists, resp = gmm.assign(xb, tau=tau, max_assign=cap)
    # every vector is stored, its argmax list included; unique ids equal the vectors added
    assert np.array_equal(np.unique(ids), np.arange(len(xb)))
    assert index.ntotal == len(xb)
    best = gmm.predict(xb)
    stored = set(zip(ids.tolist(), lists.tolist()))
    assert all((i, int(b)) in stored for i, b in enumerate(best))
    # copies equal assign()'s nnz, and exactly the assigned (id, list) pairs are stored
    assert index.n_postings == len(ids) == alists.size
    rows = np.repeat(np.arange(len(xb)), np.diff(offsets))
    assert stored == set(zip(rows.tolist(), alists.tolist()))
    assert np.isclose(index.inflation, alists.size / len(xb))
    # tau and the cap are respected
    t = 1 / K if tau is None else tau
    counts = np.bincount(ids, minlength=len(xb))
    assert counts.max() <= (cap or K) and index.max_copies == counts.max()
    first = np.zeros(alists.size, dtype=bool)
    first[offsets[:-1]] = True
    assert np.all(resp[~first] > t)
    assert index.copies_histogram.sum() == len(xb)
    assert np.array_equal(index.copies_histogram, np.bincount(counts))


def test_ids_and_incremental_add(data, gmm):
    xb, xq = data
    index = GMMIVFIndex(gmm, max_assign=3)
    index.add(xb[:1000], ids=np.arange(1000) * 7 + 5)
    index.add(xb[1000:])  # default ids continue after the largest id
    assert index.ntotal == 3000
    ids, _ = _postings(index)
    assert len(np.unique(ids)) == 3000 and np.unique(ids)[:3].tolist() == [5, 12, 19]
    with pytest.raises(ValueError, match="already in the index"):
        index.add(xb[:2], ids=[5, 10**9])
    with pytest.raises(ValueError, match="unique"):
        index.add(xb[:2], ids=[1, 1])
    _, I = index.search(xq, k=5, nprobe=K)
    mapping = np.concatenate([np.arange(1000) * 7 + 5, np.arange(6999, 6999 + 2000)])
    _, Ibf = _brute_force(xb, xq, 5)
    assert recall_at_k(I, mapping[Ibf], 5) == 1.0


# ----------------------------------------------------------------------------- search
@pytest.mark.parametrize("nprobe", [1, 3, K])
def test_search_dedup_is_true_topk_among_scanned(data, gmm, nprobe):
    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm)
    assert index.max_copies > 1, "fixture should produce copies"
    D, I, dco = search_with_dco(index, xq, k=10, nprobe=nprobe)
    assert D.shape == I.shape == (len(xq), 10)
    ids, lists = _postings(index)
    _, probed = index.faiss_index.quantizer.search(xq, nprobe)
    sizes = list_sizes(index)
    for q in range(len(xq)):
        row = I[q][I[q] >= 0]
        assert len(row) == len(set(row.tolist())), "duplicate id in results"
        cand = np.unique(ids[np.isin(lists, probed[q])])
        d = ((xb[cand].astype(np.float64) - xq[q]) ** 2).sum(1)
        expected = cand[np.argsort(d, kind="stable")[:10]]
        # compare distances (robust to ties) and the set of ids
        assert np.allclose(np.sort(D[q][I[q] >= 0]), np.sort(d)[:len(row)], rtol=1e-4, atol=1e-3)
        assert len(set(row.tolist()) ^ set(expected.tolist())) == 0 or np.isclose(
            np.sort(d)[9], np.sort(d)[10], rtol=1e-5)
        assert dco.scan[q] == sizes[probed[q]].sum()
    assert np.all(dco.routing == K)
    assert np.array_equal(dco.total, dco.scan + dco.routing)


def test_dco_equals_faiss_ndis_and_full_probe_equals_brute_force(data, gmm):
    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm)
    _, _, dco = search_with_dco(index, xq, k=10, nprobe=4)
    ivf = index.faiss_index
    ivf.nprobe = 4
    faiss.cvar.indexIVF_stats.reset()
    ivf.search(xq, 10)
    assert int(dco.scan.sum()) == faiss.cvar.indexIVF_stats.ndis
    D, I = index.search(xq, k=10, nprobe=K)
    Dbf, Ibf = _brute_force(xb, xq, 10)
    assert recall_at_k(I, Ibf, 10) == 1.0
    assert np.allclose(D, Dbf, rtol=1e-4, atol=1e-3)


def test_fewer_candidates_than_k_pads(data, gmm):
    xb, xq = data
    index = build_gmm_ivf(xb[:30], gmm=gmm, max_assign=1)
    D, I = index.search(xq[:3], k=50, nprobe=1)
    ids, lists = _postings(index)
    _, probed = index.faiss_index.quantizer.search(xq[:3], 1)
    for q in range(3):
        valid = I[q] >= 0
        assert np.all(np.isinf(D[q][~valid]))
        assert len(set(I[q][valid].tolist())) == valid.sum()
        # the valid ids are exactly the vectors stored in the probed list (30 < 50 vectors: all of them),
        # in float64 brute-force order
        in_list = ids[lists == probed[q, 0]]
        assert 0 < in_list.size < 50 and valid.sum() == in_list.size
        assert set(I[q][valid].tolist()) == set(in_list.tolist())
        d = ((xb[in_list].astype(np.float64) - xq[q]) ** 2).sum(1)
        np.testing.assert_allclose(D[q][valid], np.sort(d), rtol=1e-4, atol=1e-3)


def test_angular_metric_normalises(data):
    xb, xq = data
    xb = xb + 5.0  # give directions some spread away from the origin
    xq = xq + 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        index = build_gmm_ivf(xb, K=8, metric="angular", max_iter=10, backend="torch", device="cpu")
    D, I = index.search(xq, k=10, nprobe=8)
    nb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    nq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    cos = nq.astype(np.float64) @ nb.T.astype(np.float64)
    gt = np.argsort(-cos, axis=1)[:, :10]
    assert recall_at_k(I, gt, 10) == 1.0
    # distances are 2 - 2 cos of the returned ids (float64 reference), ascending
    np.testing.assert_allclose(D, 2.0 - 2.0 * np.take_along_axis(cos, I, 1), rtol=0, atol=2e-5)
    np.testing.assert_allclose(D, 2.0 - 2.0 * np.sort(cos, axis=1)[:, ::-1][:, :10], rtol=0, atol=2e-5)
    assert np.allclose(np.linalg.norm(index.gmm.means_, axis=1), 1.0, atol=0.2)  # means of unit vectors
    with pytest.raises(ValueError, match="zero vector"):
        index.search(np.zeros((1, 8), dtype=np.float32))


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, data, gmm):
    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm, max_assign=4)
    path = tmp_path / "gmm.ivf"
    index.save(str(path))
    assert faiss.read_index(str(path)).ntotal == index.n_postings  # plain FAISS can read it
    loaded = GMMIVFIndex.load(str(path))
    for nprobe in (1, 5):
        D1, I1 = index.search(xq, 10, nprobe)
        D2, I2 = loaded.search(xq, 10, nprobe)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
    assert loaded.ntotal == index.ntotal and loaded.inflation == index.inflation
    np.testing.assert_array_equal(loaded.gmm.means_, gmm.means_)
    np.testing.assert_array_equal(loaded.gmm.assign(xb)[1], gmm.assign(xb, max_assign=None)[1])
    loaded.add(xb[:10])  # a loaded index keeps accepting vectors, with fresh ids
    assert loaded.ntotal == index.ntotal + 10
    (tmp_path / "lonely.ivf").write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="sidecar"):
        GMMIVFIndex.load(str(tmp_path / "lonely.ivf"))
    with pytest.raises(FileNotFoundError, match="no index file"):
        GMMIVFIndex.load(str(tmp_path / "missing.ivf"))


def test_save_load_with_numpy_scalar_settings(tmp_path, data):
    # numpy scalars are valid settings (tau, tol, seed): the JSON sidecar stores them as Python numbers
    xb, xq = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        index = build_gmm_ivf(xb, K=4, tau=np.float32(0.1), tol=np.float32(1e-3), seed=np.int64(3), max_iter=5,
                              backend="torch", device="cpu")
    index.save(str(tmp_path / "np.ivf"))
    loaded = GMMIVFIndex.load(str(tmp_path / "np.ivf"))
    assert loaded.tau == float(np.float32(0.1)) and loaded.gmm.get_params()["seed"] == 3
    for a, b in zip(index.search(xq, 10, 2), loaded.search(xq, 10, 2)):
        np.testing.assert_array_equal(a, b)


def test_assign_default_tau_with_one_component(data):
    # K = 1: the default tau (1/K = 1 would be out of range) is 0, and every row gets the one component with r = 1
    xb, _ = data
    g = GaussianMixture(1, max_iter=3, backend="torch", device="cpu").fit(xb)
    offsets, lists, resp = g.assign(xb)
    np.testing.assert_array_equal(offsets, np.arange(len(xb) + 1))
    assert np.all(lists == 0) and np.allclose(resp, 1.0)


# ----------------------------------------------------------------------------- any FAISS IndexIVF
@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4", "IVF16,SQ8", "IVF16_HNSW8,Flat"])
def test_train_ivf_with_gmm_replaces_kmeans(data, factory):
    xb, xq = data
    index = faiss.index_factory(8, factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = train_ivf_with_gmm(index, xb, max_iter=10, backend="torch", device="cpu", seed=1)
    assert index.is_trained
    ivf = faiss.extract_index_ivf(index)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, K), g.means_)  # k-means did not move them
    stats = add_multi_assigned(index, xb, g, max_assign=2)
    assert stats["n_added"] == len(xb) and 1.0 <= stats["inflation"] <= 2.0
    assert np.array_equal(np.unique(posting_ids(index)), np.arange(len(xb)))
    D, I, dco = search_with_dco(index, xq, k=10, nprobe=K)
    assert all(len(set(r[r >= 0].tolist())) == (r >= 0).sum() for r in I)
    assert dco.scan.sum() == stats["n_postings"] * len(xq)
    if factory == "IVF16,Flat":
        _, Ibf = _brute_force(xb, xq, 10)
        assert recall_at_k(I, Ibf, 10) == 1.0


def test_train_ivf_with_gmm_warns_on_inner_product(data, gmm):
    xb, _ = data
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    with pytest.warns(UserWarning, match="GMM is fitted in Euclidean space; with METRIC_INNER_PRODUCT"):
        g = train_ivf_with_gmm(index, xb, gmm=gmm)
    assert g is gmm and index.is_trained
    np.testing.assert_array_equal(index.quantizer.reconstruct_n(0, K), gmm.means_)


def test_generic_index_errors(data, gmm):
    xb, _ = data
    with pytest.raises(ValueError, match="untrained"):
        trained = faiss.index_factory(8, "IVF16,Flat")
        trained.train(xb)
        train_ivf_with_gmm(trained, xb)
    with pytest.raises(TypeError, match="not an IVF index"):
        add_multi_assigned(faiss.IndexFlatL2(8), xb, gmm)
    idx = faiss.index_factory(8, "IVF8,Flat")
    idx.train(xb)
    with pytest.raises(ValueError, match="components"):
        add_multi_assigned(idx, xb, gmm)
    with pytest.raises(ValueError, match="no posting list"):
        add_preassigned(idx, xb[:2], np.array([0, 1, 1]), np.array([3]))
    with pytest.raises(ValueError, match="not trained"):
        add_preassigned(faiss.index_factory(8, "IVF8,Flat"), xb[:1], np.array([0, 1]), np.array([0]))


# ----------------------------------------------------------------------------- bad input
def test_build_bad_input(data):
    xb, _ = data
    with pytest.raises(ValueError, match="larger than the number"):
        build_gmm_ivf(xb[:10], K=16, backend="torch")
    bad = xb.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_gmm_ivf(bad, K=4, backend="torch")
    with pytest.raises(ValueError, match="metric"):
        build_gmm_ivf(xb, K=4, metric="cosine")
    with pytest.raises(ValueError, match="Expected 2D"):
        build_gmm_ivf(xb[0], K=4)


def test_search_bad_input(data, gmm):
    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        index.search(xq[:, :5])
    with pytest.raises(ValueError, match="nprobe"):
        index.search(xq, nprobe=0)
    with pytest.raises(ValueError, match="Inf"):
        index.search(np.full((2, 8), np.inf, dtype=np.float32))
    D, I = index.search(xq.astype(np.float64), k=3, nprobe=2)  # float64 accepted
    D2, I2 = index.search(np.asfortranarray(xq), k=3, nprobe=2)  # non-contiguous accepted
    np.testing.assert_array_equal(I, I2)


# ----------------------------------------------------------------------------- SOAR spilling on GMM means
@pytest.mark.parametrize("budget", [None, 1.3])
def test_soar_assignment_on_gmm_means(data, gmm, budget, tmp_path):
    from flashgmm_faiss.spilling import soar_l2_assign

    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm, assignment="soar", spill_budget=budget)
    ids, lists = _postings(index)
    offsets, expected = soar_l2_assign(xb, gmm.means_, lam=0.75, max_inflation=budget)
    rows = np.repeat(np.arange(len(xb)), np.diff(offsets))
    assert set(zip(ids.tolist(), lists.tolist())) == set(zip(rows.tolist(), expected.tolist()))
    # primary = the L2-nearest GMM mean (independent float64 check), at most one extra copy
    d2 = ((xb[:, None, :].astype(np.float64) - gmm.means_[None].astype(np.float64)) ** 2).sum(-1)
    nearest = d2.argmin(1)
    stored = set(zip(ids.tolist(), lists.tolist()))
    assert all((i, int(c)) in stored for i, c in enumerate(nearest))
    counts = np.bincount(ids, minlength=len(xb))
    assert counts.min() == 1 and counts.max() <= 2 and index.max_copies <= 2
    assert index.inflation > 1.0
    if budget is not None:
        assert index.n_postings <= round(budget * len(xb))
    # search stays exact at full probe; the settings survive save/load
    _, I = index.search(xq, k=10, nprobe=K)
    assert recall_at_k(I, _brute_force(xb, xq, 10)[1], 10) == 1.0
    index.save(str(tmp_path / "soar.ivf"))
    loaded = GMMIVFIndex.load(str(tmp_path / "soar.ivf"))
    assert loaded.assignment == "soar" and loaded.spill_budget == budget
    np.testing.assert_array_equal(loaded.search(xq, 10, 3)[1], index.search(xq, 10, 3)[1])


def test_assignment_argument_checks(gmm):
    with pytest.raises(ValueError, match="assignment"):
        GMMIVFIndex(gmm, assignment="both")
    with pytest.raises(ValueError, match="spill_budget"):
        GMMIVFIndex(gmm, assignment="soar", spill_budget=3.0)
    with pytest.raises(ValueError, match="tau and max_assign"):
        GMMIVFIndex(gmm, assignment="soar", tau=0.1)


# ----------------------------------------------------------------------------- reviewer's defects
@pytest.fixture
def no_fit(monkeypatch):
    """Make any GMM fit fail loudly: the checks under test must run before it."""
    def fit(self, X, *args, **kwargs):
        raise AssertionError("GaussianMixture.fit was called before the bad argument was refused")
    monkeypatch.setattr(GaussianMixture, "fit", fit)


def test_low_level_add_refuses_a_gmm_ivf_index_and_its_faiss_index(data, gmm):
    xb, _ = data
    index = build_gmm_ivf(xb[:500], gmm=gmm)
    before = (index.ntotal, index.n_postings)
    ivf = index.faiss_index
    for target in (index, ivf, faiss.extract_index_ivf(ivf), faiss.downcast_index(ivf)):  # any proxy of it
        with pytest.raises(TypeError, match=r"behind its back.*index\.add\(xb, ids\)"):
            add_multi_assigned(target, xb[:10], gmm)
        with pytest.raises(TypeError, match=r"index\.add\(xb, ids\)"):
            add_preassigned(target, xb[:1], np.array([0, 1]), np.array([0]))
    assert (index.ntotal, index.n_postings) == before
    index.add(xb[500:510])  # the right way still works, with fresh ids
    assert np.array_equal(np.unique(posting_ids(index)), np.arange(510))


@pytest.mark.parametrize("how", ["multi", "preassigned"])
def test_generic_add_refuses_ids_already_stored(data, gmm, how):
    xb, xq = data
    index = faiss.index_factory(8, "IVF16,Flat")
    train_ivf_with_gmm(index, xb, gmm=gmm)

    def add(x, ids=None):
        if how == "multi":
            return add_multi_assigned(index, x, gmm, ids=ids)
        return add_preassigned(index, x, *_single(gmm, x), ids=ids)

    add(xb[:100], ids=np.arange(100))
    n = index.ntotal
    with pytest.raises(ValueError, match=r"1 of the ids are already in the index \(first: 99\)"):
        add(xb[100:200], ids=np.arange(99, 199))
    assert index.ntotal == n  # nothing was added
    add(xb[100:150], ids=np.arange(1000, 1050))
    add(xb[150:200])  # default ids: consecutive after the largest stored id, so they cannot collide
    stored = np.unique(posting_ids(index))
    assert np.array_equal(stored, np.concatenate([np.arange(100), np.arange(1000, 1100)]))
    # every vector can be found: full probe equals float64 brute force on the 200 vectors
    D, I, _ = search_with_dco(index, xq, k=5, nprobe=K)
    _, Ibf = _brute_force(xb[:200], xq, 5)
    assert recall_at_k(I, stored[Ibf], 5) == 1.0


def _single(gmm, x):
    labels = gmm.predict(x).astype(np.int64)
    return np.arange(len(x) + 1, dtype=np.int64), labels


def test_search_with_dco_copies_argument(data, gmm):
    xb, xq = data
    index = build_gmm_ivf(xb, gmm=gmm)
    assert index.max_copies > 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match="copies must be >= 1"):
            search_with_dco(index, xq, k=10, nprobe=4, copies=bad)
    with pytest.raises(TypeError, match="copies must be an integer"):
        search_with_dco(index, xq, k=10, nprobe=4, copies=1.5)
    D, I, _ = search_with_dco(index, xq, k=10, nprobe=4)
    D2, I2, _ = search_with_dco(index, xq, k=10, nprobe=4, copies=index.max_copies)  # the true count: same result
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_array_equal(D, D2)
    # an underestimate is still deduplicated: never a repeated id, each returned distance is that id's own
    from flashgmm_faiss.evaluation import _search

    _, Iraw, _ = _search(index.faiss_index, xq, 10, 4, 1, dedup=False)  # FAISS's raw top-10 has repeated ids
    assert any(len(set(r.tolist())) < len(r) for r in Iraw)
    Du, Iu, _ = search_with_dco(index, xq, k=10, nprobe=4, copies=1)
    for q in range(len(xq)):
        row = Iu[q][Iu[q] >= 0]
        assert len(row) == len(set(row.tolist()))
        d = ((xb[row].astype(np.float64) - xq[q]) ** 2).sum(1)
        np.testing.assert_allclose(Du[q][Iu[q] >= 0], d, rtol=1e-4, atol=1e-3)


def test_single_component_index_works_with_default_tau(data):
    xb, xq = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        index = build_gmm_ivf(xb[:400], K=1, **KW)
        g1 = GaussianMixture(1, **KW).fit(xb[:400])
    assert index.nlist == 1 and index.ntotal == index.n_postings == 400 and index.max_copies == 1
    assert index.tau_ == 0.0 and index.stats()["tau"] == 0.0
    D, I = index.search(xq, k=10, nprobe=1)  # one list holds everything: exact
    Dbf, Ibf = _brute_force(xb[:400], xq, 10)
    assert recall_at_k(I, Ibf, 10) == 1.0
    np.testing.assert_allclose(D, Dbf, rtol=1e-4, atol=1e-3)
    idx2 = GMMIVFIndex(g1)
    idx2.add(xb[:50])
    assert idx2.ntotal == idx2.n_postings == 50
    plain = faiss.index_factory(8, "IVF1,Flat")
    train_ivf_with_gmm(plain, xb[:400], gmm=g1)
    assert add_multi_assigned(plain, xb[:50], g1)["inflation"] == 1.0
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\)"):  # an explicit tau is still checked
        GMMIVFIndex(g1, tau=1.0)


def test_index_options_are_checked_before_the_fit(data, no_fit):
    xb, _ = data
    cases = [(dict(tau=2), ValueError, r"tau must be a number in \[0, 1\).*got 2"),
             (dict(tau=-0.1), ValueError, r"tau must be"),
             (dict(max_assign=0), ValueError, "max_assign must be >= 1"),
             (dict(max_assign=1.5), TypeError, "max_assign must be an integer"),
             (dict(assignment="soar", spill_budget=0.5), ValueError, r"spill_budget is a target inflation in \[1, 2\]"),
             (dict(assignment="soar", spill_budget=2.5), ValueError, "spill_budget is a target inflation"),
             (dict(assignment="soar", soar_lambda=-1.0), ValueError, "soar_lambda must be a finite number >= 0"),
             (dict(assignment="soar", tau=0.1), ValueError, "tau and max_assign apply to assignment='tau'"),
             (dict(assignment="both"), ValueError, "assignment must be one of"),
             (dict(ids=np.zeros(len(xb), dtype=np.int64)), ValueError, "ids must be unique"),
             (dict(xt=xb[:, :5]), ValueError, "Dimension mismatch: xt has 5 features"),
             (dict(K=0), ValueError, "K must be >= 1")]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            build_gmm_ivf(xb, **{"K": 4, **kwargs}, **KW)


def test_train_ivf_with_gmm_checks_xt_before_the_fit(data, no_fit):
    xb, _ = data
    with pytest.raises(ValueError, match="Dimension mismatch: xt has 5 features per row but the model/index expects 8"):
        train_ivf_with_gmm(faiss.index_factory(8, "IVF16,Flat"), xb[:, :5], **KW)
    with pytest.raises(ValueError, match="Expected 2D array for xt"):
        train_ivf_with_gmm(faiss.index_factory(8, "IVF16,Flat"), xb[0], **KW)


def test_settings_of_the_other_rule_are_refused(data, gmm):
    xb, _ = data
    for kwargs, match in [(dict(spill_budget=1.5), "spill_budget only applies to assignment='soar'"),
                          (dict(soar_lambda=0.5), "soar_lambda only applies to assignment='soar'"),
                          (dict(spill_budget=1.5, soar_lambda=0.5), "spill_budget and soar_lambda only apply")]:
        with pytest.raises(ValueError, match=match):
            GMMIVFIndex(gmm, **kwargs)
        with pytest.raises(ValueError, match=match):
            build_gmm_ivf(xb, gmm=gmm, assignment="tau", **kwargs)
    index = GMMIVFIndex(gmm, assignment="soar", soar_lambda=0.5, spill_budget=1.2)  # fine with "soar"
    assert index.soar_lambda == 0.5 and index.spill_budget == 1.2
    assert GMMIVFIndex(gmm, assignment="soar").soar_lambda == 0.75  # the default


def test_faiss_index_must_match_the_gmm(data, gmm):
    xb, xq = data
    with pytest.raises(ValueError, match="faiss_index has nlist=8 and d=8 but the GMM has 16 components"):
        GMMIVFIndex(gmm, faiss_index=faiss.index_factory(8, "IVF8,Flat"))
    with pytest.raises(ValueError, match="faiss_index has nlist=16 and d=4 but the GMM has 16 components of "
                                         "dimension 8"):
        GMMIVFIndex(gmm, faiss_index=faiss.index_factory(4, "IVF16,Flat"))
    with pytest.raises(ValueError, match="METRIC_L2"):
        GMMIVFIndex(gmm, faiss_index=faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT))
    with pytest.raises(ValueError, match="not trained with the GMM's means"):
        GMMIVFIndex(gmm, faiss_index=faiss.index_factory(8, "IVF16,Flat"))
    km = faiss.index_factory(8, "IVF16,Flat")
    km.train(xb)  # FAISS k-means centroids, not the GMM's
    with pytest.raises(ValueError, match="centroids are not this GMM's means"):
        GMMIVFIndex(gmm, faiss_index=km)
    with pytest.raises(TypeError, match="faiss_index must be a faiss.IndexIVF"):
        GMMIVFIndex(gmm, faiss_index=faiss.IndexFlatL2(8))
    # a matching, already populated index: its ids and copy counts are read from the posting lists
    good = faiss.index_factory(8, "IVF16,Flat")
    train_ivf_with_gmm(good, xb, gmm=gmm)
    add_multi_assigned(good, xb[:300], gmm, ids=np.arange(300) + 10)
    wrapped = GMMIVFIndex(gmm, faiss_index=good)
    counts = np.unique(posting_ids(good), return_counts=True)[1]
    assert wrapped.ntotal == 300 and wrapped.max_copies == counts.max()
    assert np.array_equal(wrapped.copies_histogram, np.bincount(counts))
    with pytest.raises(ValueError, match="already in the index"):
        wrapped.add(xb[:1], ids=[10])
    wrapped.add(xb[300:310])
    assert np.array_equal(np.unique(posting_ids(good)), np.arange(10, 320))
    with pytest.raises(TypeError, match="GMMIVFIndex"):  # now owned by `wrapped`
        add_multi_assigned(good, xb[:1], gmm)


def test_unfitted_gmm_raises_not_fitted_error(data, gmm):
    xb, _ = data
    index = faiss.index_factory(8, "IVF16,Flat")
    train_ivf_with_gmm(index, xb, gmm=gmm)
    with pytest.raises(NotFittedError, match="not fitted"):
        add_multi_assigned(index, xb, GaussianMixture(K, **KW))
    with pytest.raises(NotFittedError, match="not fitted"):
        build_gmm_ivf(xb, gmm=GaussianMixture(K, **KW))
    with pytest.raises(NotFittedError, match="not fitted"):
        GMMIVFIndex(GaussianMixture(K, **KW))
    with pytest.raises(NotFittedError, match="not fitted"):
        train_ivf_with_gmm(faiss.index_factory(8, "IVF16,Flat"), xb, gmm=GaussianMixture(K, **KW))


def test_build_with_xt_uses_a_gmm_fitted_on_xt_alone(data):
    xb, _ = data
    xt, _ = make_blobs(n=1500, d=8, k=40, seed=99, spread=3.0)  # other centres: a clearly different fit
    settings = dict(covariance_type="diag", max_iter=15, kmeans_iter=5, seed=3, backend="torch", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        index = build_gmm_ivf(xb, K=8, xt=xt, **settings)
        ref_t = GaussianMixture(8, **settings).fit(xt)
        ref_b = GaussianMixture(8, **settings).fit(xb)
    cents = index.faiss_index.quantizer.reconstruct_n(0, 8)
    np.testing.assert_allclose(cents, ref_t.means_, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cents, ref_b.means_, atol=0.1)
    assert index.ntotal == len(xb)  # xb is indexed, xt only trains
