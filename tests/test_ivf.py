"""GMM-IVF index: multi-assignment invariants, deduplicated search, FAISS interop, save/load."""
import warnings

import faiss
import numpy as np
import pytest

from flashgmm_faiss import (ConvergenceWarning, GaussianMixture, GMMIVFIndex, add_multi_assigned, add_preassigned,
                            build_gmm_ivf, recall_at_k, search_with_dco, train_ivf_with_gmm)
from flashgmm_faiss.ivf import list_sizes, posting_ids

from conftest import make_blobs

K = 16


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
    for q in range(3):
        valid = I[q] >= 0
        assert np.all(np.isinf(D[q][~valid]))
        assert len(set(I[q][valid].tolist())) == valid.sum()


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
    gt = np.argsort(-(nq.astype(np.float64) @ nb.T.astype(np.float64)), axis=1)[:, :10]
    assert recall_at_k(I, gt, 10) == 1.0
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
