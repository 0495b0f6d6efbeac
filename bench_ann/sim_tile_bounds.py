"""CPU simulation (float64): could pass 1 skip (64-row tile, 64-component block) pairs with a cheap per-tile bound?

On a diag fit's state (torch backend, CPU), rows sorted by their exact block bits (the transient order's key),
this counts the pairs each bound keeps against the ideal (the union of the tile's rows' block bits): the tile's
bounding box (per feature, the distance from the mean to the box, weighted by 1 / var) and its bounding sphere
(the triangle inequality with the largest 1 / var). A block is kept when the bound of some component's logit
reaches the lowest row maximum of the tile minus 24 bits. NOTES.md v30: both keep every pair.

    python -m bench_ann.sim_tile_bounds synth [N]      # SIFT-like rows (default 2^17), K=1024, D=128
    python -m bench_ann.sim_tile_bounds glove          # out/glove200k.npy, first 100k rows, K=1024
"""
import importlib
import math
import sys
import time
import warnings

import numpy as np
import torch

from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture

ke = importlib.import_module("flashgmm_faiss.kernels.estep")
SKIP = 24 * math.log(2)

def state(x, k, em_iter=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(k, covariance_type="diag", tol=0.0, backend="torch", device="cpu", kmeans_iter=10,
                            max_iter=em_iter, seed=0).fit(x)
    return (torch.as_tensor(g.means_).double(), torch.as_tensor(g.covariances_).double(),
            torch.log(torch.as_tensor(g.weights_).double()))

def logits(x, mu, var, lw):
    P = 1 / var
    c = lw - 0.5 * torch.log(2 * math.pi * var).sum(1) - 0.5 * (mu * mu * P).sum(1)
    out = []
    for s in range(0, x.shape[0], 8192):
        xb = x[s:s + 8192].double()
        out.append(c - 0.5 * (xb * xb) @ P.T + xb @ (mu * P).T)
    return torch.cat(out)

def sim(name, x, k, tile=64, blk=64):
    t0 = time.time()
    mu, var, lw = state(x, k)
    perm = ke.component_order(mu.float())
    mu, var, lw = mu[perm], var[perm], lw[perm]
    L = logits(x, mu, var, lw)                       # (n, k)
    n = x.shape[0]
    nb = -(-k // blk)
    m = L.max(1).values
    bm = torch.stack([L[:, b * blk:(b + 1) * blk].max(1).values for b in range(nb)], 1)   # (n, nb)
    rbits = bm >= (m - SKIP)[:, None]
    key = (rbits.long() * (1 << torch.arange(nb))).sum(1)
    order = torch.argsort(key, stable=True)
    xs, ms, rb = x[order].double(), m[order], rbits[order]
    nt = -(-n // tile)
    P = 1 / var
    c = lw - 0.5 * torch.log(2 * math.pi * var).sum(1)
    ideal = 0
    kept = {"box": 0, "sphere": 0, "min": 0}
    for t in range(nt):
        xt = xs[t * tile:(t + 1) * tile]
        thr = (ms[t * tile:(t + 1) * tile] - SKIP).min()
        ideal += rb[t * tile:(t + 1) * tile].any(0).sum().item()
        lo, hi = xt.min(0).values, xt.max(0).values
        gap = torch.clamp(torch.maximum(lo - mu, mu - hi), min=0)          # (k, d)
        ub_box = c - 0.5 * (gap * gap * P).sum(1)
        cen = xt.mean(0)
        dc = ((cen - mu) ** 2 * P).sum(1).sqrt()
        r = ((xt - cen) ** 2).sum(1).max().sqrt()
        lb = torch.clamp(dc - r * P.max(1).values.sqrt(), min=0)
        ub_sph = c - 0.5 * lb * lb
        for bound, ub in (("box", ub_box), ("sphere", ub_sph), ("min", torch.minimum(ub_box, ub_sph))):
            kept[bound] += (ub.view(nb, blk).max(1).values >= thr).sum().item()
    tot = nt * nb
    print(f"{name}: n={n} k={k} d={x.shape[1]}: kept pairs: ideal {ideal / tot:.3f}  "
          + "  ".join(f"{b} {v / tot:.3f}" for b, v in kept.items())
          + f"  rows' own bits {rbits.float().mean():.3f}  ({time.time() - t0:.0f} s)", flush=True)

if __name__ == "__main__":
    which = sys.argv[1]
    if which == "synth":
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 17
        x = sift_like(n, 128, 2000, device="cpu")
        x = x - x.mean(0)
        sim("sift_like", x, 1024)
    elif which == "glove":
        a = np.load("out/glove200k.npy")[:100000].astype(np.float32)
        x = torch.from_numpy(a)
        x = x - x.mean(0)
        sim("glove", x, 1024)
