# The inline script of the diag fit-state check (run from the repository root on the GPU machine, the screen's
# commit checked out): pairs kept, screened and unscreened transient orders on a diag fit's state, and the
# E-step at 262,144 and 10^6 rows. Output: diag_fit_state_pairs.log
import torch, importlib, triton, time
from bench_ann.ab_threshold import fit_state
from bench_ann.ab_sort_rows import pairs_kept
from bench_ann.bench_kernels import bench
ke = importlib.import_module("flashgmm_faiss.kernels.estep"); ks = importlib.import_module("flashgmm_faiss.kernels.screen")
from flashgmm_faiss import kernels
x, c, m, v, lw = fit_state(1_000_000, 1024, 128, 8, "diag")
perm = kernels.component_order(m)
for prec in ("tf32",):
    params = kernels.prepare(m, v, lw, prec, float(kernels.absmax(x, c)), comp_perm=perm)
    r = {}
    for scr in (True, False):
        ks.SCREEN_DIAG = scr
        g = ke.transient_order(x, params, 1024, True, prec, center=c)[3]
        r[scr] = pairs_kept(g, 16)
        xs = x[:262144]
        f = lambda: kernels.estep(xs, m, v, lw, precision=prec, center=c, params=params, sort_rows=True)
        f2 = lambda: kernels.estep(x, m, v, lw, precision=prec, center=c, params=params, sort_rows=True)
        print("screen", scr, "pairs", r[scr], "262k ms", [round(bench(f, 10), 3) for _ in range(3)], "1e6 ms", [round(bench(f2, 10), 3) for _ in range(2)], flush=True)
    ks.SCREEN_DIAG = True
    b, rb = ks.screen_rows(x, params, 1024, prec, 24.0, center=c)
    ex = torch.empty_like(rb); ke.launch_logz(x, params, 1024, True, prec, center=c, skip=24.0, row_bits=ex)
    pc = lambda t: sum(int(((t >> i) & 1).sum()) for i in range(16))
    print("row bits screened", pc(rb), "exact", pc(ex), "missing", int(((ex & ~rb) != 0).sum()))
    bd = ks.screen_bounds(params, 1024, 1); print("bounds V", bd[0].tolist()[:16]); print("Z", bd[1].tolist()[:16]); print("C", bd[2].tolist()[:16])
