"""A/B of the screened diag pass 1 (``kernels/logz_screened.py``) against the dense one, on a fit's state.

For each problem a diag ``GaussianMixture`` is fitted twice on the same data, with ``--em-iter`` - 1 and
``--em-iter`` EM iterations (same seed: consecutive states). The transient row order of the first state (rows
sorted by their block bits, as ``estep(sort_rows=True)`` builds it) is the order the screened pass 1 of the
second state visits, as it would in a fit; the second state's own order is the optimistic case. For each
variant this prints the median ms over interleaved rounds, the fraction of (program, block) pairs computed
exactly, the largest |logZ - dense logZ| and the number of rows whose block bits differ from the dense pass 1's
(must be 0). Problems: the fit benchmark's data (``bench_fit.sift_like``, 2000 clusters) and, with ``--npy``,
rows of a .npy file (e.g. GloVe; ``--normalize`` for angular data). Writes ``ab_screen_pass1.json``.

    python -m bench_ann.ab_screen_pass1 --out DIR [--npy glove.npy --normalize]
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import torch

from bench_ann.bench_kernels import add_shape_args, add_timing_args, bench


def fit_states(x, k, em_iter):
    """(center, means, var, log_weights) of diag "tf32" fits after em_iter - 1 and em_iter EM iterations."""
    from flashgmm_faiss import GaussianMixture
    center = x.mean(0)
    out = []
    for it in (em_iter - 1, em_iter):
        g = GaussianMixture(k, covariance_type="diag", kmeans_iter=3, max_iter=it, tol=0, backend="triton",
                            precision="tf32", device=x.device.type).fit(x)
        means = torch.as_tensor(g.means_, device=x.device).float() - center
        var = torch.as_tensor(g.covariances_, device=x.device).float()
        lw = torch.log(torch.as_tensor(g.weights_, device=x.device).float())
        out.append((means.contiguous(), var.contiguous(), lw))
    return center, out


def run_problem(name, x, k, a, res):
    import triton
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    ks = importlib.import_module("flashgmm_faiss.kernels.logz_screened")
    from flashgmm_faiss import kernels
    n, d = x.shape
    center, states = fit_states(x, k, a.em_iter)
    nb = triton.cdiv(k, ke.FLAG_K)
    orders = []
    for means, var, lw in states:
        perm = kernels.component_order(means)
        params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, center)), comp_perm=perm)
        _, _, rows, _ = ke.transient_order(x, params, k, True, "tf32", center=center)
        orders.append(rows)
    rb_dense = ke._row_bits_buffer(n, nb, x.device)

    def dense():
        return ke.launch_logz(x, params, k, True, "tf32", center=center, row_bits=rb_dense)[0]

    def dense_triton():
        ke.GLUON_PASS1 = False
        try:
            return ke.launch_logz(x, params, k, True, "tf32", center=center, row_bits=rb_dense)[0]
        finally:
            ke.GLUON_PASS1 = True

    lz_ref = dense().double()
    bits_ref = rb_dense.clone()
    fns = {"dense": dense, "dense_triton": dense_triton}
    checks = {}
    for oname, rows in (("prev_order", orders[0]), ("own_order", orders[1])):
        label = f"screened_{oname}"
        rb = ke._row_bits_buffer(n, nb, x.device)

        def f(rows=rows, rb=rb):
            return ks.screened_logz(x, params, k, rows, center=center, row_bits=rb)

        lz, visits = ks.screened_logz(x, params, k, rows, center=center, row_bits=rb, count=True)
        progs = int((visits > 0).sum())
        checks[label] = {"exact_fraction": float(visits.sum()) / (progs * nb), "programs": progs,
                         "max_abs_logz_diff": float((lz.double() - lz_ref).abs().max()),
                         "rows_with_other_bits": int((rb != bits_ref).sum())}
        fns[label] = f
        fns[f"screen_only_{oname}"] = lambda rows=rows, rb=rb: ks.screened_logz(x, params, k, rows, center=center,
                                                                                row_bits=rb, screen_only=True)
    times = {name: [] for name in fns}
    for _ in range(a.rounds):
        for fname, f in fns.items():
            times[fname].append(bench(f, a.rep))
    configs = {str(key): str(cfg) for key, cfg in ks._screened_logz_kernel.cache.items()}
    res[name] = {"n": n, "k": k, "d": d, "times_ms": times, "checks": checks, "screened_configs": configs}
    print(f"[{name}] n={n} k={k} d={d}; screened configs: {configs}", flush=True)
    for fname in fns:
        c = checks.get(fname, {})
        extra = (f"  exact {c['exact_fraction']:.3f}  |dlogZ| {c['max_abs_logz_diff']:.1e}  bits differ "
                 f"{c['rows_with_other_bits']}") if c else ""
        print(f"  {fname:<28} ms " + " ".join(f"{v:.3f}" for v in times[fname]) + extra, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    add_timing_args(ap, rep=40)
    ap.add_argument("--em-iter", type=int, default=8)
    ap.add_argument("--npy", default=None)
    ap.add_argument("--npy-k", type=int, default=1024)
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    from bench_ann.bench_fit import sift_like
    dev = torch.device(a.device)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(a), "problems": {}}
    if not a.skip_synthetic:
        run_problem("sift_like", sift_like(a.n, a.d, 2000, device=a.device), a.k, a, out["problems"])
    if a.npy:
        x = torch.from_numpy(np.load(a.npy).astype(np.float32)).to(dev)
        if a.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        run_problem(Path(a.npy).stem, x.contiguous(), a.npy_k, a, out["problems"])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_screen_pass1.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
