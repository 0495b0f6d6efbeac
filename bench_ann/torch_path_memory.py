"""Device memory of the Triton backend's torch paths per row of a piece, on one GPU: the measurements behind
``_triton_backend.TORCH_ENTRY_BYTES`` / ``TORCH_FEATURE_BYTES`` (the torch backend's E-step, score and assign on a
piece of rows, ``TritonBackend.torch_piece_rows``) and ``_collapsed.LSE_FEATURE_BYTES`` / ``LSE_COMPONENT_BYTES``
(``collapsed_lse``, ``_collapsed.lse_piece_rows``).

For each shape (K, D), covariance type and piece size it measures the peak allocation beyond the inputs (rows
already on the device, outputs included) with ``collapsed`` of the K components collapsed (variance 1e-6 on a data
row, so that the torch backend recomputes them in float64 as the repairs do), and prints it per row against the
estimate the pieces are sized by (``ratio`` must stay below 1). Also the whole repaired E-step of a chunk under a
small ``torch_bytes``: its peak beyond the kernels' own E-step of the same chunk. Writes ``torch_path_memory.json``.

    python -m bench_ann.torch_path_memory --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench_ann.bench_kernels import peak_extra


def _problem(n, k, d, diag, collapsed, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g) * 20 + 60
    means = x[torch.randperm(n, device="cuda", generator=g)[:k]].clone() + torch.randn(k, d, device="cuda",
                                                                                       generator=g)
    center = x.mean(0)
    means -= center
    var = torch.rand((k, d) if diag else (k,), device="cuda", generator=g) * 50 + 200
    var[:collapsed] = 1e-6
    means[:collapsed] = x[:collapsed] - center     # collapsed onto data rows
    lw = torch.log_softmax(torch.randn(k, device="cuda", generator=g), 0)
    return x, center, means, var, lw


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1024x128,64x50,4096x96", help="comma list of KxD")
    ap.add_argument("--rows", default="4096,32768", help="comma list of piece sizes")
    ap.add_argument("--collapsed", type=int, default=16)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from flashgmm_faiss import _collapsed
    from flashgmm_faiss import _torch_backend as tb
    from flashgmm_faiss import _triton_backend as tbe
    runs = []
    print(f"{'K':>5} {'D':>4} {'cov':>9} {'path':>14} {'rows':>6} {'MiB':>8} {'B/row':>8} {'est B/row':>9} "
          f"{'ratio':>6}")
    for shape in a.shapes.split(","):
        k, d = (int(v) for v in shape.split("x"))
        for diag in (False, True):
            cov = "diag" if diag else "spherical"
            for n in (int(v) for v in a.rows.split(",")):
                x, center, means, var, lw = _problem(n, k, d, diag, a.collapsed)
                cols = torch.arange(a.collapsed, device="cuda")
                est_torch = tbe.TORCH_ENTRY_BYTES * k + tbe.TORCH_FEATURE_BYTES * d
                est_lse = _collapsed.LSE_FEATURE_BYTES * d + _collapsed.LSE_COMPONENT_BYTES * a.collapsed
                paths = {
                    "estep": (lambda: tb.estep(x, means, var, lw, center), est_torch),
                    "score": (lambda: tb.score(x, means, var, lw, center), est_torch),
                    "assign": (lambda: tb.assign(x, means, var, lw, 1.0 / k, k, center), est_torch),
                    "gather+estep": (lambda: tb.estep(x[torch.arange(n, device="cuda")], means, var, lw, center),
                                     est_torch),
                    "collapsed_lse": (lambda: _collapsed.collapsed_lse(x, center, means, var, lw, cols, 1 << 40),
                                      est_lse),
                }
                for name, (fn, est) in paths.items():
                    fn()
                    torch.cuda.empty_cache()
                    mib = peak_extra(fn)
                    per_row = mib * 2**20 / n
                    runs.append({"k": k, "d": d, "cov": cov, "path": name, "rows": n, "peak_mib": mib,
                                 "bytes_per_row": per_row, "estimate": est, "ratio": per_row / est})
                    print(f"{k:>5} {d:>4} {cov:>9} {name:>14} {n:>6} {mib:>8.1f} {per_row:>8.0f} {est:>9} "
                          f"{per_row / est:>6.2f}")
                del x, means, var, lw
    # the whole repaired E-step of a chunk under a small torch_bytes: peak beyond the kernels' E-step alone
    repaired = []
    for diag in (False, True):
        x, center, means, var, lw = _problem(1 << 20, 1024, 128, diag, a.collapsed, seed=1)
        b = tbe.TritonBackend("tf32")
        sp = _collapsed.split(var, lw, tuple(range(a.collapsed)))
        for torch_mib in (16, 64):
            b.torch_bytes = torch_mib << 20
            b.estep(x, means, var, lw, center)
            torch.cuda.empty_cache()
            kernels_only = peak_extra(lambda: b._kernel_estep(x, means, sp.var, sp.log_weights, center))
            torch.cuda.empty_cache()
            whole = peak_extra(lambda: b.estep(x, means, var, lw, center))
            row = {"cov": "diag" if diag else "spherical", "rows": len(x), "torch_mib": torch_mib,
                   "kernels_mib": kernels_only, "repaired_mib": whole}
            repaired.append(row)
            print(f"repaired E-step, {row['cov']}, 2^20 rows, torch_bytes {torch_mib} MiB: kernels alone "
                  f"{kernels_only:.1f} MiB, repaired {whole:.1f} MiB (bound: max(kernels, outputs + torch_bytes))")
        del x
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "collapsed": a.collapsed,
           "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python -m bench_ann.torch_path_memory", *(sys.argv[1:] if argv is None else argv)]),
           "runs": runs, "repaired": repaired}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "torch_path_memory.json").write_text(json.dumps(out, indent=1))
    worst = max(r["ratio"] for r in runs)
    print(f"worst ratio of measured to estimated bytes per row: {worst:.2f}")


if __name__ == "__main__":
    main()
