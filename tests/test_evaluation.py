"""Evaluation helpers against independent references: recall@k against Python set intersections, the Pareto
frontier and its interpolation against hand-worked values, deduplicated search on an inner-product index against
float64 brute force."""
import math

import faiss
import numpy as np
import pytest

from flashgmm_faiss import recall_at_k, search_with_dco
from flashgmm_faiss.evaluation import (cost_on_frontier, dco_at_recall, dedup_topk, default_nprobes, pareto_frontier,
                                       sweep)


def _recall_by_sets(I, gt, k):
    """Recall@k with Python sets: |first k results (ids >= 0) & first k true ids| / k, averaged over queries."""
    return sum(len({int(i) for i in row[:k] if i >= 0} & {int(g) for g in true[:k]})
               for row, true in zip(I, gt)) / (k * len(I))


# ----------------------------------------------------------------------------- recall@k
def test_recall_at_k_matches_set_intersections():
    rng = np.random.default_rng(0)
    gt = np.stack([rng.permutation(50)[:12] for _ in range(40)])
    I = rng.integers(-1, 50, size=(40, 15))        # -1 padding and repeated ids included
    I[:5, :10] = gt[:5, :10]                        # some perfect rows
    I[5:10, :10] = gt[5:10, ::-1][:, 2:]            # right ids in another order, two of them beyond the first 10
    for k in (1, 5, 10, 12):
        assert recall_at_k(I, gt, k) == pytest.approx(_recall_by_sets(I, gt, k), abs=0)
    assert recall_at_k(gt[:, :10], gt, 10) == 1.0


def test_recall_at_k_counts_a_repeated_id_once_and_ignores_padding():
    gt = np.array([[1, 2, 3, 4]])
    assert recall_at_k(np.array([[1, 1, 1, 1]]), gt, 4) == 0.25   # one true neighbour, found four times
    assert recall_at_k(np.array([[-1, -1, 2, -1]]), gt, 4) == 0.25
    assert recall_at_k(np.array([[4, 3, 9, 9]]), gt, 2) == 0.0    # 4 and 3 are not among the first 2 true ids


def test_recall_at_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one row per query"):
        recall_at_k(np.zeros((3, 10)), np.zeros((4, 10)), 10)
    with pytest.raises(ValueError, match="one row per query"):
        recall_at_k(np.zeros(10), np.zeros((1, 10)), 10)
    with pytest.raises(ValueError, match="at least 10 columns"):
        recall_at_k(np.zeros((3, 5)), np.zeros((3, 10)), 10)


# ----------------------------------------------------------------------------- Pareto frontier and interpolation
def _rows(points):
    return [{"dco_scan_per_query": c, "recall_at_10": r} for c, r in points]


def test_pareto_frontier_keeps_the_points_no_cheaper_point_beats():
    rows = _rows([(400, 0.8), (100, 0.5), (200, 0.5), (300, 0.9), (800, 0.9), (50, 0.2), (1600, 1.0)])
    xs, ys = pareto_frontier(rows)
    assert xs.tolist() == [50, 100, 300, 1600]      # (200, .5) ties (100, .5); (400, .8) loses to (300, .9)
    assert ys.tolist() == [0.2, 0.5, 0.9, 1.0]


def test_cost_on_frontier_interpolates_log_cost_linearly_in_recall():
    xs, ys = np.array([100.0, 400.0]), np.array([0.5, 0.9])
    assert cost_on_frontier(xs, ys, 0.7) == pytest.approx(200.0)            # halfway in recall: geometric mean
    assert cost_on_frontier(xs, ys, 0.6) == pytest.approx(math.exp(math.log(100) + 0.25 * math.log(4)))
    assert cost_on_frontier(xs, ys, 0.9) == pytest.approx(400.0)
    assert cost_on_frontier(xs, ys, 0.3) == 100.0                           # already reached: the cheapest point
    assert cost_on_frontier(xs, ys, 0.95) is None                           # never reached
    assert cost_on_frontier(np.array([]), np.array([]), 0.5) is None
    rows = _rows([(400, 0.9), (100, 0.5), (250, 0.4)])
    assert dco_at_recall(rows, 0.7) == pytest.approx(200.0)


def test_default_nprobes_doubles_up_to_nlist():
    assert default_nprobes(1) == [1]
    assert default_nprobes(16) == [1, 2, 4, 8, 16]
    assert default_nprobes(100) == [1, 2, 4, 8, 16, 32, 64, 100]


# ----------------------------------------------------------------------------- dedup_topk
def test_dedup_topk_keeps_the_best_copy_of_each_id():
    D = np.array([[0.5, 0.1, 0.3, 0.1, 9.0, 0.0]], dtype=np.float32)
    I = np.array([[7, 3, 7, 3, 5, -1]])
    Do, Io = dedup_topk(D, I, 4)
    assert Io.tolist() == [[3, 7, 5, -1]] and Do[0, :3].tolist() == pytest.approx([0.1, 0.3, 9.0])
    assert np.isinf(Do[0, 3]) and Do[0, 3] > 0
    Do, Io = dedup_topk(D, I, 4, larger_is_better=True)                    # inner products: largest first
    assert Io.tolist() == [[5, 7, 3, -1]] and Do[0, :3].tolist() == pytest.approx([9.0, 0.5, 0.1])
    assert np.isinf(Do[0, 3]) and Do[0, 3] < 0


