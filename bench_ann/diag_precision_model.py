"""A float64 model of the 16-bit ("tf32") diag E-step, to explain the GPU tests' numbers on a CPU.

The fused kernels compute the diag logits as ``(x~^2) . P~ + x~ . A~ + cst`` with 11-bit operands (x~ the rows,
P~ = 1/var, A~ = -2 mu / var, rounded to 11 significant bits; cst formed from them) and fp32 accumulation. This
script runs EM in float64 with exactly that rounding, in three variants, on the GPU test's problem
(``tests/test_gmm_gpu.py``: 50,000 uncentred SIFT-like rows clipped to 0..255, K=64, D=128, means = random rows,
var = 400):

* ``float64``      : the exact E-step;
* ``one-term sq``  : x~^2 rounded to 11 bits (one 16-bit term of the squares, the kernels before 2026-11-21 19:20);
* ``two-term sq``  : x~^2 exact (two 16-bit terms, the kernels since), products accumulated in fp32;
* ``two-term A``   : also A = -2 mu / var as two 11-bit terms (the kernels since 2026-11-22): one rounding of A moves
  each component's implied mean -A~ / (2 P~) by ~2^-12 mu, a bias its rows share, which dominated the one-step
  variance error (1.1e-3 -> 1.9e-4).
* ``fp8 corrections``: as ``two-term A`` with the two correction products in fp8 e4m3 (4 significant bits, range
  ignored: an ideal per-tensor scale), ``r4(ql) . r4(P~) + r4(x~) . r4(A_lo)``, accumulated apart in fp32 and added:
  a model of pass 1 with two of its four products at twice the rate (kernels/NOTES.md v27), not implemented.

It prints the mean log-likelihood of 10 EM steps and the smallest variance per step (a variance of the float64
fit collapses onto clipped values at step 3), then the one-step variance error against float64 of the kernel
model, split into its sources. Runs in about a minute on 8 CPU threads; writes JSON to ``--out``.

    python -m bench_ann.diag_precision_model --out bench_ann/results
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def sift_like(n, d, k, seed=0):
    """Uncentred clustered data in 0..255, like SIFT descriptors (n, d) float32: the data of the GPU tests in
    tests/test_gmm_gpu.py, which import it from here."""
    r = np.random.default_rng(seed)
    centers = r.uniform(20, 200, size=(k, d))
    labels = r.integers(k, size=n)
    x = centers[labels] + r.normal(scale=r.uniform(5, 20, size=k)[labels, None], size=(n, d))
    return np.clip(x, 0, 255).astype(np.float32)


def r11(t):
    """Round to 11 significant bits (fp16's and tf32's significand; range ignored)."""
    return _round_bits(t, 11)


def r4(t):
    """Round to 4 significant bits (fp8 e4m3's significand; range ignored)."""
    return _round_bits(t, 4)


def _round_bits(t, bits):
    m, e = torch.frexp(t)
    return torch.ldexp(torch.round(m * 2 ** bits) / 2 ** bits, e)


def logits(x, mu, v, w, variant):
    p = 1.0 / v
    if variant == "float64":
        dist = (x * x) @ p.T + x @ (-2 * mu * p).T + (mu * mu * p).sum(1)
    else:
        xt, pt, at = r11(x), r11(p), r11(-2 * mu * p)
        a_lo = r11(-2 * mu * p - at)
        if variant in ("two-term A", "fp8 corrections"):
            cst = ((at + a_lo) ** 2 / (4 * pt)).sum(1)             # consistent with the rounded operands
        else:
            cst = (at * at / (4 * pt)).sum(1)
        if variant == "fp8 corrections":
            q = xt * xt
            qh = r11(q)
            corr = r4(q - qh).float() @ r4(pt).float().T + r4(xt).float() @ r4(a_lo).float().T
            dist = (((qh.float() @ pt.float().T + xt.float() @ at.float().T) + cst.float()) + corr).double()
        else:
            if variant == "two-term A":
                at = at + a_lo
            q = r11(xt * xt) if variant == "one-term sq" else xt * xt
            dist = ((q.float() @ pt.float().T + xt.float() @ at.float().T) + cst.float()).double()   # fp32 sums
    return torch.log(w) - 0.5 * (torch.log(2 * torch.pi * v).sum(1) + dist)


def em_path(x, mu, v, w, variant, iters, reg=1e-6):
    out = []
    for _ in range(iters):
        lp = logits(x, mu, v, w, variant)
        lz = torch.logsumexp(lp, 1)
        r = torch.exp(lp - lz[:, None])
        nk = r.sum(0)
        mu = (r.T @ x) / nk[:, None]
        v = ((r.T @ (x * x)) / nk[:, None] - mu * mu).clamp_min(0) + reg
        w = nk / nk.sum()
        out.append({"log_likelihood": lz.mean().item(), "min_var": v.min().item()})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", default="bench_ann/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    X = sift_like(50_000, 128, 64)
    means = X[np.random.default_rng(1).choice(len(X), 64, replace=False)]
    x = torch.as_tensor(X, dtype=torch.float64)
    c = x.mean(0)
    x = x - c                                                       # the estimator centres the rows
    mu = torch.as_tensor(means, dtype=torch.float64) - c
    v = torch.full((64, 128), 400.0, dtype=torch.float64)
    w = torch.full((64,), 1 / 64, dtype=torch.float64)

    variants = ("float64", "one-term sq", "two-term sq", "two-term A", "fp8 corrections")
    paths = {name: em_path(x, mu, v, w, name, args.iters) for name in variants}
    print("step | " + " | ".join(f"{n}: mean log-lik (min var)" for n in variants))
    for i in range(args.iters):
        print(f"{i + 1:4d} | " + " | ".join(f"{paths[n][i]['log_likelihood']:12.4f} ({paths[n][i]['min_var']:.3g})"
                                           for n in variants))

    # one EM step: the variance error of the kernel model against float64, by source
    def one_step_var(r_stats, r_nk, xs):
        nk = r_nk.sum(0)
        sx = r_stats.T @ xs
        sq = r_stats.T @ (xs * xs) - 2 * mu * sx + nk[:, None] * mu * mu
        return sq / nk[:, None] - (sx / nk[:, None] - mu) ** 2

    r64 = torch.softmax(logits(x, mu, v, w, "float64"), 1)
    rk = torch.softmax(logits(x, mu, v, w, "two-term sq"), 1)
    ra = torch.softmax(logits(x, mu, v, w, "two-term A"), 1)
    r8 = torch.softmax(logits(x, mu, v, w, "fp8 corrections"), 1)
    ref = one_step_var(r64, r64, x)
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    one_step = {
        "r rounded to 11 bits in R^T X, R^T x^2 (exact logits)": rel(one_step_var(r11(r64), r64, x)),
        "logits from the 11-bit operands (exact r, exact rows in the statistics)": rel(one_step_var(rk, rk, x)),
        "the kernel model (both)": rel(one_step_var(r11(rk), rk, r11(x))),
        "the kernel model with A as two terms": rel(one_step_var(r11(ra), ra, r11(x))),
        "the kernel model with fp8 correction products": rel(one_step_var(r11(r8), r8, r11(x))),
        "max |logit error| (nats)":
            (logits(x, mu, v, w, "two-term sq") - logits(x, mu, v, w, "float64")).abs().max().item(),
        "max |logit error| with A as two terms (nats)":
            (logits(x, mu, v, w, "two-term A") - logits(x, mu, v, w, "float64")).abs().max().item(),
        "max |logit error| with fp8 correction products (nats)":
            (logits(x, mu, v, w, "fp8 corrections") - logits(x, mu, v, w, "float64")).abs().max().item(),
    }
    print("\none EM step, norm-relative variance error against float64:")
    for k, val in one_step.items():
        print(f"  {k}: {val:.3g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "diag_precision_model.json"
    f.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "paths": paths, "one_step": one_step,
                             "command": "python -m bench_ann.diag_precision_model"}, indent=1))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
