"""CPU checks of the fit benchmark's data loading (bench_ann/bench_fit.py runs on a GPU)."""
import argparse

import numpy as np
import pytest
import torch

from bench_ann.bench_fit import add_problem_args, load_rows
from flashgmm_faiss.io import write_vectors


@pytest.mark.parametrize("ext,dtype", [(".npy", np.uint8), (".npy", np.float16), (".fvecs", np.float32)])
def test_load_rows_reads_converts_and_normalises_like_numpy(tmp_path, ext, dtype):
    # any file read_vectors reads, any dtype: float32 rows converted in pieces (here 7 rows), the first n only,
    # and unit rows with normalize (angular sets), against numpy in float64
    r = np.random.default_rng(0)
    x = (r.uniform(0, 200, size=(50, 9))).astype(dtype)
    path = tmp_path / f"rows{ext}"
    if ext == ".npy":
        np.save(path, x)
    else:
        write_vectors(path, x)
    got = load_rows(path, n=None, device="cpu", piece=7)
    assert got.dtype == torch.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float32))
    got = load_rows(path, n=20, normalize=True, device="cpu", piece=7)
    ref = x[:20].astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)


def test_problem_args_take_a_data_file_and_keep_the_synthetic_defaults():
    p = argparse.ArgumentParser()
    add_problem_args(p)
    a = p.parse_args([])
    assert (a.n, a.d, a.data, a.normalize) == (None, None, None, False)      # problem_rows: 1e6 x 128 synthetic
    a = p.parse_args(["--data", "x.npy", "--normalize", "--n", "1e5"])
    assert (a.n, a.data, a.normalize) == (100_000, "x.npy", True)


def test_ab_trees_alternates_the_trees_and_tabulates_medians(tmp_path, monkeypatch, capsys):
    # bench_ann/ab_trees.py (its children need a GPU): the parent runs one child per tree per round, in turn, and
    # reports each tree's median over rounds, the ratio to the first tree and every final log-likelihood; the
    # children's results are canned here, the table is checked against statistics.median
    import json
    import statistics

    from bench_ann import ab_trees
    trees = {}
    for name in ("base", "new"):
        (tmp_path / name / "flashgmm_faiss").mkdir(parents=True)
        trees[name] = (tmp_path / name).resolve()
    ms = {"base": [2.6, 2.5, 2.7], "new": [2.4, 2.45, 2.9]}
    calls = []

    def fake_child(tree, args):
        name = next(n for n, t in trees.items() if t == tree)
        r = sum(c == name for c in calls)
        calls.append(name)
        return {"device": "fake", "fits": {"diag tf32": {"ms": ms[name][r], "kmeans_ms": 1.0 + r,
                                                         "log_likelihood": -1.5 if name == "base" else -1.25}}}
    monkeypatch.setattr(ab_trees, "_run_child", fake_child)
    ab_trees.main(["--trees", f"base={trees['base']},new={trees['new']}", "--fits", "diag tf32", "--rounds", "3",
                   "--out", str(tmp_path / "out")])
    assert calls == ["base", "new"] * 3
    table = json.loads((tmp_path / "out" / "ab_trees.json").read_text())["table"]["diag tf32"]
    for name in trees:
        assert table[name]["ms"] == pytest.approx(statistics.median(ms[name]))
        assert table[name]["kmeans_ms"] == pytest.approx(2.0)
    assert table["new"]["log_likelihood"] == [-1.25]
    assert f"{statistics.median(ms['new']) / statistics.median(ms['base']):.3f}x" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ab_trees.main(["--trees", f"base={tmp_path / 'missing'}"])