# ----------------------------------------------------------------------------- inner-product indexes
@pytest.fixture(scope="module")
def ip_index():
    """An IVF16,Flat inner-product index on unit rows, every vector stored twice (two lists) under its own id."""
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(2000, 12)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.normal(size=(30, 12)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    index = faiss.index_factory(12, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    _, lists = index.quantizer.search(xb, 2)
    ids = np.arange(len(xb), dtype=np.int64)
    ivf = faiss.extract_index_ivf(index)
    for j in range(2):                      # two copies of every vector, in its two best lists
        assigned = np.ascontiguousarray(lists[:, j])
        ivf.add_core(len(xb), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
    return index, xb, xq


def test_inner_product_search_dedups_and_matches_float64_brute_force(ip_index):
    index, xb, xq = ip_index
    assert index.ntotal == 2 * len(xb)
    D, I, dco = search_with_dco(index, xq, k=10, nprobe=16)
    sims = xq.astype(np.float64) @ xb.T.astype(np.float64)
    gt = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert recall_at_k(I, gt, 10) == 1.0
    assert all(len(set(row.tolist())) == 10 for row in I)                  # each id once despite two copies
    assert np.allclose(D, np.take_along_axis(sims, gt, 1), atol=1e-5)      # inner products, largest first
    assert np.all(np.diff(D, axis=1) <= 1e-6)
    assert np.all(dco.scan == 2 * len(xb)) and np.all(dco.routing == 16)


def test_sweep_rows_match_search_with_dco(ip_index):
    index, xb, xq = ip_index
    gt = np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1)[:, :10]
    rows = sweep(index, xq, gt, k=10, nprobes=[1, 3, 16])
    assert [r["nprobe"] for r in rows] == [1, 3, 16]
    for r in rows:
        _, I, dco = search_with_dco(index, xq, k=10, nprobe=r["nprobe"])
        assert r["recall_at_10"] == pytest.approx(_recall_by_sets(I, gt, 10), abs=0)
        assert r["dco_scan_per_query"] == pytest.approx(dco.scan.mean())
        assert r["dco_total_per_query"] == pytest.approx(r["dco_scan_per_query"] + r["dco_routing_per_query"])
    assert rows[-1]["recall_at_10"] == 1.0
    assert rows[0]["dco_scan_per_query"] < rows[1]["dco_scan_per_query"] < rows[2]["dco_scan_per_query"]


# ----------------------------------------------------------------------------- argument checks
def test_recall_at_k_rejects_k_below_one():
    I = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        recall_at_k(I, I, k=0)
    with pytest.raises(ValueError, match="k must be >= 1, got -2"):
        recall_at_k(I, I, k=-2)
    with pytest.raises(TypeError, match="k must be an integer"):
        recall_at_k(I, I, k=1.5)


def test_sweep_checks_nprobes_k_and_gt(ip_index):
    index, xb, xq = ip_index
    gt = np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1)[:, :10]
    with pytest.raises(TypeError, match="each nprobe must be an integer, got 2.7"):
        sweep(index, xq, gt, nprobes=[2.7])
    with pytest.raises(TypeError, match="each nprobe must be an integer"):
        sweep(index, xq, gt, nprobes=[True])
    with pytest.raises(ValueError, match="each nprobe must be >= 1, got 0"):
        sweep(index, xq, gt, nprobes=[1, 0])
    with pytest.raises(ValueError, match="nprobes is empty"):
        sweep(index, xq, gt, nprobes=[])
    with pytest.raises(TypeError, match="nprobes must be an int or an iterable of ints"):
        sweep(index, xq, gt, nprobes="1,2")
    with pytest.raises(ValueError, match="k must be >= 1"):
        sweep(index, xq, gt, k=0, nprobes=[1])
    with pytest.raises(ValueError, match=r"gt must be 2-D with one row per query \(30\)"):
        sweep(index, xq, gt[:5], nprobes=[1])
    with pytest.raises(ValueError, match="at least 20 columns in gt"):
        sweep(index, xq, gt, k=20, nprobes=[1])
    # a single int is one sweep point, the same as a one-element list
    one = sweep(index, xq, gt, nprobes=4)
    assert len(one) == 1 and one[0]["nprobe"] == 4
    ref = sweep(index, xq, gt, nprobes=[np.int64(4)])[0]
    assert {k: v for k, v in one[0].items() if k not in ("qps", "seconds")} == \
        {k: v for k, v in ref.items() if k not in ("qps", "seconds")}
    _, I, _ = search_with_dco(index, xq, k=10, nprobe=4)
    assert one[0]["recall_at_10"] == pytest.approx(_recall_by_sets(I, gt, 10), abs=0)
