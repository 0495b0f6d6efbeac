import torch, numpy as np, warnings, time
from flashgmm_faiss import GaussianMixture
from bench_ann.diag_precision_model import sift_like
torch.manual_seed(0)
n,d,k=65536,128,1024
X=sift_like(n,d,2000,seed=3)
for cov in ("spherical","diag"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g=GaussianMixture(k,covariance_type=cov,kmeans_iter=5,max_iter=6,tol=0,backend="torch",device="cpu").fit(X)
    x=torch.tensor(X,dtype=torch.float64); mu=torch.tensor(g.means_); v=torch.tensor(g.covariances_); lw=torch.log(torch.tensor(g.weights_))
    # component order: the package's (kernels.component_order needs triton; emulate: sort comps by a small kmeans)
    from flashgmm_faiss._torch_backend import log_prob
    lp=torch.cat([log_prob(x[i:i+8192].float(),mu.float(),v.float(),lw.float()).double() for i in range(0,n,8192)])
    import importlib; ke=importlib.import_module("flashgmm_faiss.kernels.estep")
    perm=ke.component_order(mu.float())
    lp=lp[:,perm]
    s=lp/np.log(2); m=s.max(1,keepdim=True).values
    bmax=s.view(n,16,64).max(2).values
    bits=((bmax-m)>=-24)
    w=torch.tensor([1<<b for b in range(16)])
    key_bits=(bits.long()*w).sum(1)
    best=s.argmax(1)
    for name,key in (("argmax",best),("bits",key_bits),("block,bits",(best//64)*65536+key_bits)):
        o=torch.argsort(key,stable=True)
        tb=bits[o].view(-1,64,16).any(1)
        print(cov,name,"tile pairs kept %.4f"%tb.double().mean().item(),"row pairs %.4f"%bits.double().mean().item())
