"""A/B of the Gluon diag "tf32" pass 1 (``kernels/logz_gluon.py``) against an earlier version of that file.

    git show REV:kernels/logz_gluon.py > /tmp/logz_gluon_base.py
    python -m bench_ann.ab_pass1_baseline --baseline /tmp/logz_gluon_base.py --out DIR

Part 1, pass 1 alone (transient-order form: logZ, ||x~||^2 and the rows' block bits; and logZ alone) on the A/B
problem (``bench_kernels.ab_problem``) at N=1e6 and (K, D) = (1024, 128), (1000, 96), (4096, 128): whether the
outputs are equal bit for bit, and ``--rounds`` interleaved timings (median ms of ``triton.testing.do_bench``).
Part 2, whole diag "tf32" fits (``GaussianMixture`` defaults: sparse E-step, CUDA graphs; 10 k-means + 30 EM
iterations on the fit benchmark's SIFT-like rows, N=1e6, K=1024, D=128) with either kernel, ``--fit-rounds``
interleaved rounds: the median ms per EM iteration (iterations 2..end) and the final log-likelihoods. The baseline
replaces ``launch_diag_logz`` of the shipped module, which ``estep.launch_logz`` looks up at each call, and
(``--base-x2``, default) writes ||x~||^2 as the diag E-step asked it to before v36 (which no longer does: its pass 2
never reads it), so that the fits compare the two commits' E-steps.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = [(1_000_000, 1024, 128), (1_000_000, 1000, 96), (1_000_000, 4096, 128)]


def load_module(path):
    spec = importlib.util.spec_from_file_location("logz_gluon_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pass1_ab(base, lg, rounds, out, extra=None):
    """Part 1; ``extra``: more variants of the shipped launcher, {name: keyword arguments}."""
    import functools
    import triton
    from bench_ann.bench_kernels import ab_problem, bench
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    skip = ke.SKIP_LOG2["tf32"]
    launch = {"base": base.launch_diag_logz, "new": lg.launch_diag_logz}
    launch.update({nm: functools.partial(lg.launch_diag_logz, **kw) for nm, kw in (extra or {}).items()})
    for n, k, d in SHAPES:
        x, _, means, _, var, lw, _ = ab_problem(n, k, d, kernels, with_order=False)
        params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, None)),
                                 comp_perm=kernels.component_order(means))
        nb = triton.cdiv(k, ke.FLAG_K)
        bufs = {nm: (ke._row_bits_buffer(n, nb, x.device), torch.empty(n, device=x.device)) for nm in launch}
        got = {nm: launch[nm](x, params, k, None, skip, *bufs[nm]).clone() for nm in launch}
        torch.cuda.synchronize()
        key = f"n={n} k={k} d={d}"
        out["pass1_equal"][key] = {
            f"{nm} {what}": torch.equal(a, b) for nm in launch if nm != "base"
            for what, a, b in (("logz", got["base"], got[nm]), ("row_bits", bufs["base"][0], bufs[nm][0]),
                               ("x2", bufs["base"][1], bufs[nm][1]))}
        fns = {f"{nm} bits": (lambda nm=nm: launch[nm](x, params, k, None, skip, *bufs[nm])) for nm in launch}
        fns.update({f"{nm} logz": (lambda nm=nm: launch[nm](x, params, k, None, skip)) for nm in launch})
        times = {nm: [] for nm in fns}
        for _ in range(rounds):
            for nm, f in fns.items():
                times[nm].append(bench(f, 100))
        out["pass1_ms"][key] = times
        print(key, "equal:", out["pass1_equal"][key], flush=True)
        for nm, ts in times.items():
            print(f"  {nm:<16} median {statistics.median(ts):.3f} ms  " + " ".join(f"{t:.3f}" for t in ts),
                  flush=True)
        del x, params


def fit_ab(base, lg, rounds, out, base_x2=True):
    from bench_ann.bench_fit import interleaved_fits, sift_like
    shipped = lg.launch_diag_logz

    def base_launch(x, params, k, center, skip, row_bits=None, x2=None, **kw):
        if x2 is None and base_x2:
            x2 = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        return base.launch_diag_logz(x, params, k, center, skip, row_bits, x2, **kw)

    def use(f):
        lg.launch_diag_logz = f

    n, k, d = 1_000_000, 1024, 128
    try:
        fits = interleaved_fits(sift_like(n, d, k), k, "diag",
                                {"base": lambda: use(base_launch), "new": lambda: use(shipped)}, rounds)
    finally:
        lg.launch_diag_logz = shipped
    out["fit_ms_per_em_iteration"] = {nm: r["ms"] for nm, r in fits.items()}
    out["fit_final_log_likelihood"] = {nm: r["log_likelihood"] for nm, r in fits.items()}
    for nm, r in fits.items():
        print(f"diag fit, {nm}: median {statistics.median(r['ms']):.3f} ms per EM iteration "
              f"{[round(t, 3) for t in r['ms']]}; final log-likelihoods {r['log_likelihood']}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="an earlier kernels/logz_gluon.py")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fit-rounds", type=int, default=4)
    ap.add_argument("--base-x2", type=int, default=1, help="1: the baseline's fits also write ||x~||^2 (before v36)")
    ap.add_argument("--extra", default="",
                    help="more variants of the shipped launcher for part 1: 'name:key=value,...;name2:...' (integer "
                         "values, e.g. 'overlap:overlap=1')")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    base = load_module(a.baseline)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(a), "pass1_equal": {}, "pass1_ms": {}}
    extra = {}
    for spec in filter(None, a.extra.split(";")):
        name, _, kws = spec.partition(":")
        extra[name] = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in filter(None, kws.split(","))}
    pass1_ab(base, lg, a.rounds, out, extra)
    if a.fit_rounds:
        fit_ab(base, lg, a.fit_rounds, out, bool(a.base_x2))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "ab_pass1_baseline.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
