"""Registers, spills and shared memory of the E-step kernels for a Hopper GPU, compiled on any machine (no GPU).

Triton compiles to PTX and ``ptxas`` (shipped in the triton wheel) assembles it for ``sm_90a``; ``ptxas -v`` reports
the registers per thread and the spill stores and loads of every config. A kernel change that adds live tiles
shows up here before any device time is spent (a config that spills, or one that no longer fits the shared memory,
is usually the reason a kernel change makes the autotuner pick a slow config on the GPU).

    python -m bench_ann.compile_report --cov diag --precision tf32
    python -m bench_ann.compile_report --cov spherical --precision bf16 --pass 1 --json out.json

Prints one table row per (pass, config); ``--json`` writes the rows. Must not run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys

_PTR_TYPES = {   # argument name -> pointer element type (modes 1 and 2 store 16-bit operands)
    "ROWS": "i32", "HINT": "i32", "BEST": "i64", "GAPS": "i64", "WORK": "i32", "COUNTS": "i32", "ORDER": "i32",
    "ROWBITS": "i32",
}
_OPERANDS = {"A", "A_LO", "P", "P_LO", "XO", "XQ", "XQL"}
_INTS = {"N", "K", "WSTRIDE", "SLAB_ROWS", "N_SLABS"}


def _jit_fn(kernel):
    """The JITFunction under the autotune / heuristics wrappers."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, constexprs: dict, num_warps: int, num_stages: int, op_type: str, arch: int = 90):
    """Compiles ``kernel`` for ``sm_{arch}`` with the given constexprs; returns (compiled kernel, ptx text)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit_fn(kernel)
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INTS:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "*" + (op_type if name in _OPERANDS else _PTR_TYPES.get(name, "fp32"))
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in
                                                            constexprs.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    return c, c.asm["ptx"]


def ptxas_usage(ptx: str, arch: int = 90) -> dict:
    """``ptxas -v`` of the PTX: registers, spill stores / loads (bytes), stack frame."""
    import tempfile
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


def _configs(which, es, named):
    """The autotune configs the kernel's pruning keeps for these arguments."""
    kernel = es._logz_kernel if which == 1 else es._estep_stats_kernel
    prune = es._prune_row if which == 1 else es._prune_stats
    return kernel, prune(kernel.configs, named)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cov", choices=["spherical", "diag"], default="diag")
    ap.add_argument("--precision", choices=["tf32", "bf16"], default="tf32")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sparse", action="store_true", help="the sparse E-step's variants (row order, gaps, lists)")
    ap.add_argument("--sort-rows", action="store_true",
                    help="estep(sort_rows=True)'s variants: pass 1 unordered with per-row bits, no copy; pass 2 sparse")
    ap.add_argument("--pass", dest="which", type=int, choices=[1, 2], action="append",
                    help="pass 1 (logZ) and/or pass 2 (statistics); default both")
    ap.add_argument("--no-split-a", action="store_true", help="diag tf32: A as one fp16 term (DIAG_SPLIT_A off)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_report compiles for a GPU: unset TRITON_INTERPRET")
    import triton
    es = importlib.import_module("flashgmm_faiss.kernels.estep")
    mode = es._MODES[args.precision]
    op_type = "fp16" if mode == 1 else "bf16"
    diag = args.cov == "diag"
    sort_rows = args.sort_rows
    common = dict(D=args.d, BLOCK_D=max(16, triton.next_power_of_2(args.d)), DIAG=diag, HAS_CENTER=True, MODE=mode,
                  EMU=False, FLAG_ROWS=es.FLAG_ROWS, SPLIT_A=es._split_a(mode, diag) and not args.no_split_a)
    n_blocks = triton.cdiv(args.k, es.FLAG_K)
    rows = []
    for which in args.which or [1, 2]:
        if which == 1:
            # the transient order's pass 1 computes the argmax only for the argmax sort key (TRANSIENT_SORT_KEY)
            argmax = args.sparse or (sort_rows and es.TRANSIENT_SORT_KEY == "argmax")
            named = dict(common, K=args.k, WITH_ARGMAX=argmax, WRITE_X2=True,
                         WRITE_COPY=not sort_rows, PIPE=bool(es.PIPELINE_LOGZ), HAS_ORDER=args.sparse,
                         WRITE_GAPS=args.sparse, SKIP=float(es.SKIP_LOG2[args.precision]), ROW_BITS=sort_rows,
                         NB_PAD=max(2, triton.next_power_of_2(n_blocks)) if sort_rows else 1)
        else:
            named = dict(common, K=args.k, COPY=not sort_rows, SPARSE=args.sparse or sort_rows,
                         HAS_ORDER=args.sparse or sort_rows,
                         EXACT_STATS=es._exact_stats(mode, diag, copy=not sort_rows),
                         HEAVY_FIRST=bool(es.PASS2_HEAVY_FIRST) and (args.sparse or sort_rows))
        kernel, configs = _configs(which, es, named)
        for cfg in configs:
            cx = {k: v for k, v in named.items() if k != "K"}
            cx.update(cfg.kwargs)
            cx["EVEN_K"] = args.k % cfg.kwargs["BLOCK_K"] == 0
            try:
                c, ptx = compile_kernel(kernel, cx, cfg.num_warps, cfg.num_stages, op_type)
                use = ptxas_usage(ptx)
                use["shared"] = c.metadata.shared
            except Exception as e:     # a config that does not compile is reported, not fatal
                use = {"error": str(e).splitlines()[0][:120]}
            row = {"pass": which, "BLOCK_M": cfg.kwargs["BLOCK_M"], "BLOCK_K": cfg.kwargs["BLOCK_K"],
                   "warps": cfg.num_warps, "stages": cfg.num_stages, **use}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cov": args.cov, "precision": args.precision, "k": args.k, "d": args.d,
                       "sparse": args.sparse, "sort_rows": sort_rows, "split_a": common["SPLIT_A"], "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
