"""Per-iteration trace of a Triton ``GaussianMixture`` fit with collapsed components: what each EM iteration ran.

At K above the data's natural clusters (the fit benchmark's K=4096 on 2000 SIFT-like clusters) some components
collapse onto single rows and go to the exact path (``flashgmm_faiss._collapsed``); such iterations run eagerly
and may be redone. This script counts, per EM iteration of the fit's history: its seconds, the iterations launched
(``launch``, lookahead included) and discarded, the collapsed components the backend ran with, and the chunks of
each E-step kind (``TritonBackend.order_stats``), so that the cost of the exact path can be told apart.

    python -m bench_ann.collapsed_fit_trace --n 1000000 --k 4096 --d 128 --cov diag --precision bf16 --out DIR \
        [--variants default,no-collapsed,eager,no-collapsed-eager]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from bench_ann.bench_fit import add_problem_args, problem_rows
from flashgmm_faiss import GaussianMixture, _collapsed
from flashgmm_faiss._triton_backend import TritonBackend


def traced_fit(x, k, cov, precision, em_iter, kmeans_iter=10, **kw):
    """Fit with the estimator's launch / discard / collapsed-set events recorded; returns (fit, events)."""
    events = []
    orig = GaussianMixture._launchers

    def launchers(self, step, summary_index, ordered, key=None):
        launch, discard = orig(self, step, summary_index, ordered, key)

        def traced_launch(inputs, ahead=False):
            t0 = time.perf_counter()
            out = launch(inputs, ahead)
            impl = self._impl
            events.append({"event": "launch", "ahead": ahead, "issued": out is not None,
                           "host_ms": 1e3 * (time.perf_counter() - t0),
                           "exact": len(getattr(impl, "exact_components", None) or ()),
                           "graph_key": impl.graph_key() if hasattr(impl, "graph_key") else None,
                           "order_stats": dict(getattr(impl, "order_stats", {}))})
            return out

        def traced_discard(launched):
            if launched is not None:
                events.append({"event": "discard"})
            return discard(launched)
        return traced_launch, traced_discard

    GaussianMixture._launchers = launchers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(k, covariance_type=cov, tol=0.0, backend="triton", device="cuda", seed=0,
                                precision=precision, kmeans_iter=kmeans_iter, max_iter=em_iter, **kw).fit(x)
    finally:
        GaussianMixture._launchers = orig
    return g, events


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    ap.set_defaults(k=4096)
    ap.add_argument("--cov", default="diag")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--em-iter", type=int, default=20)
    ap.add_argument("--variants", default="default",
                    help="comma-separated: default; no-collapsed (TritonBackend.collapsed finds none: the kernels "
                         "compute every component, as before v46); eager (cuda_graphs=False); no-collapsed-eager; "
                         "v47-repair (the repairs without v48's screen and direct E-step)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    x, _ = problem_rows(a)
    for variant in a.variants.split(","):
        run_variant(a, x, variant)


def run_variant(a, x, variant):
    collapsed = TritonBackend.__dict__["collapsed"]       # the staticmethod itself
    if variant.startswith("no-collapsed"):
        TritonBackend.collapsed = staticmethod(lambda means, var: torch.zeros(means.shape[0], dtype=torch.bool,
                                                                                device=means.device))
    kw = {"cuda_graphs": False} if variant.endswith("eager") else {}
    screen, direct_bytes = _collapsed.screen, _collapsed.DIRECT_ENTRY_BYTES
    if variant == "v47-repair":
        _collapsed.screen = lambda c, d: None           # redo_batches: the exact lse of every row
        _collapsed.DIRECT_ENTRY_BYTES = 1 << 60         # repair_estep: the torch backend's E-step
    try:
        traced_fit(x[: 1 << 18], a.k, a.cov, a.precision, 3, kmeans_iter=1, **kw)      # compile and autotune
        g, events = traced_fit(x, a.k, a.cov, a.precision, a.em_iter, **kw)
    finally:
        TritonBackend.collapsed = collapsed
        _collapsed.screen, _collapsed.DIRECT_ENTRY_BYTES = screen, direct_bytes
    secs = [round(1e3 * h["seconds"], 2) for h in g.history_]
    # lookahead: an iteration's time may land in its predecessor's entry, so a mean over a span, not a median;
    # iterations 1-3 hold compilation and the redone iteration in which components first collapse
    tail = secs[3:] or secs
    print(f"{a.cov} {a.precision} N={a.n} K={a.k} {variant}: ms per EM iteration {secs}; mean of iterations 4.. "
          f"{sum(tail) / len(tail):.2f}; graph replays {g.graph_replays_}")
    prev = None
    for e in events:
        if e["event"] == "discard":
            print("  discard")
            continue
        st = e["order_stats"]
        delta = {key: st[key] - (prev or {}).get(key, 0) for key in st if st[key] - (prev or {}).get(key, 0)}
        prev = st
        print(f"  launch ahead={e['ahead']!s:<5} issued={e['issued']!s:<5} exact={e['exact']:>3} "
              f"graph_key={e['graph_key']!s:<8} host {e['host_ms']:7.2f} ms  {delta}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"collapsed_fit_trace_{a.cov}_{a.precision}_k{a.k}_{variant}.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
             "args": vars(a) | {"out": str(a.out)}, "variant": variant,
             "ms_per_iteration": secs, "events": events}, indent=1))


if __name__ == "__main__":
    main()
