"""Where the time of ``GaussianMixture.fit`` and ``assign`` goes on one GPU: torch.profiler tables.

``bench_fit.py`` reports per-iteration times of the estimator; this script explains them. After a warm-up fit
(compilation and autotuning), it profiles, one phase at a time on the same data: ``--kmeans-iter`` k-means
iterations (``max_iter=0`` fit), ``--em-iter`` EM iterations (``kmeans_iter=0`` fit), and ``assign`` with the
given copy caps. For each phase it prints and writes the wall time, the GPU kernel time, and the top operators
by GPU time and by host time (``profile_<phase>.txt`` in ``--out``), so that host overhead (launches, syncs,
Python) can be told apart from kernel time, and the kernels of the phase's last iteration (one E-step statistics
kernel to the next: with one chunk, an EM iteration with its M-step).

    python -m bench_ann.profile_fit --n 1000000 --k 1024 --d 128 --out /tmp/prof
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from flashgmm_faiss import GaussianMixture

from .bench_fit import add_problem_args, problem_rows


def _timeline(prof):
    """GPU kernel intervals of a profile: count, busy time (their union), span (first start to last end) and the
    longest idle gaps, in ms, so that host-bound stretches (the GPU waiting for launches or syncs) show up."""
    spans = [(e.time_range.start, e.time_range.end) for e in _device_events(prof)]
    if not spans:
        return {"kernels": 0}
    busy, gaps = 0.0, []
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    gaps.sort(reverse=True)
    return {"kernels": len(spans), "busy_ms": busy / 1e3, "span_ms": span / 1e3, "idle_ms": (span - busy) / 1e3,
            "idle_over_20us_ms": sum(g for g in gaps if g > 20) / 1e3,
            "longest_gaps_us": [round(g, 1) for g in gaps[:12]]}


def _per_name(events):
    """{kernel name: [summed GPU us, launches]} of profiler device events."""
    per = {}
    for e in events:
        us_cnt = per.setdefault(e.name, [0.0, 0])
        us_cnt[0] += e.time_range.end - e.time_range.start
        us_cnt[1] += 1
    return per


def _device_events(prof):
    """The profile's GPU events (kernels, copies, fills) in start order."""
    from torch.autograd import DeviceType

    return sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)


def kernel_times(fn, rep):
    """Mean GPU time per call (us) of each kernel name over ``rep`` calls of ``fn`` (after one warm-up call), longest
    first, and those calls' :func:`_timeline`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rep):
            fn()
        torch.cuda.synchronize()
    per = sorted(_per_name(_device_events(prof)).items(), key=lambda kv: -kv[1][0])
    return {name: us / rep for name, (us, _) in per}, _timeline(prof)


def _iteration_kernels(prof, anchor: str = "_estep_stats_kernel"):
    """GPU work of one steady-state iteration: the device events after the second-last ``anchor`` kernel up to and
    including the last (with one chunk per E-step: one EM iteration, its M-step's small kernels included), summed
    per name, longest first. Returns ``{"kernels", "busy_us", "span_us", "by_name": [[us, count, name], ...]}`` or
    None with fewer than two anchors."""
    ev = _device_events(prof)
    at = [i for i, e in enumerate(ev) if e.name.startswith(anchor)]
    if len(at) < 2:
        return None
    seg = ev[at[-2] + 1:at[-1] + 1]
    by_name = sorted(([round(us, 1), cnt, name[:90]] for name, (us, cnt) in _per_name(seg).items()), reverse=True)
    return {"kernels": len(seg), "busy_us": round(sum(r[0] for r in by_name), 1),
            "span_us": round(seg[-1].time_range.end - seg[0].time_range.start, 1), "by_name": by_name}


def _profile(name, fn, out: Path, rows: int, trace: bool = False):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_gpu = events.table(sort_by="self_cuda_time_total", row_limit=rows)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    timeline = _timeline(prof)
    iteration = _iteration_kernels(prof)
    head = f"## {name}: wall {wall * 1e3:.1f} ms, GPU kernel time {gpu_us / 1e3:.1f} ms (profiler on)"
    parts = [head, f"timeline {timeline}", "### by GPU time", by_gpu, "### by host time", by_cpu]
    if iteration is not None:
        parts += [f"### last iteration (after the second-last E-step statistics kernel, to the last): "
                  f"{iteration['kernels']} kernels, busy {iteration['busy_us']} us, span {iteration['span_us']} us",
                  "\n".join(f"{us:9.1f} us x{cnt:3d}  {nm}" for us, cnt, nm in iteration["by_name"])]
    text = "\n\n".join(parts)
    (out / f"profile_{name}.txt").write_text(text + "\n")
    if trace:
        prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    print(head, flush=True)
    print(f"timeline {timeline}", flush=True)
    print(by_gpu[:6000], flush=True)
    return {"phase": name, "wall_ms": wall * 1e3, "gpu_kernel_ms": gpu_us / 1e3, "timeline": timeline,
            "last_iteration": iteration}


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, data = problem_rows(args)
    common = dict(covariance_type=args.cov, tol=0.0, backend="triton", device="cuda", precision=args.precision,
                  seed=0, chunk_size=args.chunk, sparse_estep=not args.dense,
                  cuda_graphs=not args.no_graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        # warm-up (compile, autotune), past the first rebuild of the sparse E-step's row orders
        g = GaussianMixture(args.k, kmeans_iter=2, max_iter=7, **common).fit(X)
        for cap in args.caps:
            g.assign(X[:65536], max_assign=cap)
        torch.cuda.synchronize()
        print(f"# warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        phases = []
        km = GaussianMixture(args.k, kmeans_iter=args.kmeans_iter, max_iter=0, **common)
        phases.append(_profile(f"kmeans_{args.kmeans_iter}_iters", lambda: km.fit(X), out, args.rows, args.trace))
        phases[-1]["kmeans_history_s"] = [h["seconds"] for h in km.kmeans_history_]
        em = GaussianMixture(args.k, kmeans_iter=0, max_iter=args.em_iter, init=g.means_ + 0.0, **common)
        phases.append(_profile(f"em_{args.em_iter}_iters", lambda: em.fit(X), out, args.rows, args.trace))
        phases[-1]["em_history_s"] = [h["seconds"] for h in em.history_]
        for cap in args.caps:
            phases.append(_profile(f"assign_cap{cap}", lambda cap=cap: g.assign(X, max_assign=cap), out, args.rows))
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "data": data, "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "phases": phases}
    (out / "profile_fit.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(phases, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_args(p)
    p.add_argument("--cov", default="spherical", choices=["spherical", "diag"])
    p.add_argument("--precision", default="tf32")
    p.add_argument("--kmeans-iter", type=int, default=3)
    p.add_argument("--em-iter", type=int, default=3)
    p.add_argument("--caps", type=int, nargs="*", default=[2])
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--dense", action="store_true", help="sparse_estep=False (no row orders)")
    p.add_argument("--rows", type=int, default=25, help="operators per table")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per phase (trace_<phase>.json)")
    p.add_argument("--no-graphs", action="store_true", help="cuda_graphs=False (eager launches)")
    p.add_argument("--out", default="bench_ann/results/profile")
    run(p.parse_args())


if __name__ == "__main__":
    main()
