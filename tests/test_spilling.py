"""Spilling / multi-assignment rules: hand-checked 2-D cases, invariants, and a float64 brute-force reference."""
import numpy as np
import pytest

from flashgmm_faiss.spilling import (
    csr_stats,
    fit_spherical_variance,
    nearest_assign,
    responsibility_spill_assign,
    second_responsibility,
    second_nearest_assign,
    soar_l2_assign,
    tau_assign_spherical,
)


def rows_of(offsets, lists):
    return [lists[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


# ---------------------------------------------------------------------------------------------- hand-checked cases
# Three centroids: P = (0, 0), A = (1, 1.45), B = (2.2, 0).
C3 = np.array([[0.0, 0.0], [1.0, 1.45], [2.2, 0.0]], dtype=np.float32)


def test_soar_picks_the_decorrelated_candidate_not_the_second_nearest():
    # x = (1, 0.3): r = x - P = (1, 0.3), ||r||^2 = 1.09 -> primary P (A: 1.3225, B: 1.53).
    # Primary loss (1 + 0.75) * 1.09 = 1.9075.
    # A: r' = (0, -1.15), ||r'||^2 = 1.3225, <r, r'> = -0.345 -> L = 1.3225 - 0.25875 = 1.06375
    # B: r' = (-1.2, 0.3), ||r'||^2 = 1.53,  <r, r'> = -1.11  -> L = 1.53 - 0.8325   = 0.6975   <- minimum
    # So SOAR spills to B (index 2) although A (index 1) is the second nearest.
    x = np.array([[1.0, 0.3]], dtype=np.float32)
    off, li = soar_l2_assign(x, C3, lam=0.75, n_candidates=10)
    assert rows_of(off, li) == [[0, 2]]
    off, li = second_nearest_assign(x, C3, inflation=2.0)
    assert rows_of(off, li) == [[0, 1]]


def test_soar_no_copy_when_the_primary_wins():
    # x = (0.1, 0): r = (0.1, 0), primary loss 1.75 * 0.01 = 0.0175.
    # A: r' = (-0.9, -1.45): 2.9125 + 0.75 * (-0.09) = 2.845;  B: r' = (-2.1, 0): 4.41 + 0.75 * (-0.21) = 4.2525.
    # Both exceed 0.0175: no spill.
    # x = (0.9, 0.05) next to the P|B bisector-ish: r = (0.9, 0.05), ||r||^2 = 0.8125, primary loss 1.421875;
    # B: r' = (-1.3, 0.05): 1.6925 + 0.75 * (-1.1675) = 0.816875 -> spill to B.
    x = np.array([[0.1, 0.0], [0.9, 0.05]], dtype=np.float32)
    off, li = soar_l2_assign(x, C3)
    assert rows_of(off, li) == [[0], [0, 2]]


def test_soar_lambda_zero_never_spills():
    # lam = 0: candidate loss ||r'||^2 >= ||r||^2 = primary loss (the primary is the nearest): never a strict win.
    x = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    off, li = soar_l2_assign(x, C3, lam=0.0)
    assert csr_stats(off, li)["inflation"] == 1.0


def test_soar_budget_keeps_the_most_negative_gaps():
    # Gaps (L_best - L_primary): x0 = (1, 0.3): 0.6975 - 1.9075 = -1.21; x1 = (0.9, 0.05): 0.816875 - 1.421875
    # = -0.605; x2 = (0.1, 0): no spill. max_inflation = 4/3 on n = 3 -> one copy: x0's.
    x = np.array([[1.0, 0.3], [0.9, 0.05], [0.1, 0.0]], dtype=np.float32)
    off, li, info = soar_l2_assign(x, C3, max_inflation=4 / 3, return_info=True)
    assert rows_of(off, li) == [[0, 2], [0], [0]]
    np.testing.assert_allclose(info["gap"][:2], [-1.21, -0.605], rtol=1e-5)
    assert np.isinf(info["gap"][2])


def test_second_nearest_spills_the_smallest_gaps():
    # Centroids (0,0), (2,0). Squared-distance gaps d2 - d1: (0.9,0): 1.21-0.81 = 0.4; (0.5,0): 2.25-0.25 = 2;
    # (0.1,0): 3.61-0.01 = 3.6; (1.7,0) (nearest is list 1): 2.89-0.09 = 2.8.
    # inflation 1.5 on n = 4 -> 2 copies, to the rows with gaps 0.4 and 2.
    c = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    x = np.array([[0.9, 0], [0.5, 0], [0.1, 0], [1.7, 0]], dtype=np.float32)
    off, li = second_nearest_assign(x, c, inflation=1.5)
    assert rows_of(off, li) == [[0, 1], [0, 1], [0], [1]]


def test_second_nearest_multi_copy_takes_ranks_in_order():
    # Centroids on a line at 0, 1, 3; x = 0.4: d^2 = 0.16, 0.36, 6.76 -> gaps 0.2 (rank 2), 6.6 (rank 3);
    # x = 2.2: nearest 3 (0.64), then 1 (1.44), then 0 (4.84) -> gaps 0.8, 4.2.
    # inflation 2 on n = 2 -> 2 extra copies: gaps 0.2 and 0.8 (the rank-2 copies), not 4.2 or 6.6.
    c = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    x = np.array([[0.4, 0], [2.2, 0]], dtype=np.float32)
    off, li = second_nearest_assign(x, c, inflation=2.0, max_copies=3)
    assert rows_of(off, li) == [[0, 1], [2, 1]]
    off, li = second_nearest_assign(x, c, inflation=2.5, max_copies=3)  # + the 4.2 gap
    assert rows_of(off, li) == [[0, 1], [2, 1, 0]]


def test_tau_spherical_hand_case():
    # Centroids (0,0), (2,0), variance 1, equal weights. x = (0.9, 0): log r0/r1 = (1.21 - 0.81) / 2 = 0.2
    # -> r0 = 1 / (1 + e^-0.2) = 0.5498, r1 = 0.4502. tau = 0.4: both lists; tau = 0.5 (= 1/K): list 0 only.
    c = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    x = np.array([[0.9, 0.0]], dtype=np.float32)
    assert rows_of(*tau_assign_spherical(x, c, 1.0, tau=0.4)) == [[0, 1]]
    assert rows_of(*tau_assign_spherical(x, c, 1.0)) == [[0]]
    assert rows_of(*tau_assign_spherical(x, c, 1.0, tau=0.4, max_assign=1)) == [[0]]
    # A weight of 0.2 / 0.8 flips the order: log r0/r1 = 0.2 + log(0.25) = -1.186 -> list 1 first.
    assert rows_of(*tau_assign_spherical(x, c, 1.0, tau=0.2, weights=[0.2, 0.8])) == [[1, 0]]


def test_responsibility_spill_hand_case():
    # Same mixture: second responsibilities: (0.9,0): 0.4502; (0.5,0): log ratio -1 -> 0.2689;
    # (0.1,0): log ratio -1.8 -> 0.1419. inflation 4/3 on n = 3 -> one copy, to the largest (row 0).
    c = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    x = np.array([[0.9, 0], [0.5, 0], [0.1, 0]], dtype=np.float32)
    off, li = responsibility_spill_assign(x, c, 1.0, inflation=4 / 3)
    assert rows_of(off, li) == [[0, 1], [0], [0]]


def test_fit_spherical_variance_hand_case():
    # List 0 gets (0,0),(0,2) around centroid (0,1): squared residuals 1, 1 -> variance 2 / 2 / d=2 = 0.5.
    # List 1 gets (10,0),(10,4),(10,2) around (10,2): residuals 4, 4, 0 -> 8 / 3 / 2 = 4/3. Weights 2/5, 3/5.
    c = np.array([[0.0, 1.0], [10.0, 2.0]], dtype=np.float32)
    x = np.array([[0, 0], [0, 2], [10, 0], [10, 4], [10, 2]], dtype=np.float32)
    var, w = fit_spherical_variance(x, c, reg_covar=0.0)
    np.testing.assert_allclose(var, [0.5, 4 / 3], rtol=1e-6)
    np.testing.assert_allclose(w, [0.4, 0.6], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- invariants
def _random_problem(seed=0, n=301, d=7, K=23, offset=0.0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(K, d)).astype(np.float32) + offset
    x = (c[rng.integers(K, size=n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)
    return x, c


def _check_csr(off, li, n, K):
    assert off.dtype == np.int64 and li.dtype == np.int64
    assert off.shape == (n + 1,) and off[0] == 0 and off[-1] == li.shape[0]
    assert np.all(np.diff(off) >= 1)
    assert li.min() >= 0 and li.max() < K
    for row in rows_of(off, li):
        assert len(set(row)) == len(row), f"duplicate list in row {row}"


RULES = {
    "nearest": lambda x, c: nearest_assign(x, c),
    "soar": lambda x, c: soar_l2_assign(x, c),
    "soar-1.1": lambda x, c: soar_l2_assign(x, c, max_inflation=1.1),  # natural inflation here: 1.23
    "naive-1.45": lambda x, c: second_nearest_assign(x, c, 1.45),
    "naive-3copies-2.2": lambda x, c: second_nearest_assign(x, c, 2.2, max_copies=3),
}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("offset", [0.0, 300.0])  # 300: uncentred data, like SIFT
def test_l2_rule_invariants(name, offset):
    x, c = _random_problem(offset=offset)
    off, li = RULES[name](x, c)
    _check_csr(off, li, x.shape[0], c.shape[0])
    d2 = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    prim = li[off[:-1]]
    # primary is a nearest centroid (compared by distance, so exact ties cannot fail the test)
    np.testing.assert_allclose(d2[np.arange(len(x)), prim], d2.min(1), rtol=1e-5, atol=1e-3)
    if "-" in name and name != "soar":
        target = float(name.rsplit("-", 1)[1])
        assert abs(li.shape[0] - target * x.shape[0]) <= 1


def test_soar_budget_above_natural_inflation_keeps_every_spill():
    x, c = _random_problem()
    natural = soar_l2_assign(x, c)
    np.testing.assert_array_equal(soar_l2_assign(x, c, max_inflation=2.0)[1], natural[1])


@pytest.mark.parametrize("inflation", [1.0, 1.2, 1.777, 2.0])
def test_responsibility_spill_invariants(inflation):
    x, c = _random_problem(1)
    var, w = fit_spherical_variance(x, c)
    off, li = responsibility_spill_assign(x, c, var, inflation, weights=w)
    _check_csr(off, li, x.shape[0], c.shape[0])
    assert abs(li.shape[0] - inflation * x.shape[0]) <= 1
    assert csr_stats(off, li)["max_copies"] <= 2


# ---------------------------------------------------------------------------------------------- float64 references
def _soar_reference(x, c, lam, n_cand):
    """Row-by-row float64 SOAR-L2: returns primary, secondary (-1: none) and gap."""
    x, c = x.astype(np.float64), c.astype(np.float64)
    prim, sec, gap = [], [], []
    for xi in x:
        d2 = ((xi - c) ** 2).sum(1)
        order = np.argsort(d2, kind="stable")
        p = order[0]
        r = xi - c[p]
        lp = (1 + lam) * (r @ r)
        losses = [((xi - c[j]) @ (xi - c[j])) + lam * (r @ (xi - c[j])) for j in order[1:n_cand + 1]]
        j = int(np.argmin(losses))
        prim.append(p)
        if losses[j] < lp:
            sec.append(order[1 + j])
            gap.append(losses[j] - lp)
        else:
            sec.append(-1)
            gap.append(np.inf)
    return np.array(prim), np.array(sec), np.array(gap)


@pytest.mark.parametrize("lam,n_cand", [(0.75, 10), (1.0, 3), (0.5, 22)])
def test_soar_matches_float64_reference(lam, n_cand):
    x, c = _random_problem(2, n=400, d=9, K=23)
    prim, sec, gap = _soar_reference(x, c, lam, n_cand)
    off, li, info = soar_l2_assign(x, c, lam=lam, n_candidates=n_cand, return_info=True, chunk_size=37)
    rows = rows_of(off, li)
    assert [r[0] for r in rows] == prim.tolist()
    assert [r[1] if len(r) > 1 else -1 for r in rows] == sec.tolist()
    np.testing.assert_allclose(info["gap"], gap, rtol=1e-4, atol=1e-4)
    # budgeted: exactly the spills with the most negative reference gaps
    budget = int(round(0.25 * len(x)))
    off, li = soar_l2_assign(x, c, lam=lam, n_candidates=n_cand, max_inflation=1.25)
    spilled = np.nonzero(np.diff(off) == 2)[0]
    expect = np.argsort(gap, kind="stable")[:min(budget, int(np.isfinite(gap).sum()))]
    assert set(spilled.tolist()) == set(expect.tolist())


def test_second_nearest_matches_float64_reference():
    x, c = _random_problem(3, n=500, d=6, K=17)
    d2 = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    gaps = np.take_along_axis(d2, order, 1)[:, 1] - d2.min(1)
    off, li = second_nearest_assign(x, c, 1.3, chunk_size=64)
    spilled = np.nonzero(np.diff(off) == 2)[0]
    assert set(spilled.tolist()) == set(np.argsort(gaps, kind="stable")[:150].tolist())
    assert [r[1] for r in rows_of(off, li) if len(r) == 2] == order[spilled, 1].tolist()


def test_tau_spherical_matches_float64_reference():
    x, c = _random_problem(4, n=300, d=5, K=11)
    var = np.random.default_rng(5).uniform(0.2, 0.6, size=11)
    w = np.random.default_rng(6).uniform(0.5, 1.5, size=11)
    w = w / w.sum()
    d2 = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    lp = np.log(w) - 0.5 * 5 * np.log(var) - 0.5 * d2 / var
    r = np.exp(lp - lp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    tau = 1 / 11
    off, li = tau_assign_spherical(x, c, var, weights=w, chunk_size=50)
    for i, row in enumerate(rows_of(off, li)):
        order = np.argsort(-r[i], kind="stable")
        expect = [int(order[0])] + [int(k) for k in order[1:] if r[i, k] > tau]
        assert row == expect, f"row {i}: {row} != {expect} (resp {np.sort(r[i])[::-1][:4]})"


def test_tau_spherical_agrees_with_gaussian_mixture_assign():
    from flashgmm_faiss.gmm import GaussianMixture

    x, c = _random_problem(7, n=300, d=4, K=9)
    g = GaussianMixture(9, kmeans_iter=3, max_iter=5, tol=1.0, device="cpu", backend="torch", seed=0).fit(x)
    off_ref, li_ref, _ = g.assign(x)
    off, li = tau_assign_spherical(x, g.means_, g.covariances_, weights=g.weights_)
    np.testing.assert_array_equal(off, off_ref)
    np.testing.assert_array_equal(li, li_ref)


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    x, c = _random_problem()
    with pytest.raises(ValueError, match="2-D"):
        nearest_assign(x[0], c)
    with pytest.raises(ValueError, match="dimension"):
        soar_l2_assign(x[:, :3], c)
    with pytest.raises(ValueError, match="lam"):
        soar_l2_assign(x, c, lam=-1)
    with pytest.raises(ValueError, match="n_candidates"):
        soar_l2_assign(x, c, n_candidates=0)
    with pytest.raises(ValueError, match="max_inflation"):
        soar_l2_assign(x, c, max_inflation=2.5)
    with pytest.raises(ValueError, match="inflation"):
        second_nearest_assign(x, c, 0.5)
    with pytest.raises(ValueError, match="tau"):
        tau_assign_spherical(x, c, 1.0, tau=1.0)
    with pytest.raises(ValueError, match="variance"):
        tau_assign_spherical(x, c, np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[5, 0] = np.nan
        nearest_assign(bad, c)


def test_single_centroid_rules_work_with_default_tau():
    # K = 1: the default tau (1/K would be 1.0, outside [0, 1)) becomes 0; every rule puts each row in list 0 once
    x, _ = _random_problem()
    c = x[:1] + 0.5
    for off, li in (tau_assign_spherical(x, c, 1.0), nearest_assign(x, c), soar_l2_assign(x, c),
                    second_nearest_assign(x, c, 1.0), responsibility_spill_assign(x, c, 1.0, 1.0)):
        np.testing.assert_array_equal(off, np.arange(len(x) + 1))
        np.testing.assert_array_equal(li, np.zeros(len(x)))
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\)"):
        tau_assign_spherical(x, c, 1.0, tau=1.0)  # an explicit tau is still checked
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\)"):
        tau_assign_spherical(x, c, 1.0, tau=True)


def test_soar_relative_ranking_divides_the_gap_by_the_primary_loss():
    # Gaps from test_soar_budget_keeps_the_most_negative_gaps: x0: -1.21 / 1.9075 = -0.634; x1: -0.605 / 1.421875
    # = -0.425. Scale x1's problem by 3 (all coordinates): its absolute gap becomes -5.445 (most negative), its
    # relative gap stays -0.425, so "gap" keeps the scaled x1 and "relative" keeps x0. (The scaled copy is moved
    # by (100, 0): SOAR is translation invariant.)
    c = np.concatenate([C3, 3 * C3 + [100.0, 0.0]]).astype(np.float32)
    x = np.array([[1.0, 0.3], [102.7, 0.15]], dtype=np.float32)
    off, li = soar_l2_assign(x, c, max_inflation=1.5, n_candidates=2)
    assert rows_of(off, li) == [[0], [3, 5]]
    off, li = soar_l2_assign(x, c, max_inflation=1.5, n_candidates=2, rank_by="relative")
    assert rows_of(off, li) == [[0, 2], [3]]


def test_soar_priority_reorders_the_budget_among_soar_spills():
    # x0 and x1 both spill to B (gaps -1.21 and -0.605, see above), x2 does not. A priority that prefers x1 and
    # x2 gives the single copy to x1: x2 is not a SOAR spill, so its priority is ignored.
    x = np.array([[1.0, 0.3], [0.9, 0.05], [0.1, 0.0]], dtype=np.float32)
    off, li = soar_l2_assign(x, C3, max_inflation=4 / 3, priority=[0.0, -1.0, -2.0])
    assert rows_of(off, li) == [[0], [0, 2], [0]]


def test_second_responsibility_hand_case():
    # Centroids (0,0), (2,0), variance 1: (0.9,0) -> 0.4502, (0.5,0) -> 0.2689, (0.1,0) -> 0.1419 (see above).
    c = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    x = np.array([[0.9, 0], [0.5, 0], [0.1, 0]], dtype=np.float32)
    np.testing.assert_allclose(second_responsibility(x, c, 1.0), [0.450166, 0.268941, 0.141851], rtol=1e-5)
