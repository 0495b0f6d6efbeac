"""v38 experiment: a two-product Gluon screen of the diag "tf32" pass 1 (no exponentials) against the shipped pass 1.

    python bench_ann/v38_screen/ab_screen.py bench_ann/v38_screen/logz_screen.py OUT.json

(repository root, package importable, Hopper GPU). On the A/B problem and on a diag fit's state (sift_like with 1024
clusters, 10 EM iterations): whether the screen's row bits (scalar bound) contain the shipped kernel's exact ones,
the kept fractions (rows; 64-row tiles of the order sorted by either bit set), and 5 interleaved timings."""
import importlib, importlib.util, json, statistics, sys, time
import torch, triton
sys.path.insert(0, ".")
from bench_ann.bench_kernels import ab_problem, bench
from bench_ann.bench_fit import sift_like
from flashgmm_faiss import GaussianMixture
from flashgmm_faiss import kernels
ke = importlib.import_module("flashgmm_faiss.kernels.estep")
spec = importlib.util.spec_from_file_location("logz_screen", sys.argv[1])
scr = importlib.util.module_from_spec(spec); spec.loader.exec_module(scr)
out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
skip = ke.SKIP_LOG2["tf32"]


def popfrac(bits, nb):
    b = bits.long()
    c = torch.zeros_like(b)
    for i in range(nb):
        c += (b >> i) & 1
    return float(c.float().mean()) / nb


def study(name, x, center, means, var, lw, k):
    n = x.shape[0]
    nb = triton.cdiv(k, 64)
    params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, center)),
                             comp_perm=kernels.component_order(means))
    rb = ke._row_bits_buffer(n, nb, x.device)
    rbs = ke._row_bits_buffer(n, nb, x.device)
    ke.launch_logz(x, params, k, True, "tf32", center=center, skip=skip, row_bits=rb)
    scr.launch_diag_logz(x, params, k, center, skip, row_bits=rbs)
    torch.cuda.synchronize()
    sup = bool(((rbs.long() & rb.long()) == rb.long()).all())
    rows_e = ke._argsort_bits(rb, nb).int()
    rows_s = ke._argsort_bits(rbs, nb).int()
    r = {"superset": sup, "rows_exact": popfrac(rb, nb), "rows_screen": popfrac(rbs, nb),
         "tiles_now": popfrac(ke.tile_bits(rb, rows_e), nb),
         "tiles_pass1prime": popfrac(ke.tile_bits(rbs, rows_s), nb),
         "tiles_pass2_screen_order": popfrac(ke.tile_bits(rb, rows_s), nb)}
    fns = {"shipped bits": lambda: ke.launch_logz(x, params, k, True, "tf32", center=center, skip=skip, row_bits=rb),
           "screen bits": lambda: scr.launch_diag_logz(x, params, k, center, skip, row_bits=rbs),
           "sort": lambda: ke._argsort_bits(rbs, nb)}
    times = {nm: [] for nm in fns}
    for _ in range(5):
        for nm, f in fns.items():
            times[nm].append(bench(f, 100))
    r["ms"] = times
    print(name, json.dumps({kk: v for kk, v in r.items() if kk != "ms"}), flush=True)
    for nm, ts in times.items():
        print(f"  {nm:<14} median {statistics.median(ts):.3f} ms  " + " ".join(f"{t:.3f}" for t in ts), flush=True)
    out[name] = r


n, k, d = 1_000_000, 1024, 128
x, _, means, _, var, lw, _ = ab_problem(n, k, d, kernels, with_order=False)
study("ab_problem", x, None, means, var, lw, k)
del x
x = sift_like(n, d, k)
gm = GaussianMixture(k, covariance_type="diag", max_iter=10, kmeans_iter=10, tol=0, device="cuda").fit(x)
center = torch.as_tensor(gm.center_, device="cuda", dtype=torch.float32)
means = torch.as_tensor(gm.means_, device="cuda") - center
study("fit_state_10", x, center, means, torch.as_tensor(gm.covariances_, device="cuda"),
      torch.as_tensor(gm.weights_, device="cuda").log(), k)
if len(sys.argv) > 2:
    open(sys.argv[2], "w").write(json.dumps(out, indent=1))
