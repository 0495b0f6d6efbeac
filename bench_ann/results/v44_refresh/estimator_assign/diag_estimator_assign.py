"""One-off: why does bench_assign time GaussianMixture.assign at ~21 ms when a plain wall-clock loop (v43's
prof_estimator_assign.py) measured 7.4 / 9.7 ms? Same fit as bench_assign (spherical, 5 k-means + 10 EM, K=1024,
SIFT-like 1e6 x 128 on the GPU); the estimator's call timed by a wall loop, by bench_kernels.bench (do_bench) and
split into its parts (kernel call, device->host copies, host arrays). Run from the repository root:
``PYTHONPATH=. python bench_ann/results/v44_refresh/estimator_assign/diag_estimator_assign.py``."""
import numpy as np
import torch

from _setup import fitted_model, wall
from bench_ann.bench_kernels import bench

X, g = fitted_model()

for cap in (2, None):
    f = lambda cap=cap: g.assign(X, max_assign=cap)
    print(f"cap {cap}: wall {wall(f):.2f} ms, do_bench {bench(f, 200):.2f} ms, wall again {wall(f):.2f}", flush=True)
data, means, var, lw = g._inference_setup(X)
(_, x, kw), = list(g._stream(data, check=True))
for cap in (2, None):
    k = lambda cap=cap: g._impl.assign(x, means, var, lw, 1 / 1024, 1024 if cap is None else cap, **kw)
    c, li, r = k()
    print(f"cap {cap}: impl.assign {wall(k):.2f} ms; dtypes {c.dtype} {li.dtype} {r.dtype}; nnz {li.shape[0]}",
          flush=True)
    print(f"  copies: counts cumsum+cpu {wall(lambda: torch.cumsum(c, 0).cpu().numpy()):.2f} ms, "
          f"lists cpu {wall(lambda: li.cpu().numpy()):.2f}, resp cpu {wall(lambda: r.cpu().numpy()):.2f}, "
          f"astype int64 {wall(lambda: li.cpu().numpy().astype(np.int64, copy=False)):.2f}, "
          f"np.zeros offsets {wall(lambda: np.zeros(x.shape[0] + 1, np.int64)):.2f}", flush=True)
    print(f"  stream setup {wall(lambda: list(g._stream(g._inference_setup(X)[0], check=True))):.2f} ms", flush=True)
    pin = torch.empty(li.shape[0], dtype=li.dtype, pin_memory=True)
    print(f"  lists into pinned {wall(lambda: pin.copy_(li)):.2f} ms", flush=True)
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
with prof:
    for _ in range(3):
        g.assign(X, max_assign=None)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
