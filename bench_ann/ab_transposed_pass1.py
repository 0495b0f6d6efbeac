"""v35 experiment (negative): a transposed diag "tf32" pass 1 in Gluon (components on wgmma M, rows on N).

The shipped pass 1 (``kernels/logz_gluon.py``) runs 64-row tiles against 64-component blocks: wgmma m64n64 with the
row operands in registers (RS), two CTAs per SM. Question: do larger wgmma tiles (m64n128, both operands in shared
memory, SS) with the parameters as the M operand reach more of the tensor-core rate? The online log-sum-exp is then
kept per thread and per row (column) over the thread's two components of each block (no cross-lane reduction per
block; 1.5 exponentials per pair instead of ~1) and merged across lanes and warps once per tile.

Outputs: logZ (n,) and ||x~||^2 (n,) float32 for diag "tf32" parameters from ``estep.prepare`` (no row order, no
block bits). D = 128 only (DP = D). Run on a GPU from the repository root:

    python -m bench_ann.ab_transposed_pass1

Results: ``bench_ann/results/v35_transposed_pass1/`` (H100: slower in every form, 2.08-2.67 ms vs 2.05-2.47).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _issue(xh_s, qh_s, ql_s, a_s, alo_s, p_s, stage, cst, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
           mma: gl.constexpr):
    acc = gl.zeros([BLOCK_K, BLOCK_N], gl.float32, mma) + cst[:, None]
    p = p_s.index(stage)
    acc = warpgroup_mma(p, ql_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(p, qh_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(alo_s.index(stage), xh_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(a_s.index(stage), xh_s.permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _load(a_desc, alo_desc, p_desc, a_s, alo_s, p_s, bars, stage, k0, pred):
    bar = bars.index(stage)
    mbarrier.expect(bar, 3 * a_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(alo_desc, [k0, 0], bar, alo_s.index(stage), pred=pred)
    tma.async_copy_global_to_shared(a_desc, [k0, 0], bar, a_s.index(stage), pred=pred)
    tma.async_copy_global_to_shared(p_desc, [k0, 0], bar, p_s.index(stage), pred=pred)


@gluon.jit
def _cst(CST, k0, K, BLOCK_K: gl.constexpr, mma: gl.constexpr):
    offs = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma))
    return gl.load(CST + offs, mask=offs < K, other=0.0)


@gluon.jit
def _bias(BIAS2, COEF2, k0, K, BLOCK_K: gl.constexpr, mma: gl.constexpr):
    offs = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma))
    mk = offs < K
    return gl.load(BIAS2 + offs, mask=mk, other=float("-inf")), gl.load(COEF2 + offs, mask=mk, other=0.0)


@gluon.jit
def _lse(dist, bias, coef, m_t, l_t, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, NOEXP: gl.constexpr = False):
    s = bias[:, None] + coef[:, None] * dist                        # (BLOCK_K, BLOCK_N)
    s4 = gl.reshape(s, [BLOCK_K // 16, 2, 8, BLOCK_N])             # [warp, half, lane row, column]
    bm = gl.max(s4, axis=1)                                         # per thread: its two components
    m_new = gl.maximum(m_t, bm)
    if NOEXP:
        return m_new, l_t
    e = gl.sum(gl.exp2(s4 - gl.expand_dims(m_new, 1)), axis=1)
    l_t = l_t * gl.exp2(m_t - m_new) + e
    return m_new, l_t


@gluon.jit(do_not_specialize=["N"])
def _diag_logz_t_kernel(X, CENTER, a_desc, alo_desc, p_desc, BIAS2, COEF2, CST, SCALES, LOGZ, X2, N, K,
                        D: gl.constexpr, DP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                        STAGES: gl.constexpr, PIPE: gl.constexpr, NOEXP: gl.constexpr, num_warps: gl.constexpr):
    rows: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    op_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    pid = gl.program_id(0)
    offs_m = pid.to(gl.int64) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, rows))
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, rows))
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    x = gl.load(X + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    c = gl.load(CENTER + offs_d, mask=offs_d < D, other=0.0)
    x = gl.where(mask, x - c[None, :], 0.0)
    x = x * gl.load(SCALES)
    xh = x.to(gl.float16)
    xv = xh.to(gl.float32)
    x2 = gl.sum(xv * xv, axis=1)
    q = xv * xv * gl.load(SCALES + 1)
    qh = q.to(gl.float16)
    ql = (q - qh.to(gl.float32)).to(gl.float16)
    gl.store(X2 + offs_m, x2, mask=offs_m < N)
    xh_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, DP], op_layout, xh)
    qh_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, DP], op_layout, qh)
    ql_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, DP], op_layout, ql)

    num_kb = gl.cdiv(K, BLOCK_K)
    a_s = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_K, DP], a_desc.layout)
    alo_s = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_K, DP], a_desc.layout)
    p_s = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_K, DP], a_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()
    for i in gl.static_range(STAGES):
        _load(a_desc, alo_desc, p_desc, a_s, alo_s, p_s, bars, i, i * BLOCK_K, i < num_kb)

    mbarrier.wait(bars.index(0), 0)
    acc = _issue(xh_s, qh_s, ql_s, a_s, alo_s, p_s, 0, _cst(CST, 0, K, BLOCK_K, mma), BLOCK_K, BLOCK_N, mma)
    dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    bias, coef = _bias(BIAS2, COEF2, 0, K, BLOCK_K, mma)
    s = bias[:, None] + coef[:, None] * dist
    s4 = gl.reshape(s, [BLOCK_K // 16, 2, 8, BLOCK_N])
    m_t = gl.max(s4, axis=1)
    l_t = gl.sum(gl.exp2(s4 - gl.expand_dims(m_t, 1)), axis=1)
    if PIPE:
        for j in range(1, num_kb):
            gl.thread_barrier()
            _load(a_desc, alo_desc, p_desc, a_s, alo_s, p_s, bars, (j - 1) % STAGES, (j - 1 + STAGES) * BLOCK_K,
                  j - 1 + STAGES < num_kb)
            st = j % STAGES
            mbarrier.wait(bars.index(st), (j // STAGES) & 1)
            acc = _issue(xh_s, qh_s, ql_s, a_s, alo_s, p_s, st, _cst(CST, j * BLOCK_K, K, BLOCK_K, mma), BLOCK_K,
                         BLOCK_N, mma)
            if j > 1:
                m_t, l_t = _lse(dist, bias, coef, m_t, l_t, BLOCK_K, BLOCK_N, NOEXP)
            bias, coef = _bias(BIAS2, COEF2, j * BLOCK_K, K, BLOCK_K, mma)
            dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        if num_kb > 1:
            m_t, l_t = _lse(dist, bias, coef, m_t, l_t, BLOCK_K, BLOCK_N, NOEXP)
    else:
        for j in range(1, num_kb):
            gl.thread_barrier()
            _load(a_desc, alo_desc, p_desc, a_s, alo_s, p_s, bars, (j - 1) % STAGES, (j - 1 + STAGES) * BLOCK_K,
                  j - 1 + STAGES < num_kb)
            st = j % STAGES
            mbarrier.wait(bars.index(st), (j // STAGES) & 1)
            acc = _issue(xh_s, qh_s, ql_s, a_s, alo_s, p_s, st, _cst(CST, j * BLOCK_K, K, BLOCK_K, mma), BLOCK_K,
                         BLOCK_N, mma)
            dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            bias, coef = _bias(BIAS2, COEF2, j * BLOCK_K, K, BLOCK_K, mma)
            m_t, l_t = _lse(dist, bias, coef, m_t, l_t, BLOCK_K, BLOCK_N, NOEXP)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    m1 = gl.max(m_t, axis=0)                                         # (8, BLOCK_N)
    l1 = gl.sum(l_t * gl.exp2(m_t - gl.expand_dims(m1, 0)), axis=0)
    m2 = gl.max(m1, axis=0)                                          # (BLOCK_N,)
    l2 = gl.sum(l1 * gl.exp2(m1 - gl.expand_dims(m2, 0)), axis=0)
    logz = (m2 + gl.log2(l2)) * _LN2
    offs_r = pid.to(gl.int64) * BLOCK_N + gl.arange(0, BLOCK_N, layout=m2.type.layout)
    gl.store(LOGZ + offs_r, logz, mask=offs_r < N)


def launch(x, params, k, center, block_n=128, stages=2, pipe=True, noexp=False, logz=None, x2=None):
    n, d = x.shape
    dp = max(16, triton.next_power_of_2(d))
    layout = gl.NVMMASharedLayout.get_default_for([64, dp], gl.float16)
    descs = [TensorDescriptor.from_tensor(t, [64, dp], layout) for t in (params.a, params.a_lo, params.p)]
    logz = torch.empty(n, dtype=torch.float32, device=x.device) if logz is None else logz
    x2 = torch.empty(n, dtype=torch.float32, device=x.device) if x2 is None else x2
    grid = (triton.cdiv(n, block_n),)
    _diag_logz_t_kernel[grid](x, center, *descs, params.bias2, params.coef2, params.cst, params.scales, logz, x2, n, k,
                              D=d, DP=dp, BLOCK_N=block_n, BLOCK_K=64, STAGES=stages, PIPE=pipe, NOEXP=noexp,
                              num_warps=4)
    return logz


def main():
    import importlib
    from bench_ann.bench_kernels import ab_problem, bench
    from flashgmm_faiss import kernels
    ke = importlib.import_module("flashgmm_faiss.kernels.estep")
    lg = importlib.import_module("flashgmm_faiss.kernels.logz_gluon")
    n, k, d = 1000000, 1024, 128
    x, _, means, _, var, lw, _ = ab_problem(n, k, d, kernels, with_order=False)
    perm = kernels.component_order(means)
    params = kernels.prepare(means, var, lw, "tf32", float(kernels.absmax(x, None)), comp_perm=perm)
    skip = ke.SKIP_LOG2["tf32"]
    rb, x2 = ke._row_bits_buffer(n, triton.cdiv(k, ke.FLAG_K), x.device), torch.empty(n, device=x.device)
    zc = torch.zeros(d, device=x.device)
    ref = lg.launch_diag_logz(x, params, k, None, skip, rb, x2).clone()
    x2ref = x2.clone()
    fns = {"shipped_bits": lambda: lg.launch_diag_logz(x, params, k, None, skip, rb, x2),
           "shipped_nobits": lambda: lg.launch_diag_logz(x, params, k, None, skip, None, x2)}
    # (rows per CTA, ring stages, block j + 1's products issued before block j's log-sum-exp, exponentials left out)
    for cfg in [(128, 2, True, False), (128, 2, True, True), (64, 1, True, False), (64, 1, True, True),
                (64, 1, False, False)]:
        name = "t_bn%d_st%d_%s%s" % (cfg[0], cfg[1], "pipe" if cfg[2] else "seq", "_noexp" if cfg[3] else "")
        lz = launch(x, params, k, zc, block_n=cfg[0], stages=cfg[1], pipe=cfg[2], noexp=cfg[3], x2=x2).clone()
        torch.cuda.synchronize()
        rel = ((lz - ref).abs() / ref.abs().clamp_min(1)).max().item()
        print(name, "logZ max rel diff vs shipped", rel, "x2 equal", torch.equal(x2, x2ref), flush=True)
        fns[name] = (lambda cfg=cfg: launch(x, params, k, zc, block_n=cfg[0], stages=cfg[1], pipe=cfg[2],
                                            noexp=cfg[3], x2=x2))
    res = {nm: [] for nm in fns}
    for _ in range(3):
        for nm, f in fns.items():
            res[nm].append(bench(f, 100))
    for nm, ts in res.items():
        print(f"{nm:<24}", " ".join(f"{t:.3f}" for t in ts), flush=True)
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
