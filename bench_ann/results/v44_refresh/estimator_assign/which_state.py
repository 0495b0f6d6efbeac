"""One-off, second step: which of bench_assign's earlier rows makes GaussianMixture.assign slower in its process
(~21 ms there, 7-11 ms in a fresh one)? The estimator's call is timed (wall loop and do_bench) in a fresh process,
then after each of bench_assign's other workloads in turn: torch.compile'd chunked score, the torch-path assign
on pieces, the float64 reference. Run from the repository root:
``PYTHONPATH=. python bench_ann/results/v44_refresh/estimator_assign/which_state.py``."""
import torch

from _setup import K, fitted_model, wall
from bench_ann.bench_kernels import bench
from flashgmm_faiss import _torch_backend as tb
from flashgmm_faiss._triton_backend import TritonBackend

X, g = fitted_model()
g._inference_setup(X[:1])
center, means, var, lw = g._dev_params


def report(state):
    for cap in (2, None):
        f = lambda cap=cap: g.assign(X, max_assign=cap)
        print(f"{state:32s} cap {cap}: wall {wall(f):6.2f} ms, do_bench {bench(f, 200):6.2f} ms", flush=True)


report("fresh")
compiled = torch.compile(tb.score)
for _ in range(3):
    [compiled(X[s:s + (1 << 17)], means, var, lw, center) for s in range(0, X.shape[0], 1 << 17)]
torch.cuda.synchronize()
report("after torch.compile score")
torch._dynamo.reset()
report("after dynamo reset")
for _ in range(3):
    TritonBackend._torch_pieces(tb.assign, X, K, means, var, lw, 1 / K, K, center)
torch.cuda.synchronize()
report("after torch-path assign")
xs = X[:8192]
tb.assign(xs.double(), means.double(), var.double(), lw.double(), 1 / K, K, center.double())
report("after float64 reference")
print(f"GPU memory reserved {torch.cuda.memory_reserved() / 2**30:.1f} GiB, allocated "
      f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
torch.cuda.empty_cache()
report("after empty_cache")
