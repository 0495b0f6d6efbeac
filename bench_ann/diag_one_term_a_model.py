"""Can diag "tf32" drop A's second fp16 term (one product per pair fewer) and keep its 1e-3 accuracy? A float64 model.

Diag "tf32" logits take A = -2 mu / var as two fp16 terms (``kernels.estep.DIAG_SPLIT_A``, NOTES.md v9): four fp16
products per (row, component) pair in pass 1. Pass 1 with three (the diag bf16 form, no A_lo ring) ran ~0.25 ms
faster on an H100 (v30), which would bring the diag fit near the issue's 2.5 ms. This script measures, in float64
with the kernels' roundings (11-bit rows, P = 1/var and A, ``cst`` consistent with the rounded operands, r rounded to
11 bits in the statistics), what that costs in accuracy, on two problems:

* ``bench``: the kernel benchmark's state (``bf16_precision_model.kmeans_state``: centred SIFT-like rows, 256
  clusters, 3 k-means steps), relative error of Nk, Sx, Sq;
* ``test``: the GPU test's problem (``tests/test_gmm_gpu.py``: 50,000 uncentred SIFT-like rows, K=64, var 400,
  means = random rows; as ``bench_ann/diag_precision_model.py``), one-step error of Nk, means and variances.

Variants: ``two-term A`` (shipped), ``one-term A`` (A rounded from the exact P, as ``DIAG_SPLIT_A = False``),
``one-term A from P~`` (A rounded from the rounded P: the implied mean -A~ / 2P~ then carries A's rounding only),
``pass 1 one-term`` (bench only: logZ from one-term logits, the statistics' logits two-term: rows' r no longer sum
to 1), ``joint J`` (test only: P~ moved by up to J ulps to bring -A~ / 2P~ closer to mu).

    python -m bench_ann.diag_one_term_a_model bench 65536 1024
    python -m bench_ann.diag_one_term_a_model test

Measured (kernels/NOTES.md v32): bench K=1024 Sq 3.85e-4 shipped, 3.94e-4 one-term, 6.33e-4 pass 1 one-term
(K=4096: 3.99e-4 and **1.09e-3**); test variances 1.89e-4 shipped, 1.12e-3 one-term, 8.0e-4 from P~, 2.4-3.0e-3
joint. Not adopted.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from bench_ann.bf16_precision_model import kmeans_state
from bench_ann.diag_precision_model import r11, sift_like


def _operands(mu, v, variant):
    """(P~, A~, cst) of the kernel model; float64 exact for 'float64'."""
    p = 1.0 / v
    if variant == "float64":
        return p, -2 * mu * p, (mu * mu * p).sum(1)
    pt = r11(p)
    if variant in ("two-term A", "pass 1 one-term"):
        a = r11(-2 * mu * p)
        a = a + r11(-2 * mu * p - a)
    elif variant == "one-term A":
        a = r11(-2 * mu * p)
    elif variant == "one-term A from P~":
        a = r11(-2 * mu * pt)
    elif variant.startswith("joint"):
        j_max = int(variant.split()[1])
        _, e = torch.frexp(pt)
        best = None
        for j in range(-j_max, j_max + 1):
            pc = pt + j * torch.ldexp(torch.ones_like(pt), e - 11)
            ac = r11(-2 * mu * pc)
            cost = (ac / (-2 * pc) - mu).abs() * torch.sqrt(p) * 2 + (pc / p - 1).abs()
            if best is None:
                best, pt_b, a_b = cost, pc, ac
            else:
                take = cost < best
                best, pt_b, a_b = torch.where(take, cost, best), torch.where(take, pc, pt_b), torch.where(take, ac, a_b)
        pt, a = pt_b, a_b
    else:
        raise ValueError(variant)
    return pt, a, (a * a / (4 * pt)).sum(1)


def _dist(xt, ops, exact):
    pt, a, cst = ops
    if exact:
        return (xt * xt) @ pt.T + xt @ a.T + cst
    return ((xt * xt).float() @ pt.float().T + xt.float() @ a.float().T + cst.float()).double()   # fp32 sums


def bench(n, k, variants=("two-term A", "one-term A", "one-term A from P~", "pass 1 one-term")):
    d = 128
    x, mu, var, lw = kmeans_state(n, k, d)
    bias = lw - 0.5 * (d * math.log(2 * math.pi) + torch.log(var).sum(1))

    def stats(variant):
        exact = variant == "float64"
        xt = x if exact else r11(x)
        ops = _operands(mu, var, variant)
        ops1 = _operands(mu, var, "one-term A") if variant == "pass 1 one-term" else ops
        nk, sx, sxx = torch.zeros(k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64), 0
        for i in range(0, n, 8192):
            xb = xt[i:i + 8192]
            lp = bias - 0.5 * _dist(xb, ops, exact)
            lz = torch.logsumexp(bias - 0.5 * _dist(xb, ops1, exact) if ops1 is not ops else lp, 1, keepdim=True)
            r = torch.exp(lp - lz)
            ro = r if exact else r11(r)
            nk, sx, sxx = nk + r.sum(0), sx + ro.T @ xb, sxx + ro.T @ (xb * xb)
        return nk, sx, sxx - 2 * mu * sx + nk[:, None] * mu * mu
    ref = stats("float64")
    for v in variants:
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(stats(v), ref)]
        print(f"bench n={n} K={k} {v:<20} Nk {errs[0]:.2e} Sx {errs[1]:.2e} Sq {errs[2]:.2e}", flush=True)


def test(variants=("two-term A", "one-term A", "one-term A from P~", "joint 1", "joint 2")):
    X = sift_like(50_000, 128, 64)
    means = X[np.random.default_rng(1).choice(len(X), 64, replace=False)]
    x = torch.as_tensor(X, dtype=torch.float64)
    c = x.mean(0)
    x = x - c
    mu = torch.as_tensor(means, dtype=torch.float64) - c
    v = torch.full((64, 128), 400.0, dtype=torch.float64)
    bias = math.log(1 / 64) - 0.5 * torch.log(2 * torch.pi * v).sum(1)

    def one_step(r, xs):
        nk = r.sum(0)
        sx = r.T @ xs
        sq = r.T @ (xs * xs) - 2 * mu * sx + nk[:, None] * mu * mu
        return nk, sx / nk[:, None], sq / nk[:, None] - (sx / nk[:, None] - mu) ** 2
    ref = one_step(torch.softmax(bias - 0.5 * _dist(x, _operands(mu, v, "float64"), True), 1), x)
    xt = r11(x)
    for variant in variants:
        r = torch.softmax(bias - 0.5 * _dist(xt, _operands(mu, v, variant), False), 1)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(one_step(r11(r), xt), ref)]
        print(f"test {variant:<20} Nk {errs[0]:.2e} means {errs[1]:.2e} variances {errs[2]:.2e}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "bench":
        bench(int(sys.argv[2]), int(sys.argv[3]))
    else:
        test()
