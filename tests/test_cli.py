"""The command line: demo on the bundled data, build/search/sweep on user files of each format."""
import json
import warnings

import faiss
import numpy as np
import pytest

from flashgmm_faiss import ConvergenceWarning, GaussianMixture, GMMIVFIndex, cli, recall_at_k
from flashgmm_faiss.evaluation import dco_at_recall
from flashgmm_faiss.io import read_vectors, write_ann_hdf5, write_vectors

from conftest import REPO, SHARED_DATA, make_blobs


def test_bundled_siftsmall_matches_the_shared_texmex_files():
    xb, xq, gt = cli.load_siftsmall()
    assert xb.shape == (10000, 128) and xq.shape == (100, 128) and gt.shape == (100, 100)
    # exact top-1 by brute force (independent of the stored ground truth)
    index = faiss.IndexFlatL2(128)
    index.add(xb)
    _, I = index.search(xq, 1)
    assert np.mean(I[:, 0] == gt[:, 0]) == 1.0
    src = SHARED_DATA / "siftsmall"
    if not src.exists():
        pytest.skip("shared siftsmall files not present")
    np.testing.assert_array_equal(xb, np.load(src / "siftsmall_base.u8.npy").astype(np.float32))
    np.testing.assert_array_equal(xq, read_vectors(src / "siftsmall_query.fvecs"))
    np.testing.assert_array_equal(gt, read_vectors(src / "siftsmall_groundtruth.ivecs"))


def test_demo_writes_table_json_and_png(tmp_path, capsys):
    payload = cli.run_demo(tmp_path, K=16, max_iter=15, quiet=True)
    out = capsys.readouterr().out
    assert "| nprobe |" in out and "gmm-multi" in out and "kmeans" in out
    data = json.loads((tmp_path / "demo_siftsmall.json").read_text())
    assert set(data["methods"]) == {"kmeans", "gmm-single", "gmm-multi", "gmm-multi-cap2", "gmm-soar@1.6"}
    assert (tmp_path / "demo_siftsmall.png").stat().st_size > 10_000
    for m, res in payload["methods"].items():
        last = res["sweep"][-1]
        assert last["nprobe"] == 16 and last["recall_at_10"] == 1.0, m  # full probe = exhaustive
        assert last["dco_scan_per_query"] == pytest.approx(10000 * res["inflation"])
    assert payload["methods"]["gmm-multi-cap2"]["max_copies"] <= 2
    soar = payload["methods"]["gmm-soar@1.6"]
    assert soar["max_copies"] <= 2 and 1.0 < soar["inflation"] <= 1.6 + 1e-4


def test_dco_at_recall_interpolates():
    rows = [{"dco_scan_per_query": 100, "recall_at_10": 0.5}, {"dco_scan_per_query": 400, "recall_at_10": 0.9},
            {"dco_scan_per_query": 200, "recall_at_10": 0.7}]
    assert dco_at_recall(rows, 0.9) == pytest.approx(400)
    assert dco_at_recall(rows, 0.8) == pytest.approx(np.sqrt(200 * 400))
    assert dco_at_recall(rows, 0.95) is None


@pytest.mark.parametrize("fmt", [".npy", ".fvecs", ".fbin", ".bvecs", ".u8bin", ".hdf5"])
def test_build_search_sweep_on_files(tmp_path, fmt, capsys):
    xb, _ = make_blobs(n=1500, d=12, k=20, seed=3, spread=20.0, offset=100.0)
    xb = np.clip(xb, 0, 255)
    xq = xb[:40] + 0.5
    if fmt in (".bvecs", ".u8bin"):
        xb, xq = xb.round().astype(np.uint8), xq.round().astype(np.uint8)
    flat = faiss.IndexFlatL2(12)
    flat.add(xb.astype(np.float32))
    _, gt = flat.search(xq.astype(np.float32), 20)
    if fmt == ".hdf5":
        base = queries = tmp_path / "data.hdf5"
        write_ann_hdf5(base, xb, xq, gt.astype(np.int32), metric="l2")
        gt_args = []
    else:
        base, queries, gtf = tmp_path / f"base{fmt}", tmp_path / f"q{fmt}", tmp_path / "gt.ivecs"
        write_vectors(base, xb)
        write_vectors(queries, xq)
        write_vectors(gtf, gt.astype(np.int32))
        gt_args = ["--gt", str(gtf)]
    idx = str(tmp_path / "index.faiss")
    extra = ["--assignment", "soar", "--spill-budget", "1.5"] if fmt == ".fbin" else []
    assert cli.main(["build", "--base", str(base), "--out", idx, "--K", "8", "--max-iter", "10",
                     "--backend", "torch", "--device", "cpu"] + extra) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[0])
    assert built["ntotal"] == 1500 and built["nlist"] == 8 and built["inflation"] >= 1.0
    assert built["assignment"] == ("soar" if extra else "tau")
    if extra:
        assert built["inflation"] <= 1.5 + 1e-3
    res = tmp_path / "res.npz"
    assert cli.main(["search", "--index", idx, "--queries", str(queries), "--k", "10", "--nprobe", "8",
                     "--out", str(res)] + gt_args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recall_at_10"] == 1.0  # nprobe = K: exhaustive
    with np.load(res) as z:
        assert z["I"].shape == (40, 10) and recall_at_k(z["I"], gt, 10) == 1.0
    sweep_json = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--index", idx, "--queries", str(queries), "--nprobes", "1,2,8", "--out",
                     str(sweep_json), "--plot", str(tmp_path / "s.png")] + gt_args) == 0
    rows = json.loads(sweep_json.read_text())["sweep"]
    assert [r["nprobe"] for r in rows] == [1, 2, 8] and rows[-1]["recall_at_10"] == 1.0
    assert (tmp_path / "s.png").exists()
    capsys.readouterr()
    assert cli.main(["info", "--index", idx]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = GMMIVFIndex.load(idx).stats()
    expected["copies_histogram"] = expected["copies_histogram"][:20]
    assert shown == json.loads(json.dumps(expected))
    assert shown["ntotal"] == 1500 and shown["nlist"] == 8 and sum(shown["copies_histogram"]) == 1500


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["build", "--base", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "i")]) == 2
    assert "nope.npy" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((5, 3), dtype=np.float32))
    assert cli.main(["build", "--base", str(tmp_path / "x.npy"), "--out", str(tmp_path / "i"), "--K", "8"]) == 2
    assert "larger than the number of training vectors" in capsys.readouterr().err
    assert cli.main(["sweep", "--index", "i", "--queries", str(tmp_path / "x.npy")]) == 2
    assert "--gt is required" in capsys.readouterr().err


