"""Inference benchmark: multi-assignment (``assign``), ``predict`` and ``score_samples`` on the fused kernels
against the torch path, in one process on one GPU.

For a ``GaussianMixture`` fitted on the GPU (Triton backend, ``--kmeans-iter`` k-means + ``--em-iter`` EM
iterations, per covariance type) it times

* kernel rows (device tensors in and out, the rows centred inside the kernels as the estimator does):

  - ``score``: ``kernels.score`` (logZ + argmax, the work of ``predict`` / ``score_samples``) against
    ``_torch_backend.score`` on 2^17-row pieces with tf32 GEMMs, eager and under ``torch.compile``;
  - ``assign top-M``: the one-sweep top-M kernel (``kernels.topk_responsibilities`` + CSR) at each cap of
    ``--caps`` up to 16;
  - ``assign threshold``: the threshold kernel (``kernels.threshold_assign``: logZ, count, write, sort) at the same
    caps and uncapped (the paper's rule, tau = 1/K);
  - ``torch assign``: ``_torch_backend.assign`` on pieces of at most 2^25 (rows x K) entries (what
    ``TritonBackend.assign`` ran for caps above 16 and no cap before the threshold kernel), tf32 GEMMs;

* estimator rows: ``GaussianMixture.assign(X)`` (the default cap, ``--caps``' smallest, and no cap),
  ``predict(X)`` and ``score_samples(X)``, X on the GPU, results copied to host numpy arrays as the API returns
  them.

Columns: median ms (``triton.testing.do_bench``), entries per row (the index's inflation) and the largest row,
peak device memory beyond X and the parameters, and agreement with float64 on the first ``--check-rows`` rows:
the fraction of rows whose component lists equal the float64 reference's (same components, same order) and the
largest relative error of the responsibilities on those rows.

Usage: ``python -m bench_ann.bench_assign`` (synthetic SIFT-like, N=1e6, K=1024, D=128), or with
``--data ../shared/data/glove-6b-50d/glove_6B_50d.f32.npy --normalize`` for GloVe-6B-50d. Results:
``bench_ann/results/assign_<device><tag>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from flashgmm_faiss import GaussianMixture
from flashgmm_faiss import _torch_backend as tb
from flashgmm_faiss._triton_backend import TritonBackend

from .bench_fit import add_problem_args, problem_rows
from .bench_kernels import bench, peak_extra

TORCH_CHUNK = 1 << 17
# the top-M kernel unrolls M merge rounds per block: at M = 64 its compilation and autotuning take minutes, and
# the threshold kernel serves such caps anyway (kernels.assign.TOPK_MAX_ASSIGN)
TOPK_CAPS_TIMED = 16


def padded_lists(counts, lists, resp, rows):
    """The first ``rows`` rows of a CSR triple ``(counts (n,), lists (nnz,), resp (nnz,))`` as (rows, width)
    components (-1 past a row's end) and float64 responsibilities (0 there), on the host."""
    counts = counts[:rows].cpu().long()
    nnz = int(counts.sum())
    width = max(1, int(counts.max()))
    row = torch.repeat_interleave(torch.arange(rows), counts)
    pos = torch.arange(nnz) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    li = torch.full((rows, width), -1, dtype=torch.int64)
    ri = torch.zeros((rows, width), dtype=torch.float64)
    li[row, pos] = lists[:nnz].cpu().long()
    ri[row, pos] = resp[:nnz].cpu().double()
    return li, ri


def same_lists(p, q, rows):
    """Per row of the first ``rows`` of two CSR triples: whether they list the same components in the same order
    ((rows,) bool); and both padded responsibilities ((rows, width) float64, width the larger of the two)."""
    (pl, pr), (ql, qr) = padded_lists(*p, rows), padded_lists(*q, rows)
    w = max(pl.shape[1], ql.shape[1])
    pl, ql = (torch.nn.functional.pad(t, (0, w - t.shape[1]), value=-1) for t in (pl, ql))
    pr, qr = (torch.nn.functional.pad(t, (0, w - t.shape[1]), value=0.0) for t in (pr, qr))
    return (pl == ql).all(1), pr, qr


def agreement(got, ref, rows):
    """(fraction of rows with the same component lists, max relative responsibility error on those rows)."""
    same, gr, rr = same_lists(got, ref, rows)
    err = ((gr - rr).abs() / rr.clamp_min(1e-30))[same[:, None] & (rr > 0)]
    return float(same.double().mean()), float(err.max()) if err.numel() else 0.0


def torch_score(x, means, var, lw, center, score=tb.score):
    """``score`` (``_torch_backend.score`` or a compiled copy) on TORCH_CHUNK-row pieces of x: (log_norm (n,),
    best (n,))."""
    out = [score(x[s:s + TORCH_CHUNK], means, var, lw, center) for s in range(0, x.shape[0], TORCH_CHUNK)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def run(args):
    torch.backends.cuda.matmul.allow_tf32 = True
    kassign = importlib.import_module("flashgmm_faiss.kernels.assign")
    dev = torch.cuda.get_device_name()
    X, data = problem_rows(args)
    n, d, K = X.shape[0], X.shape[1], args.k
    caps = [int(c) for c in args.caps.split(",")]
    tau = 1.0 / K
    rows, meta = [], []
    for cov in args.covs.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(K, covariance_type=cov, kmeans_iter=args.kmeans_iter, max_iter=args.em_iter,
                                tol=0.0, backend="triton", device="cuda", precision=args.precision, seed=0).fit(X)
        g._inference_setup(X[:1])
        center, means, var, lw = g._dev_params
        x = X
        kw = dict(precision=args.precision, center=center)
        xs = X[:args.check_rows]
        ref64_by_cap = {}

        def ref_for(cap):
            if cap not in ref64_by_cap:
                ref64_by_cap[cap] = tb.assign(xs.double(), means.double(), var.double(), lw.double(), tau,
                                              K if cap is None else cap, center.double())
            return ref64_by_cap[cap]

        def record(method, fn, cap=None, csr=True):
            ms = bench(fn, args.rep)
            mib = peak_extra(fn)
            out = fn()
            row = {"covariance_type": cov, "method": method, "cap": cap, "ms": ms, "peak_extra_mib": mib}
            if csr:
                counts = out[0]
                row.update(entries_per_row=float(counts.double().mean()), max_entries=int(counts.max()))
                same, err = agreement(out, ref_for(cap), args.check_rows)
                row.update(rows_equal_float64=same, resp_rel_err=err)
            rows.append(row)
            print(json.dumps(row), flush=True)
            return out

        # score: predict / score_samples' work
        record("score (logZ + argmax), ours", lambda: kassign.score(x, means, var, lw, **kw), csr=False)
        score_row = rows[-1]
        record("score, torch chunked", lambda: torch_score(x, means, var, lw, center), csr=False)
        compiled = torch.compile(tb.score)
        record("score, torch.compile chunked", lambda: torch_score(x, means, var, lw, center, compiled), csr=False)
        torch._dynamo.reset()
        ln, best = kassign.score(xs, means, var, lw, **kw)
        lp64 = tb.log_prob(xs.double() - center.double(), means.double(), var.double(), lw.double())
        ln64 = torch.logsumexp(lp64, 1)
        score_row.update(log_norm_rel_err=float(((ln.double() - ln64).abs() / ln64.abs()).max()),
                         argmax_equal_float64=float((best == lp64.argmax(1)).double().mean()))

        # assign: top-M kernel, threshold kernel, torch path
        for cap in caps:
            if cap <= TOPK_CAPS_TIMED:
                def topm(cap=cap):
                    top_r, top_i = kassign.topk_responsibilities(x, means, var, lw, cap, **kw)
                    keep = top_r > tau
                    keep[:, 0] = True
                    return keep.sum(1), top_i[keep], top_r[keep]
                record("assign top-M kernel", topm, cap)
        for cap in caps + [None]:
            record("assign threshold kernel", lambda cap=cap: kassign.threshold_assign(x, means, var, lw, tau, cap,
                                                                                      **kw), cap)
        for cap in (min(caps), None):
            record("assign torch path (pieces)",
                   lambda cap=cap: TritonBackend()._torch_pieces(tb.assign, x, K, means, var, lw, tau,
                                                                 K if cap is None else cap, center), cap)

        # the estimator's methods, host copies included
        default_cap = min(caps)
        for cap in (default_cap, None):
            record("GaussianMixture.assign (host CSR)", lambda cap=cap: tuple(
                torch.from_numpy(a) for a in _csr_counts(*g.assign(X, max_assign=cap))), cap)
        record("GaussianMixture.predict (host)", lambda: g.predict(X), csr=False)
        record("GaussianMixture.score_samples (host)", lambda: g.score_samples(X), csr=False)
        meta.append({"covariance_type": cov, "final_log_likelihood": g.lower_bound_})
        del g
        torch.cuda.empty_cache()

    stamp = datetime.date.today().isoformat()
    cmd = "python -m bench_ann.bench_assign " + " ".join(sys.argv[1:])
    result = {"device": dev, "date": stamp, "command": cmd, "torch": torch.__version__, "data": data, "n": n,
              "d": d, "K": K, "tau": tau, "precision": args.precision, "kmeans_iter": args.kmeans_iter,
              "em_iter": args.em_iter, "check_rows": args.check_rows, "fits": meta, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"assign_{dev.lower().replace(' ', '_')}{args.tag}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def _csr_counts(offsets, lists, resp):
    """The estimator's (offsets, lists, resp) as (counts, lists, resp), the kernels' CSR form."""
    return np.diff(offsets), lists, resp


def markdown(result):
    lines = [f"# assign / predict / score_samples on {result['device']}", "",
             f"{result['date']}, torch {result['torch']}. Data: {result['data']}, N={result['n']}, "
             f"K={result['K']}, D={result['d']}; tau = 1/K; precision {result['precision']!r}; parameters from a "
             f"Triton-backend fit ({result['kmeans_iter']} k-means + {result['em_iter']} EM iterations). Command: "
             f"`{result['command']}`. Agreement: on the first {result['check_rows']} rows against float64.", "",
             "| cov | method | cap | ms | entries/row | max | peak extra MiB | rows = float64 | resp rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cap = "–" if r["cap"] is None else r["cap"]
        if "entries_per_row" in r:
            extra = (f"{r['entries_per_row']:.3f} | {r['max_entries']} | {r['peak_extra_mib']:.0f} | "
                     f"{r['rows_equal_float64']:.4f} | {r['resp_rel_err']:.1e}")
        elif "log_norm_rel_err" in r:
            extra = (f"– | – | {r['peak_extra_mib']:.0f} | argmax {r['argmax_equal_float64']:.4f} | "
                     f"logZ {r['log_norm_rel_err']:.1e}")
        else:
            extra = f"– | – | {r['peak_extra_mib']:.0f} | – | –"
        lines.append(f"| {r['covariance_type']} | {r['method']} | {cap} | {r['ms']:.2f} | {extra} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(ap)
    ap.add_argument("--covs", default="spherical,diag")
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--caps", default="2,4,8,16,64", help="copy caps (max_assign) to time")
    ap.add_argument("--kmeans-iter", type=int, default=5)
    ap.add_argument("--em-iter", type=int, default=10)
    ap.add_argument("--check-rows", type=int, default=8192)
    ap.add_argument("--rep", type=int, default=200, help="do_bench ms per measurement")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
