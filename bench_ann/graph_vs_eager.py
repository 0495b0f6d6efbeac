"""Why a CUDA graph of the chunked E-step can run slower than the same launches issued eagerly.

``bench_kernels`` measured the diag "tf32" EM iteration on a transient order at N=1e7 (3 chunks of 2^22 rows) at
34.1 ms as a CUDA graph against 29.4 ms eagerly (H100, v31 and again in the twenty-fifth session), while spherical
and every N=1e6 shape ran as fast or faster as a graph. This script runs that iteration's E-steps (``prepare``,
then ``kernels.estep(sort_rows=True)`` per chunk) on the kernel benchmark's problem, times it eagerly and as a
graph, then profiles ``--iters`` iterations of each with ``torch.profiler`` and prints the GPU time per kernel name
per iteration side by side, and the timeline (busy and idle time). Writes ``graph_vs_eager.json`` to ``--out``.

    python -m bench_ann.graph_vs_eager --n 1e7 --k 1024 --d 128 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_ann.bench_kernels import add_shape_args, bench, graphed, make_data, make_params
from bench_ann.profile_fit import kernel_times


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--cov", default="diag", choices=["spherical", "diag"])
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--chunk", type=int, default=1 << 22)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from flashgmm_faiss import kernels
    x = make_data(a.n, a.d)
    bound = max(-float(x.min()), float(x.max()))
    means, var_s, var_d, lw = make_params(x, a.k, kernels)
    var = var_d if a.cov == "diag" else var_s
    perm = kernels.component_order(means)

    def iteration():
        params = kernels.prepare(means, var, lw, a.precision, bound, comp_perm=perm)
        nk = torch.zeros(a.k, dtype=torch.float64, device="cuda")
        for i in range(0, a.n, a.chunk):
            st = kernels.estep(x[i:i + a.chunk], means, var, lw, precision=a.precision, params=params,
                               sort_rows=True)
            nk += st[1]
        return nk

    replay = graphed(iteration)
    res = {"device": torch.cuda.get_device_name(), "n": a.n, "k": a.k, "d": a.d, "cov": a.cov,
           "precision": a.precision, "chunk": a.chunk}
    res["ms"] = {"eager": [], "graph": []}
    for _ in range(3):
        res["ms"]["eager"].append(bench(iteration, a.rep))
        res["ms"]["graph"].append(bench(replay, a.rep))
    print(json.dumps(res["ms"]), flush=True)
    eager, t_e = kernel_times(iteration, a.iters)
    graph, t_g = kernel_times(replay, a.iters)
    res["timeline"] = {"eager": t_e, "graph": t_g}
    res["kernel_us_per_iteration"] = {"eager": eager, "graph": graph}
    print(f"timeline eager {t_e}\ntimeline graph {t_g}")
    print(f"{'kernel':<60} {'eager us':>10} {'graph us':>10}")
    for name in sorted(set(eager) | set(graph), key=lambda n: -max(eager.get(n, 0), graph.get(n, 0))):
        print(f"{name[:60]:<60} {eager.get(name, 0):10.1f} {graph.get(name, 0):10.1f}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "graph_vs_eager.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
