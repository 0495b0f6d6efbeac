"""Is a diagonal-covariance GMM a good IVF partition? Recall@10 against scan DCO on one data set.

``build_gmm_ivf`` stores each vector in its most responsible components and a FAISS ``IndexIVFFlat`` routes queries
to the nearest means in L2. With spherical covariances the two mostly agree; with diagonal ones the most responsible
component is often not the nearest mean, and broad components collect many rows. This script measures, for one
data set and one K (CPU, torch backend, one fit per covariance type, ``seed``):

* ``kmeans``: FAISS's k-means IVF (``IndexIVFFlat.train``, 25 iterations), the baseline;
* ``<cov>``: ``GaussianMixture(K, covariance_type=cov)`` means as centroids, each vector in its most responsible
  list only (``max_assign=1``), queries routed in L2 (what ``build_gmm_ivf(..., max_assign=1)`` builds);
* ``<cov>+nearest``: the same, plus a copy in the L2-nearest list when that list is not the most responsible one
  (so that a query equal to a stored vector finds it at nprobe=1, as with k-means);
* ``<cov> posterior-routed``: the ``<cov>`` index probed in order of the query's posterior instead of L2.

Columns: inflation (postings / vectors), the fraction of vectors not stored in their L2-nearest list, list-size
spread (coefficient of variation, largest list, empty lists), recall@10 at nprobe=1 and the scan DCO per query
needed for recall@10 = 0.9 / 0.95 / 0.99 (copies counted, :func:`flashgmm_faiss.evaluation.dco_at_recall`).

    python -m bench_ann.diag_partition --dataset siftsmall --K 64 --out bench_ann/results/v45_diag_partition
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from pathlib import Path

import faiss
import numpy as np

from bench_ann.sweep import load_data, make_index, nprobe_grid
from flashgmm_faiss import GaussianMixture
from flashgmm_faiss.evaluation import dco_at_recall, dedup_topk, recall_at_k
from flashgmm_faiss.ivf import csr_from_labels, list_sizes, max_copies

TARGETS = (0.9, 0.95, 0.99)


def csr(per_row):
    """Per-row list arrays -> (offsets (n+1,), lists (nnz,)) int64."""
    counts = np.array([len(p) for p in per_row], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)]), np.concatenate(per_row).astype(np.int64)


def measure(index, xq, gt, K, route=None):
    """Sweep rows (recall_at_10, dco_scan_per_query) over nprobe; ``route`` (nq, K) gives the probe order (default
    the quantizer's L2 order); results deduplicated as in :func:`flashgmm_faiss.evaluation.search_with_dco`."""
    sizes = list_sizes(index)
    copies = max_copies(index)
    if route is None:
        _, route = index.quantizer.search(xq, K)
    rows = []
    for p in nprobe_grid(K, "half"):
        probe = np.ascontiguousarray(route[:, :p], dtype=np.int64)
        index.nprobe = p
        D, I = index.search_preassigned(xq, 10 * min(copies, p), probe, np.zeros(probe.shape, dtype=np.float32))
        _, I = dedup_topk(D, I, 10)
        rows.append({"nprobe": p, "recall_at_10": recall_at_k(I, gt, 10),
                     "dco_scan_per_query": float(sizes[probe].sum(1).mean())})
    return rows


def summary(name, index, n, not_nearest, rows):
    sizes = list_sizes(index)
    out = {"method": name, "inflation": float(sizes.sum() / n), "not_in_nearest_list": float(not_nearest),
           "list_size_cv": float(sizes.std() / sizes.mean()), "largest_list": int(sizes.max()),
           "empty_lists": int((sizes == 0).sum()), "recall_at_10_nprobe1": rows[0]["recall_at_10"],
           "rows": rows}
    for t in TARGETS:
        out[f"dco_at_{t}"] = dco_at_recall(rows, t)
    return out


def run(data, K, seed):
    xb, xq, gt = data["xb"], data["xq"], data["gt"]
    n, d = xb.shape
    results = []
    km = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, K)
    km.cp.seed = seed
    km.train(xb)
    km.add(xb)
    results.append(summary("kmeans", km, n, 0.0, measure(km, xq, gt, K)))
    for cov in ("spherical", "diag"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(K, covariance_type=cov, backend="torch", device="cpu", seed=seed).fit(xb)
        quant = faiss.IndexFlatL2(d)
        quant.add(np.ascontiguousarray(g.means_, dtype=np.float32))
        _, nearest = quant.search(xb, 1)
        best = g.predict(xb).astype(np.int64)
        not_nearest = float(np.mean(best != nearest[:, 0]))
        single = make_index(g.means_, xb, *csr_from_labels(best))
        results.append(summary(cov, single, n, not_nearest, measure(single, xq, gt, K)))
        both = make_index(g.means_, xb, *csr([np.unique([best[i], nearest[i, 0]]) for i in range(n)]))
        results.append(summary(f"{cov}+nearest", both, n, 0.0, measure(both, xq, gt, K)))
        posterior = np.argsort(-g.predict_proba(xq), axis=1, kind="stable")
        results.append(summary(f"{cov} posterior-routed", single, n, not_nearest,
                               measure(single, xq, gt, K, route=posterior)))
    return results


def table(results):
    head = ("| method | inflation | not in L2-nearest list | list-size CV | largest | empty | R@10 nprobe=1 | "
            "scan DCO @ 0.9 / 0.95 / 0.99 |\n|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in results:
        dco = " / ".join("–" if r[f"dco_at_{t}"] is None else f"{r[f'dco_at_{t}']:.0f}" for t in TARGETS)
        lines.append(f"| {r['method']} | {r['inflation']:.3f} | {r['not_in_nearest_list']:.3f} | "
                     f"{r['list_size_cv']:.2f} | {r['largest_list']} | {r['empty_lists']} | "
                     f"{r['recall_at_10_nprobe1']:.3f} | {dco} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="siftsmall", help="siftsmall, bigann10k, mnist, glove-6b-50d or NAME.hdf5")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_ann/results")
    a = ap.parse_args(argv)
    data = load_data(a.dataset)
    results = run(data, a.K, a.seed)
    text = table(results)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"diag_partition_{a.dataset}_K{a.K}"
    meta = {"dataset": a.dataset, "K": a.K, "seed": a.seed, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, CPU", "command":
            f"python -m bench_ann.diag_partition --dataset {a.dataset} --K {a.K} --seed {a.seed} --out {a.out}"}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1))
    stem.with_suffix(".md").write_text(f"# {a.dataset}, K={a.K}: diag vs spherical GMM partitions\n\n"
                                       f"{meta['date']}, {meta['machine']}; `{meta['command']}`\n\n{text}\n")


if __name__ == "__main__":
    main()
