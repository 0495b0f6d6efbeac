"""A/B of pass 1's two loop forms (plain vs software-pipelined) in one process, interleaved.

Lent GPUs vary between calls (and sometimes within one: a run of this project saw the bf16 GEMM rate fall from
676 to 242 TFLOP/s between two back-to-back processes). So this script times both forms
(``kernels.estep.PIPELINE_LOGZ``) alternately, ``--rounds`` times, with the GEMM rates measured in every round:
a ratio within a round is meaningful even when the machine drifts. Timed: pass 1 (logZ) alone and the whole
E-step, at one (N, K, D), spherical and diag, in the given precisions. Prints a table and writes JSON. Pipelined
forms of pass 2 and of the k-means assignment were measured the same way (results/ab_pipeline_h100_run1.json:
slower, and unchanged) and dropped.

    python -m bench_ann.ab_pipeline --n 1000000 --k 1024 --d 128 --out /tmp/ab
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

from .bench_kernels import ab_problem, add_shape_args, add_timing_args, autotuned_configs, gemm_ceiling, sorted_inputs


def health(tag=""):
    """GEMM TFLOP/s (bench_kernels' ceiling) and device-to-device copy GB/s: a check that the GPU is not
    degraded."""
    import triton
    tf32, bf16 = gemm_ceiling()
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    tc = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    out = {"tf32_tflops": tf32, "bf16_tflops": bf16, "copy_gbs": 2 * src.numel() / tc / 1e6}
    print(f"# health{tag}: GEMM tf32 {tf32:.0f}, bf16 {bf16:.0f} TFLOP/s, copy {out['copy_gbs']:.0f} GB/s",
          flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    add_timing_args(ap, rep=40, out="bench_ann/results/ab_pipeline")
    ap.add_argument("--precisions", default="tf32")
    ap.add_argument("--min-bf16", type=float, default=0.0,
                    help="abort when the first health check gives fewer bf16 TFLOP/s (a degraded machine)")
    ap.add_argument("--sorted", action="store_true",
                    help="also the sparse E-step's path: rows sorted, components grouped, pass 1 with the gaps")
    args = ap.parse_args(argv)

    import triton
    kernels = importlib.import_module("flashgmm_faiss.kernels")
    kestep = importlib.import_module("flashgmm_faiss.kernels.estep")
    dev = torch.cuda.get_device_name()
    h0 = health(" (start)")
    if h0["bf16_tflops"] < args.min_bf16:
        raise SystemExit(f"degraded GPU: {h0['bf16_tflops']:.0f} < {args.min_bf16:.0f} TFLOP/s bf16; not timing")
    n, k, d = args.n, args.k, args.d
    x, bound, means, var_sph, var_diag, lw, perm = ab_problem(n, k, d, kernels, with_order=args.sorted)
    cases = []
    for prec in args.precisions.split(","):
        for cov, var in (("spherical", var_sph), ("diag", var_diag)):
            params = kernels.prepare(means, var, lw, prec, bound)
            cases.append((f"pass1 {cov} {prec}",
                          lambda var=var, prec=prec, params=params: kestep.launch_logz(
                              x, params, k, var.ndim == 2, prec, x2=None)))
            cases.append((f"E-step {cov} {prec}",
                          lambda var=var, prec=prec, params=params: kernels.estep(
                              x, means, var, lw, precision=prec, params=params)))
            if args.sorted:
                params_s, order, lzp, gaps = sorted_inputs(x, means, var, lw, prec, bound, perm, kernels)
                cases.append((f"pass1 sorted {cov} {prec}",
                              lambda var=var, prec=prec, params_s=params_s, order=order, lzp=lzp, gaps=gaps:
                              kestep.launch_logz(x, params_s, k, var.ndim == 2, prec, order=order, lzp=lzp,
                                                 gaps=gaps)))
                cases.append((f"E-step sorted {cov} {prec}",
                              lambda var=var, prec=prec, params_s=params_s, order=order: kernels.estep(
                                  x, means, var, lw, precision=prec, params=params_s, order=order)))

    shipped = kestep.PIPELINE_LOGZ

    def set_pipe(on):
        kestep.PIPELINE_LOGZ = on

    # warm-up: compile and autotune both forms (the autotune key includes the form)
    for on in (False, True):
        set_pipe(on)
        for _, fn in cases:
            fn()
    torch.cuda.synchronize()

    results = {name: {"plain": [], "pipelined": []} for name, _ in cases}
    rounds = []
    for r in range(args.rounds):
        rounds.append(health(f" (round {r + 1})"))
        for name, fn in cases:
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                set_pipe(on)
                ms = triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median")
                results[name]["pipelined" if on else "plain"].append(ms)
    kestep.PIPELINE_LOGZ = shipped

    print(f"\n# {dev}, N={n}, K={k}, D={d}: median ms over {args.rounds} interleaved rounds")
    print(f"{'kernel':<28} {'plain':>9} {'pipelined':>10} {'ratio':>7}")
    table = []
    for name, _ in cases:
        p = statistics.median(results[name]["plain"])
        q = statistics.median(results[name]["pipelined"])
        per_round = [a / b for a, b in zip(results[name]["plain"], results[name]["pipelined"])]
        table.append({"kernel": name, "plain_ms": p, "pipelined_ms": q, "speedup": p / q,
                      "speedup_per_round": per_round, **{f"{f}_all": results[name][f] for f in results[name]}})
        print(f"{name:<28} {p:9.3f} {q:10.3f} {p / q:7.3f}  per round {', '.join(f'{v:.3f}' for v in per_round)}")
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shipped": shipped, "health_start": h0, "health_rounds": rounds,
            "autotuned": autotuned_configs(), "rows": table}
    write_result(args.out, "ab_pipeline", dev, n, k, d, meta)


def write_result(out_dir, name, device, n, k, d, meta):
    """Writes ``meta`` as ``{out_dir}/{name}_{device}_n{n}_k{k}_d{d}.json`` (the A/B scripts' result files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{name}_{device.replace(' ', '_').lower()}_n{n}_k{k}_d{d}.json"
    f.write_text(json.dumps(meta, indent=1))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
