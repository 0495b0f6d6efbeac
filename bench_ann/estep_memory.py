"""Device memory of the transient-order E-step (``kernels.estep(sort_rows=True)``) per phase, on one GPU: the
measurements behind ``flashgmm_faiss._chunk_plan``'s per-row constants.

The E-step on a transient order runs in two phases that never hold their buffers at the same time:

* A, pass 1 and the argsort (``kernels.estep.transient_order``): per-row outputs, block bits, the sort;
* B, the sparse pass 2 and the reduction: logZ and ||x||^2 in the order, the order, the work lists, and the
  per-slab partial sums (O(K D), at most ``kernels.estep.PARTIAL_BYTES`` per statistic).

For each covariance type and each chunk size n it measures the peak allocation beyond the inputs of phase A alone
and of the whole E-step (the larger of A and B), with the parameters prepared beforehand (O(K D), part of the
plan's fixed estimate). Fitting ``peak = a n`` (A) and ``peak = partials + b n`` (B, at the small n where it
dominates) gives the bytes per row. Writes ``estep_memory.json``.

    python -m bench_ann.estep_memory --k 1024 --d 128 --rows 131072,262144,2097152,4194304 --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, peak_extra


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--rows", default="131072,262144,2097152,4194304", help="comma list of chunk sizes")
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    sizes = [int(float(v)) for v in a.rows.split(",")]
    x_all, bound, means, var_sph, var_diag, lw, perm = ab_problem(max(sizes), a.k, a.d, kernels)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "k": a.k, "d": a.d,
           "precision": a.precision, "partial_bytes": ke.PARTIAL_BYTES, "runs": []}
    for cov, var in (("spherical", var_sph), ("diag", var_diag)):
        diag = cov == "diag"
        params = ke.prepare(means, var, lw, a.precision, bound, comp_perm=perm)
        for n in sizes:
            x = x_all[:n]
            x2 = None if diag else torch.empty(n, dtype=torch.float32, device="cuda")   # as estep: spherical only

            def phase_a():
                ke.transient_order(x, params, a.k, diag, a.precision, x2=x2)

            def whole():
                ke.estep(x, means, var, lw, a.precision, params=params, sort_rows=True)

            whole()                                 # compile and autotune outside the measurement
            torch.cuda.empty_cache()
            mib_a = peak_extra(phase_a) + (0 if diag else 4 * n / 2**20)    # estep allocates x2 (spherical)
            torch.cuda.empty_cache()
            mib_e = peak_extra(whole)
            slabs = ke.slab_layout(n, a.k, x.device, a.d)[0]
            partial_mib = slabs * a.k * (a.d * (2 if diag else 1) + (1 if diag else 2)) * 4 / 2**20
            row = {"cov": cov, "n": n, "phase_a_mib": mib_a, "estep_mib": mib_e, "slabs": slabs,
                   "partials_mib": partial_mib, "phase_a_bytes_per_row": mib_a * 2**20 / n,
                   "beyond_partials_bytes_per_row": (mib_e - partial_mib) * 2**20 / n}
            out["runs"].append(row)
            print(row, flush=True)
    path = Path(a.out) / "estep_memory.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
