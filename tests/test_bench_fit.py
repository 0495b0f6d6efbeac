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