def test_build_checks_index_options_before_reading_or_fitting(tmp_path, capsys, monkeypatch):
    def fit(self, X, *args, **kwargs):
        raise AssertionError("GaussianMixture.fit was called before the bad option was refused")

    monkeypatch.setattr(GaussianMixture, "fit", fit)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32))
    base = ["build", "--base", str(tmp_path / "x.npy"), "--out", str(tmp_path / "i"), "--K", "4",
            "--backend", "torch", "--device", "cpu"]
    cases = [(["--tau", "2"], r"--tau must be a number in [0, 1)"),
             (["--max-assign", "0"], "--max-assign must be >= 1, got 0"),
             (["--assignment", "soar", "--spill-budget", "0.5"], "--spill-budget is a target inflation in [1, 2]"),
             (["--spill-budget", "1.5"], "--spill-budget only applies to --assignment soar"),
             (["--soar-lambda", "0.5"], "--soar-lambda only applies to --assignment soar"),
             (["--assignment", "soar", "--tau", "0.1"], "--tau and --max-assign apply to --assignment tau"),
             (["--K", "0"], "--K must be >= 1, got 0")]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not (tmp_path / "i").exists()


def test_build_with_one_list_and_with_a_training_file(tmp_path, capsys):
    xb, _ = make_blobs(n=600, d=6, k=8, seed=5, spread=5.0)
    xt, _ = make_blobs(n=400, d=6, k=8, seed=6, spread=5.0)  # other centres: a clearly different fit
    np.save(tmp_path / "b.npy", xb)
    np.save(tmp_path / "t.npy", xt)
    common = ["--max-iter", "10", "--kmeans-iter", "5", "--seed", "2", "--backend", "torch", "--device", "cpu"]
    # --K 1: the default tau works (every vector in the single list, once)
    assert cli.main(["build", "--base", str(tmp_path / "b.npy"), "--out", str(tmp_path / "one.ivf"), "--K", "1"]
                    + common) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[0])
    assert built["ntotal"] == built["n_postings"] == 600 and built["nlist"] == 1
    # --train: the centroids are the means of a GaussianMixture fitted on the training file alone
    idx = str(tmp_path / "t.ivf")
    assert cli.main(["build", "--base", str(tmp_path / "b.npy"), "--train", str(tmp_path / "t.npy"), "--out", idx,
                     "--K", "4"] + common) == 0
    index = GMMIVFIndex.load(idx)
    cents = index.faiss_index.quantizer.reconstruct_n(0, 4)
    settings = dict(covariance_type="spherical", max_iter=10, kmeans_iter=5, seed=2, backend="torch", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref_t = GaussianMixture(4, **settings).fit(xt)
        ref_b = GaussianMixture(4, **settings).fit(xb)
    np.testing.assert_allclose(cents, ref_t.means_, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cents, ref_b.means_, atol=0.1)
    assert index.ntotal == 600


def test_sweep_rejects_bad_nprobes(tmp_path, capsys):
    xb, _ = make_blobs(n=300, d=4, k=4, seed=1)
    np.save(tmp_path / "b.npy", xb)
    np.save(tmp_path / "gt.npy", np.zeros((5, 10), dtype=np.int64))
    idx = str(tmp_path / "i.ivf")
    assert cli.main(["build", "--base", str(tmp_path / "b.npy"), "--out", idx, "--K", "4", "--max-iter", "5",
                     "--backend", "torch", "--device", "cpu"]) == 0
    np.save(tmp_path / "q.npy", xb[:5])
    for bad in ("1,2.5", "0,1", "a"):
        assert cli.main(["sweep", "--index", idx, "--queries", str(tmp_path / "q.npy"), "--gt",
                         str(tmp_path / "gt.npy"), "--nprobes", bad]) == 2
        assert "--nprobes must be comma-separated integers >= 1" in capsys.readouterr().err


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'flashgmm-faiss = "flashgmm_faiss.cli:main"' in text
    assert '"flashgmm_faiss.kernels" = "kernels"' in text
