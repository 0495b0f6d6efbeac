"""Where the Gluon diag "tf32" pass 1 (``kernels/logz_gluon.py``) loses time: diagnostic variants that drop one
part of its work each, timed against the shipped kernel on the same problem (results are wrong by construction;
only the times mean something).

Variants (source edits of the shipped kernel, written to a temporary module and imported):

* ``norefill``: the parameter ring loaded once and never refilled (no CTA barrier, TMA or mbarrier wait in the
  loop): the cost of the parameter stream and its barriers.
* ``noexp``: the log-sum-exp's exponentials replaced by a plain row sum: the cost of the MUFU work.
* ``p3`` / ``p2``: the ``ql . P`` product (and the ``xh . A_lo`` product) left out: what a product costs, e.g.
  the bound on a form whose correction terms ran at twice the rate (fp8).
* combinations of the above.

    python -m bench_ann.ab_pass1_limits --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench_ann.bench_kernels import ab_problem, add_shape_args, add_timing_args, bench

_REFILL = """        gl.thread_barrier()      # every warp is done with stage j % STAGES (block j, waited): refill it
        _load_block(a_desc, alo_desc, p_desc, a_s, alo_s, p_s, bars, j % STAGES,
                    ((b0 + j + STAGES) % num_kb) * BLOCK_K, j + STAGES < num_kb)
        nxt = (j + 1) % STAGES
        mbarrier.wait(bars.index(nxt), ((j + 1) // STAGES) & 1)
"""
_FIRST_WAIT = "    mbarrier.wait(bars.index(0), 0)\n"
_LSE = "    l_i = l_i * gl.exp2(m_i - m_new) + gl.sum(gl.exp2(s - m_new[:, None]), axis=1)\n"
_QL = "    acc = warpgroup_mma(ql_s, pt, acc, is_async=True)\n"
_ALO = "    acc = warpgroup_mma(xh_s, alot, acc, is_async=True)\n"

EDITS = {
    "norefill": [(_REFILL, "        nxt = (j + 1) % STAGES\n"),
                 (_FIRST_WAIT, "    for i in gl.static_range(STAGES):\n        mbarrier.wait(bars.index(i), 0)\n")],
    "noexp": [(_LSE, "    l_i = l_i + gl.sum(s, axis=1)\n")],
    "p3": [(_QL, "")],
    "p2": [(_QL, ""), (_ALO, "")],
}
VARIANTS = ["shipped", "norefill", "noexp", "p3", "p2", "norefill+noexp", "p3+norefill", "p2+norefill+noexp"]


def variant_module(name, src, tmp):
    """The shipped kernel's module with the edits of ``name`` ("a+b" applies both), imported from ``tmp``."""
    for part in name.split("+"):
        for old, new in EDITS.get(part, []):
            if old not in src:
                raise RuntimeError(f"variant {part}: the text to replace is not in logz_gluon.py: {old!r}")
            src = src.replace(old, new)
    path = Path(tmp) / f"logz_gluon_{name.replace('+', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    add_timing_args(ap)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args(argv)
    import triton
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    src = Path(lg.__file__).read_text()
    x, _, means, _, var, lw, _ = ab_problem(a.n, a.k, a.d, kernels, with_order=False)
    n = x.shape[0]
    perm = kernels.component_order(means)
    params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, None)), comp_perm=perm)
    skip = ke.SKIP_LOG2["tf32"]
    nb = triton.cdiv(a.k, ke.FLAG_K)
    rb, x2 = ke._row_bits_buffer(n, nb, x.device), torch.empty(n, device=x.device)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "n": a.n, "k": a.k, "d": a.d, "times_ms": {}, "logz_max_abs_diff": {}}
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for name in a.variants.split(","):
            mod = lg if name == "shipped" else variant_module(name, src, tmp)
            fns[name] = (lambda mod=mod: mod.launch_diag_logz(x, params, a.k, None, skip, rb, x2))
            lz = fns[name]().clone()
            torch.cuda.synchronize()
            ref = lz if ref is None else ref
            out["logz_max_abs_diff"][name] = (lz - ref).abs().max().item()
        for name in fns:
            out["times_ms"][name] = []
        for _ in range(a.rounds):
            for name, f in fns.items():
                out["times_ms"][name].append(bench(f, a.rep))
    for name, ts in out["times_ms"].items():
        print(f"  {name:<22} ms " + " ".join(f"{t:.3f}" for t in ts)
              + f"   (logZ max |diff| vs shipped {out['logz_max_abs_diff'][name]:.3g})", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_pass1_limits.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
