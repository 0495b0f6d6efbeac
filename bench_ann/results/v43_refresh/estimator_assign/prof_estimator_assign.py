"""One-off profile of ``GaussianMixture.assign`` (host CSR output) before and after v43's host-side change.

A spherical model (K=1024) fitted for 3 + 3 iterations on 1e6 SIFT-like rows on the GPU, then the wall time of
``g.assign(X)`` with a cap of 2 and without a cap (X on the GPU), a cProfile of five calls each, and ``predict``.
Run from the repository root:
``PYTHONPATH=. python bench_ann/results/v43_refresh/estimator_assign/prof_estimator_assign.py``.
"""
import cProfile, pstats, time, warnings, io
import torch
from flashgmm_faiss import GaussianMixture
from bench_ann.bench_fit import sift_like

X = sift_like(1_000_000, 128, 2000)
if isinstance(X, tuple):
    X = X[0]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    g = GaussianMixture(1024, covariance_type="spherical", kmeans_iter=3, max_iter=3, tol=0.0, backend="triton",
                        device="cuda", seed=0).fit(X)
for cap in (2, None):
    for _ in range(2):
        g.assign(X, max_assign=cap)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        g.assign(X, max_assign=cap)
    print("cap", cap, "wall ms", (time.perf_counter() - t) / 5 * 1e3, flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        g.assign(X, max_assign=cap)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue()[:6000], flush=True)
t = time.perf_counter()
for _ in range(5):
    g.predict(X)
print("predict wall ms", (time.perf_counter() - t) / 5 * 1e3)
