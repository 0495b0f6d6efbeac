"""Speed of the Triton backend's wholly-torch E-step (most components collapsed) against the piece size
``TritonBackend.torch_bytes``, and against the torch backend's own chunks, on one GPU.

Fits the torch backend (diag, K=1024, 10 EM iterations) on siftsmall resampled to 2^20 rows
(``collapsed_components.resampled``: most diag components collapse), then times one E-step over all rows at
those parameters: ``TritonBackend._torch_estep`` for each ``--torch-mib``, and ``_torch_backend.estep`` on the
torch backend's chunks (``_chunk_plan.default_chunk_rows``). Median of ``--reps`` runs. Writes
``torch_path_speed.json``.

    python -m bench_ann.torch_path_speed --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch


def _time(fn, reps):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch-mib", default="128,512,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    from bench_ann.collapsed_components import resampled
    from flashgmm_faiss import GaussianMixture, _collapsed
    from flashgmm_faiss import _torch_backend as tb
    from flashgmm_faiss._chunk_plan import default_chunk_rows
    from flashgmm_faiss._triton_backend import TritonBackend
    from flashgmm_faiss.cli import load_siftsmall
    x = torch.as_tensor(resampled(load_siftsmall()[0], 1 << 20), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = GaussianMixture(1024, covariance_type="diag", backend="torch", kmeans_iter=5, max_iter=10, tol=0.0,
                              seed=0, device="cuda").fit(x)
    center = torch.as_tensor(fit.center_, device="cuda", dtype=torch.float32)
    means = torch.as_tensor(fit.means_ - fit.center_, device="cuda", dtype=torch.float32)
    var = torch.as_tensor(fit.covariances_, device="cuda", dtype=torch.float32)
    lw = torch.log(torch.as_tensor(fit.weights_, device="cuda", dtype=torch.float32))
    cols = _collapsed.collapsed_components(means, var)
    rows = []
    chunk = default_chunk_rows("torch", torch.device("cuda"), 1024, 128)

    def torch_backend():
        for s in range(0, len(x), chunk):
            tb.estep(x[s:s + chunk], means, var, lw, center)

    rows.append({"path": f"torch backend, chunks of {chunk} rows", "ms": _time(torch_backend, a.reps)})
    for mib in (int(v) for v in a.torch_mib.split(",")):
        be = TritonBackend("tf32")
        be.torch_bytes = mib << 20
        piece = be.torch_piece_rows(1024, 128)
        rows.append({"path": f"TritonBackend._torch_estep, torch_bytes {mib} MiB ({piece} rows)",
                     "ms": _time(lambda be=be: be._torch_estep(x, means, var, lw, center), a.reps)})
    print(f"{len(cols)} of 1024 components collapsed at the torch fit's parameters")
    for r in rows:
        print(f"{r['ms']:9.1f} ms  {r['path']}")
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "collapsed": len(cols),
           "command": " ".join(["python -m bench_ann.torch_path_speed", *(sys.argv[1:] if argv is None else argv)]),
           "rows": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "torch_path_speed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
