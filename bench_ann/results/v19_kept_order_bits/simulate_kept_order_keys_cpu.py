import torch, numpy as np, warnings, importlib
from flashgmm_faiss import GaussianMixture
from flashgmm_faiss._torch_backend import log_prob
from bench_ann.diag_precision_model import sift_like
ke=importlib.import_module("flashgmm_faiss.kernels.estep")
n,d,k,T=1<<17,128,1024,64
X=sift_like(n,d,2000,seed=3)
for cov in ("spherical","diag"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g=GaussianMixture(k,covariance_type=cov,kmeans_iter=5,max_iter=6,tol=0,backend="torch",device="cpu").fit(X)
    mu=torch.tensor(g.means_).float(); v=torch.tensor(g.covariances_).float(); lw=torch.log(torch.tensor(g.weights_)).float()
    x=torch.tensor(X)
    perm=ke.component_order(mu)
    lp=torch.cat([log_prob(x[i:i+8192],mu,v,lw).double() for i in range(0,n,8192)])[:,perm]
    s=lp/np.log(2); m=s.max(1,keepdim=True).values
    bmax=s.view(n,16,64).max(2).values
    exact=((bmax-m)>=-24)
    w=torch.tensor([1<<b for b in range(16)])
    kb=(exact.long()*w).sum(1); best=s.argmax(1); bb=best//64
    def tile_exact(o): return exact[o].view(-1,T,16).any(1).double().mean().item()
    def tile_running(o):
        # kept-order pass 1: per tile, blocks visited from the first row's best block, bits vs the running max
        bm=bmax[o].view(-1,T,16); h=bb[o].view(-1,T)[:,0]
        nt=bm.shape[0]; idx=(h[:,None]+torch.arange(16)[None,:])%16          # visiting order per tile
        vis=torch.gather(bm,2,idx[:,None,:].expand(-1,T,-1))                  # (tiles,T,16) in visiting order
        run=torch.cummax(vis,2).values
        setv=(vis-run>=-24).any(1)                                            # (tiles,16) visiting positions
        bits=torch.zeros(nt,16,dtype=torch.bool); bits.scatter_(1,idx,setv)
        return bits.double().mean().item()
    for name,key in (("argmax",best),("bits",kb),("block,bits",bb*65536+kb)):
        o=torch.argsort(key,stable=True)
        print(cov,name,"exact-bits tiles %.4f"%tile_exact(o),"running-max tiles %.4f"%tile_running(o),flush=True)
    print(cov,"rows %.4f"%exact.double().mean().item())
