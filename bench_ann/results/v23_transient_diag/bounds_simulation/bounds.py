"""CPU simulation (float64) of Hamerly-style bounds for skipping pass-1 (tile, block) pairs between row-order
rebuilds; see ../README.md. Usage: python bounds.py diag|spherical siftlike|glove|mnist (from any directory)."""
import torch, numpy as np, math, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]          # the repository
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from bench_ann.diag_precision_model import sift_like
torch.manual_seed(0)
k = 1024
cov = sys.argv[1] if len(sys.argv) > 1 else "diag"
ds = sys.argv[2] if len(sys.argv) > 2 else "siftlike"
if ds == "glove":
    A = np.load(DATA / "glove-6b-50d" / "glove_6B_50d.f32.npy")
    A = A[np.random.default_rng(0).permutation(len(A))[:65536]]
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
elif ds == "mnist":
    import gzip
    A = np.frombuffer(gzip.open(DATA / "mnist" / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    A = A.reshape(-1, 784)[:59904].astype(np.float64)
else:
    A = sift_like(65536, 128, 2000, seed=3)
X = torch.tensor(A, dtype=torch.float64); n, d = X.shape
X = X - X.mean(0)
# k-means warm start
mu = X[torch.randperm(n)[:k]].clone()
for it in range(5):
    lab = torch.cdist(X, mu).argmin(1)
    s = torch.zeros_like(mu).index_add_(0, lab, X); c = torch.bincount(lab, minlength=k).double()
    mu = torch.where(c[:, None] > 0, s / c.clamp_min(1)[:, None], mu)
var = torch.zeros(k, d, dtype=torch.float64).index_add_(0, lab, (X - mu[lab]) ** 2) / c.clamp_min(1)[:, None]
if cov == "spherical":
    var = var.mean(1, keepdim=True).expand(k, d).clone()
var = var.clamp_min(1e-3 * X.var(0).mean()); w = (c + 1e-3) / (c + 1e-3).sum()
def params_logits(mu, var, w):
    p = 1 / var
    cst = torch.log(w) - 0.5 * torch.log(var).sum(1) - 0.5 * d * math.log(2 * math.pi)
    out = torch.empty(n, k, dtype=torch.float64)
    for i in range(0, n, 8192):
        x = X[i:i + 8192]
        dist = (x * x) @ p.T - 2 * x @ (mu * p).T + (mu * mu * p).sum(1)
        out[i:i + 8192] = cst - 0.5 * dist
    return out, cst
def mstep(R):
    nk = R.sum(0) + 1e-10
    mu = (R.T @ X) / nk[:, None]
    ex2 = (R.T @ (X * X)) / nk[:, None]
    var = (ex2 - mu * mu).clamp_min(0)
    if cov == "spherical":
        var = var.mean(1, keepdim=True).expand(k, d).clone()
    var = var + 1e-6 * X.var(0).mean()
    return mu, var, nk / n
# order components (as the kernels do)
states = []
for it in range(14):
    lg, cst = params_logits(mu, var, w)
    lz = torch.logsumexp(lg, 1)
    states.append((mu.clone(), var.clone(), w.clone(), cst.clone()))
    R = torch.exp(lg - lz[:, None])
    print("iter", it, "loglik %.4f" % lz.mean().item(), flush=True)
    mu, var, w = mstep(R)
LN2 = math.log(2); TH = -24 * LN2
BK = 64; nb = k // BK; T = 64
def analyse(r, js):
    mu0, var0, w0, c0 = states[r]
    # component order: block by a small kmeans of means
    g = nb; cent = mu0[torch.arange(0, k, k // g)[:g]].clone()
    for _ in range(8):
        lb = torch.cdist(mu0, cent).argmin(1)
        s = torch.zeros_like(cent).index_add_(0, lb, mu0); cn = torch.bincount(lb, minlength=g).double()
        cent = torch.where(cn[:, None] > 0, s / cn.clamp_min(1)[:, None], cent)
    perm = torch.argsort(lb * k + torch.arange(k))
    lg0, _ = params_logits(mu0, var0, w0); L0 = torch.logsumexp(lg0, 1); G0 = (lg0 - L0[:, None])[:, perm]
    bmax = G0.view(n, nb, BK).max(2).values; bits = bmax >= TH
    key = (G0.argmax(1) // BK) * 65536 + (bits.long() * (2 ** torch.arange(nb))).sum(1)
    o = torch.argsort(key, stable=True)
    G0o = G0[o]; L0o = L0[o]; Xo = X[o]
    U = G0o.view(n // T, T, nb, BK).amax(dim=(1, 3))   # tile, block
    keep0 = U >= TH
    print(f"rebuild at {r}: tile pairs kept {keep0.double().mean():.4f}")
    p0 = (1 / var0)[perm]; m0 = mu0[perm]; c0p = c0[perm]
    for j in js:
        mu1, var1, w1, c1 = states[j]
        p1 = (1 / var1)[perm]; m1 = mu1[perm]; c1p = c1[perm]
        lg1, _ = params_logits(mu1, var1, w1); lg1 = lg1[:, perm][o]; L1 = torch.logsumexp(lg1, 1)
        G1 = lg1 - L1[:, None]
        true_keep = G1.view(n // T, T, nb, BK).amax(dim=(1, 3)) >= TH
        # partial logZ over the rebuild-kept blocks of each tile
        mask = keep0.repeat_interleave(T, 0).repeat_interleave(BK, 1)
        Zp = torch.logsumexp(torch.where(mask, lg1, torch.tensor(-1e300, dtype=torch.float64)), 1)
        rho = (p1 / p0).min(1).values; eta = ((p1 * (m1 - m0) ** 2).sum(1)).sqrt()
        # per element bound, with U per tile-block (d_old from U)
        Ue = U.repeat_interleave(T, 0).repeat_interleave(BK, 1)
        dold2 = (2 * (c0p[None, :] - L0o[:, None] - Ue)).clamp_min(0)
        dn = (rho.sqrt()[None, :] * dold2.sqrt() - eta[None, :]).clamp_min(0)
        bnd = c1p[None, :] - 0.5 * dn * dn - Zp[:, None]
        assert (bnd >= G1 - 1e-6).all(), "unsound"
        bkeep = bnd.view(n // T, T, nb, BK).amax(dim=(1, 3)) >= TH
        bkeep = bkeep | keep0
        # ideal with exact old gaps per element (not just U)
        dold2e = (2 * (c0p[None, :] - L0o[:, None] - G0o)).clamp_min(0)
        dne = (rho.sqrt()[None, :] * dold2e.sqrt() - eta[None, :]).clamp_min(0)
        bnde = c1p[None, :] - 0.5 * dne * dne - Zp[:, None]
        ekeep = (bnde.view(n // T, T, nb, BK).amax(dim=(1, 3)) >= TH) | keep0
        print(f"  iter {j}: true kept {true_keep.double().mean():.4f}  bound(U) kept {bkeep.double().mean():.4f}"
              f"  bound(exact old) {ekeep.double().mean():.4f}  rho min {rho.min():.3f} med {rho.median():.3f}"
              f"  eta med {eta.median():.3f} max {eta.max():.3f}  missing {(true_keep & ~bkeep).sum().item()}")
for r in (1, 5, 9):
    analyse(r, [r + 1, r + 2, r + 3])
