"""Real data (MNIST 60k x 784 from ../shared/data): GMM-IVF against FAISS k-means IVF at the same K."""
import warnings

import faiss
import numpy as np
import pytest

from data_scripts.prepare import read_idx_images
from flashgmm_faiss import build_gmm_ivf, sweep
from flashgmm_faiss.evaluation import dco_at_recall

from conftest import SHARED_DATA

MNIST = SHARED_DATA / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="MNIST not in ../shared/data")
def test_mnist_gmm_multi_needs_fewer_dco_than_kmeans_at_recall_09():
    xb = read_idx_images(MNIST / "train-images-idx3-ubyte.gz").astype(np.float32)   # (60000, 784)
    xq = read_idx_images(MNIST / "t10k-images-idx3-ubyte.gz").astype(np.float32)    # (10000, 784)
    flat = faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)
    _, gt = flat.search(xq, 10)
    K = 64
    nprobes = [1, 2, 3, 4, 5, 6, 8]

    kmeans = faiss.IndexIVFFlat(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], K)  # FAISS defaults (25 iterations)
    kmeans.cp.seed = 0
    kmeans.train(xb)
    kmeans.add(xb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm_ivf = build_gmm_ivf(xb, K=K, seed=0, backend="torch")  # tau = 1/K, no cap: the paper's rule
    assert gmm_ivf.ntotal == len(xb)
    rows_km = sweep(kmeans, xq, gt, k=10, nprobes=nprobes)
    rows_gmm = sweep(gmm_ivf, xq, gt, k=10, nprobes=nprobes)
    dco_km = dco_at_recall(rows_km, 0.9)
    dco_gmm = dco_at_recall(rows_gmm, 0.9)
    assert dco_km is not None and dco_gmm is not None, f"recall@10 = 0.9 not reached: {rows_km}, {rows_gmm}"
    print(f"\nMNIST K={K}: scan DCO/query at recall@10=0.9: k-means {dco_km:.0f}, GMM tau=1/K {dco_gmm:.0f} "
          f"(inflation {gmm_ivf.inflation:.3f}); ratio {dco_km / dco_gmm:.3f}")
    assert dco_gmm < dco_km
