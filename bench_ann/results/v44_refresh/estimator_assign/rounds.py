"""One-off, third step: GaussianMixture.assign (uncapped) split into the kernel call and the three device-to-host
copies, 20 rounds in a row, to see which part moves when the call's time changes (7-21 ms across runs and within
one process). Spherical, 5 k-means + 10 EM, K=1024, SIFT-like 1e6 x 128 on the GPU. Run from the repository root:
``PYTHONPATH=. python bench_ann/results/v44_refresh/estimator_assign/rounds.py``."""
import numpy as np
import torch

from _setup import fitted_model, wall

X, g = fitted_model()
data, means, var, lw = g._inference_setup(X)
(_, x, kw), = list(g._stream(data, check=True))


def ms(fn):
    return wall(fn, calls=5, warm=False), None


c, li, r = g._impl.assign(x, means, var, lw, 1 / 1024, 1024, **kw)
pin = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (c, li, r)]
print("round  estimator  kernel  copies(pageable)  copies(pinned)  np.empty+fill 20MB", flush=True)
for i in range(20):
    a, _ = ms(lambda: g.assign(X))
    b, _ = ms(lambda: g._impl.assign(x, means, var, lw, 1 / 1024, 1024, **kw))
    cp, _ = ms(lambda: (torch.cumsum(c, 0).cpu().numpy(), li.cpu().numpy(), r.cpu().numpy()))
    pp, _ = ms(lambda: [p.copy_(t) for p, t in zip(pin, (c, li, r))])
    hf, _ = ms(lambda: np.ones(5 << 20, np.float32))
    print(f"{i:5d} {a:10.2f} {b:7.2f} {cp:17.2f} {pp:15.2f} {hf:10.2f}", flush=True)
