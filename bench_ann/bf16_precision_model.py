"""A float64 model of the diag bf16 E-step's statistics, to find where their error against float64 comes from.

Centred SIFT-like rows as ``bench_kernels.make_data`` draws them (256 clusters, integer values 0..255, generated here
on the CPU), parameters from 3 k-means steps (variances clamped at 1). The kernel's arithmetic is modelled in
float64 with its roundings: rows, P = 1/var and A = -2 mu / var to bf16, ``cst`` from the rounded operands, the rows'
squares exact, r rounded to bf16 in R X and R x^2. Variants (the third argument, comma-separated):

* ``shipped``      : as the kernels before v31 (statistics on the bf16 rows);
* ``split A``      : A as two bf16 terms;
* ``R exact``      : r not rounded in the products;
* ``rows exact``   : float32 rows everywhere (logits and statistics);
* ``params exact`` : P and A not rounded;
* ``stats exact``  : logits on the bf16 rows, R X and R x^2 on the exact rows;
* ``stats split``  : as ``stats exact`` with the rows and their float32 squares as two bf16 terms each: the
  kernels since v31 (``kernels.estep.BF16_EXACT_STATS``).

Prints the relative error of Nk, Sx and Sq per variant (kernels/NOTES.md v31: K=1024 Sq 3.22e-3 shipped, 1.48e-3
stats split; K=4096 3.38e-3 / 2.08e-3). CPU, float64: about a minute at N=2^16, K=1024 on 2 cores.

    python -m bench_ann.bf16_precision_model 65536 1024 "shipped,split A,rows exact,stats split"
"""
import math
import sys
import time

import torch


def kmeans_state(n, k, d=128):
    """The kernel benchmark's problem in float64 on the CPU: ``n`` centred SIFT-like rows (256 clusters, integer
    values 0..255 before centring) and parameters from 3 k-means steps (variances clamped at 1), all rounded
    through float32 as the kernels receive them. Returns x (n, d), mu (k, d), var (k, d), lw (k,)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(256, d, generator=g, dtype=torch.float64) * 60
    centres *= torch.rand(256, d, generator=g, dtype=torch.float64) < 0.4
    lab = torch.randint(0, 256, (n,), generator=g)
    x = (centres[lab] + 15 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0, 255).round()
    x = (x - x.mean(0)).float().double()
    c = x[torch.randint(0, n, (k,), generator=g)].clone()
    def assign(x, c):
        return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).argmin(1)
    for _ in range(3):
        l = assign(x, c); cnt = torch.bincount(l, minlength=k).double()
        s = torch.zeros(k, d, dtype=torch.float64).index_add_(0, l, x); nz = cnt > 0
        c[nz] = s[nz] / cnt[nz, None]
    l = assign(x, c); cnt = torch.bincount(l, minlength=k).double().clamp_min(1)
    var = (torch.zeros(k, d, dtype=torch.float64).index_add_(0, l, (x - c[l]) ** 2) / cnt[:, None]).clamp_min(1.0)
    return x, c.float().double(), var.float().double(), torch.log(cnt / cnt.sum()).float().double()


def main():
    torch.manual_seed(0)
    n, k, d = int(sys.argv[1]), int(sys.argv[2]), 128
    x, mu, var, lw = kmeans_state(n, k, d)
    bf = lambda t: t.to(torch.bfloat16).double()
    f32 = lambda t: t.float().double()
    P = 1 / var
    bias = lw - 0.5 * (d * math.log(2 * math.pi) + torch.log(var).sum(1))
    def stats(variant):
        xt = x if variant == "rows exact" else bf(x)
        if variant in ("params exact",):
            pt, at = P, -2 * mu * P
        else:
            pt, at = bf(f32(P)), bf(f32(-2 * mu * P))
            if variant == "split A":
                at = at + bf(f32(-2 * mu * P) - at)
        cst = (at * at / (4 * pt)).sum(1)
        if variant == "float64":
            xt, pt, at, cst = x, P, -2 * mu * P, (mu * mu * P).sum(1)
        nk = torch.zeros(k, dtype=torch.float64); sx = torch.zeros(k, d, dtype=torch.float64); sxx = torch.zeros_like(sx)
        for i in range(0, n, 16384):
            xb = xt[i:i + 16384]; q = xb * xb
            dist = q @ pt.T + xb @ at.T + cst
            lp = bias - 0.5 * dist
            r = torch.exp(lp - torch.logsumexp(lp, 1, keepdim=True))
            nk += r.sum(0)
            ro = r if variant in ("float64", "R exact") else bf(f32(r))
            if variant == "stats exact":
                xe = x[i:i + 16384]; sx += ro.T @ xe; sxx += ro.T @ (xe * xe)
            elif variant == "stats split":
                xe = f32(x[i:i + 16384]); xh = bf(xe); xl = bf(xe - xh); qe = f32(xe * xe); qh = bf(qe); ql = bf(qe - qh)
                sx += ro.T @ xh + ro.T @ xl; sxx += ro.T @ qh + ro.T @ ql
            else:
                sx += ro.T @ xb; sxx += ro.T @ q
        sq = sxx - 2 * mu * sx + nk[:, None] * mu * mu
        return nk, sx, sq
    t = time.time()
    ref = stats("float64")
    for v in sys.argv[3].split(","):
        got = stats(v)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        print(f"{v:<14} nk {errs[0]:.2e} sx {errs[1]:.2e} sq {errs[2]:.2e}  ({time.time()-t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
