"""How many rows a chunk has, and what the fused kernels may buffer: the estimator's memory plan.

Everything :class:`~flashgmm_faiss.GaussianMixture` allocates on the device beyond X itself is one of

* O(K D): the parameters, the float64 statistics, the M-step's temporaries and the kernels' per-slab partial
  sums (at most ``kernels.estep.PARTIAL_BYTES`` for Sx, as much again for diag's Sx^2);
* O(chunk): the per-chunk buffers, proportional to the rows of one chunk (the kernels' per-row outputs, the
  k-means update's sort, the float32 upload of host data and, in the fused E-step's 16-bit modes, the rows'
  operand copy of 2 D bytes per row, 6 D for diag);
* O(N): the sparse E-step's row orders (8 bytes per row of the fit data). Without room for them, each E-step
  sorts its chunk's rows itself (a transient order, ``SORT_ROW_BYTES`` per row of the chunk while pass 1 and the
  sort run; the partial sums and ``PASS2_ROW_BYTES`` per row come after them, so such a chunk is sized for the
  larger of the two phases, not their sum).

The Triton backend's torch paths (rows wider than the kernels' tile, and the recomputation of collapsed
components, :mod:`flashgmm_faiss._collapsed`) run after a chunk's kernels, in row pieces of at most
``ChunkPlan.torch_bytes``: what the E-step's transient buffers and partial sums leave free (2 GiB by default).

By default the chunk buffers get 512 MiB (at most 1/8 of the free device memory) and the row orders up to 1 GiB;
a fit that keeps no row orders by choice (diag, ``TritonBackend.kept_orders``) fills the 512 MiB with transient-order
chunks and has no operand copy (:func:`default_transient_plan`).
``GaussianMixture(working_memory=M)`` instead bounds the total of the three by M MiB: the O(K D) part is
estimated, the chunk takes what remains (with the operand copy only when at least ``MIN_COPY_ROWS`` rows fit
with it, or the whole data set; without the copy pass 2 converts the float32 rows itself), and the row orders
get what the chunk leaves. The per-row and per-element constants are upper estimates checked against the peak
allocations of GPU fits (``bench_ann/bench_fit.py --working-memory``, results in ``bench_ann/results/``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

TRITON_CHUNK_BYTES = 2 ** 29     # default per-chunk buffers of the Triton backend
ROW_ORDER_BYTES = 1 << 30        # default bound of the row orders (sparse E-step)
PARTIAL_BYTES = 16 << 20         # kernels.estep.PARTIAL_BYTES (not imported: that module needs Triton)
# Triton backend, bytes per row of a chunk without the operand copy. E-step: logZ and ||x||^2 (4 each) and margin;
# with row orders also pass 1's logZ in the order (4), the argmax and the row bits for the next order (8 + 4) and
# that order's two stable sorts (bits, then block: ~32). k-means step: labels (8), distances (4), int32 labels,
# their sorted copy and the permutation (16), the sort's scratch (~16) and margin: the k-means warm start runs on
# sub-chunks of ``ChunkPlan.kmeans_rows`` rows, so that its larger per-row buffers do not shrink the E-step's chunks
# (N=1e8 spherical on an H100 in 64 MiB: 445k-row chunks took 0.36 s per EM iteration, 2^20-row ones 0.28 s)
ESTEP_ROW_BYTES = 16
ORDER_ROW_BYTES = 48
# the E-step on a transient row order (kernels.estep's sort_rows, when the fit keeps no orders) runs in two phases
# that never hold their buffers at once. Pass 1 and the argsort: per-row block bits (the 16-bit sort keys
# themselves up to 16 blocks since v40, else 4 and a 2-byte key copy; argmax 4 only for the argmax key), the
# argsort's int64 result (8) and the radix sort's scratch, then the tile-bits launch's int32 order (4), logZ in the
# order (4) and ||x||^2 in the order (4, spherical) beside the int64 result. The sparse pass 2 and the reduction,
# beside the per-slab partial sums: the order (4), logZ in the order (4), ||x||^2 in the order while the unordered
# one is alive (4, spherical), the work lists (~1). Measured on an H100 before v40 (bench_ann/estep_memory.py,
# K=1024, D=128, logZ and ||x||^2 included): 46.2 and 17.1 bytes per row; the constants add ~20 % and ~40 % (v40's
# narrower bits and fewer copies only lower the first phase; the working_memory=64 GPU test passed on v40)
SORT_ROW_BYTES = 40
PASS2_ROW_BYTES = 8
KMEANS_ROW_BYTES = 80
# bytes per (component, feature) element of the O(K D) part beside the partials: float64 parameters, statistics
# and M-step temporaries (~12 arrays), the float32 parameters and the kernels' prepared operands, the graphs' copies
KD_BYTES = 112
MIN_COPY_ROWS = 1 << 20          # the operand copy pays for itself on chunks of at least this many rows
MIN_CHUNK_ROWS = 1024
MIB = 1 << 20
# default bound of one piece of the Triton backend's torch paths (at most 1/4 of the free device memory): each piece
# costs 3-5 ms beyond its rows' work (a wholly-torch diag E-step at N=2^20, K=1024 with 611 collapsed components on
# an H100: 352 ms in 512 MiB pieces, 168 in 2 GiB ones, the torch backend's own chunks 158; bench_ann/results/
# v47_torch_bytes)
TORCH_BYTES = 2 << 30


class ChunkPlan(NamedTuple):
    """rows: rows per chunk; copy_rows: the fused E-step writes the 16-bit operand copy (Triton only);
    order_bytes: bound of the sparse E-step's row orders (Triton only); kmeans_rows: rows per k-means step (each
    chunk is cut into pieces of at most this many rows; None: whole chunks); torch_bytes: bound of one piece of the
    Triton backend's torch paths, which run after a chunk's kernels (``TritonBackend.torch_bytes``)."""

    rows: int
    copy_rows: bool = True
    order_bytes: int = ROW_ORDER_BYTES
    kmeans_rows: int | None = None
    torch_bytes: int = TORCH_BYTES


def default_chunk_rows(backend: str, device: torch.device, n_components: int, d: int, diag: bool = False,
                       resident: bool = False, free_bytes: int | None = None) -> int:
    """Rows per chunk without a memory budget.

    Triton backend: 512 MiB (at most 1/8 of ``free_bytes``, the device's free memory, when given) of O(chunk * D)
    buffers, namely the kernels' 16-bit operand copy (2 D bytes per row, 6 D for diag) plus the float32 upload of
    the chunk (4 D) unless X is already a float32 tensor on the device (``resident``). Every chunk costs a preparation,
    a reduction and a float64 accumulation: at 128 MiB a diag fit at N=1e6 ran 6 chunks per iteration and took
    4.3 ms per EM iteration against 3.3 ms for the same iteration in one chunk (H200). Torch backend: 2^27 (GPU) or
    2^24 (CPU) entries of one (chunk, K) matrix."""
    if backend == "triton":
        per_row = (6 if diag else 2) * d + (0 if resident else 4 * d)
        return max(1024, _triton_chunk_budget(free_bytes) // per_row)
    budget = 2 ** 27 if device.type == "cuda" else 2 ** 24  # elements of one (chunk, K) matrix
    return max(256, budget // max(n_components, 1))


def _triton_chunk_budget(free_bytes: int | None) -> int:
    """The Triton backend's default per-chunk buffers (bytes): 512 MiB, at most 1/8 of the free device memory
    when known, never below 64 MiB."""
    return TRITON_CHUNK_BYTES if free_bytes is None else max(2 ** 26, min(TRITON_CHUNK_BYTES, free_bytes // 8))


def _torch_budget(free_bytes: int | None) -> int:
    """The default bound of one piece of the Triton backend's torch paths: TORCH_BYTES, at most 1/4 of the free
    device memory when known, never below 64 MiB."""
    return TORCH_BYTES if free_bytes is None else max(2 ** 26, min(TORCH_BYTES, free_bytes // 4))


def default_transient_plan(d: int, resident: bool = False, free_bytes: int | None = None) -> ChunkPlan:
    """The Triton backend's default plan for a fit that keeps no row orders (each E-step sorts its chunk, see
    ``plan_chunks``'s ``kept_orders``): no operand copy, chunks whose E-step buffers (``ESTEP_ROW_BYTES`` and
    the sort's ``SORT_ROW_BYTES`` per row, plus the float32 upload unless X is resident) fill the default chunk
    budget, and k-means pieces within it. Resident D=128 data: 9.6M-row chunks (one chunk at N=1e6, where the
    operand copy's 6 D bytes per row of a diag fit gave 699,050)."""
    budget = _triton_chunk_budget(free_bytes)
    rows = max(MIN_CHUNK_ROWS, budget // (ESTEP_ROW_BYTES + SORT_ROW_BYTES + (0 if resident else 4 * d)))
    kmeans_rows = budget // KMEANS_ROW_BYTES
    return ChunkPlan(rows, False, 0, None if kmeans_rows >= rows else max(MIN_CHUNK_ROWS, kmeans_rows),
                     _torch_budget(free_bytes))


def partial_bytes(backend: str, diag: bool) -> int:
    """Bound of the fused E-step's per-slab partial sums (bytes): allocated by each E-step for its pass 2 and the
    reduction only (not during pass 1, the transient order's sort or a k-means step)."""
    return PARTIAL_BYTES * (2 if diag else 1) if backend == "triton" else 0


def fixed_bytes(backend: str, n_components: int, d: int, diag: bool) -> int:
    """Estimated O(K D) device memory of a fit (bytes): what a budget must hold before any chunk (the parameters,
    statistics and M-step temporaries, and the E-step's partial sums)."""
    return KD_BYTES * n_components * d + partial_bytes(backend, diag)


def _row_bytes(backend: str, n_components: int, d: int, resident: bool) -> int:
    """Bytes per row of a chunk in an EM iteration, without the Triton backend's operand copy."""
    upload = 0 if resident else 4 * d
    if backend == "triton":
        return ESTEP_ROW_BYTES + upload
    # torch backend: the centred copy of the chunk and ~4 (chunk, K) float32 matrices (logits, responsibilities
    # and the reductions' temporaries)
    return upload + 4 * d + 16 * n_components


def plan_chunks(backend: str, device: torch.device, n: int, n_components: int, d: int, diag: bool = False,
                resident: bool = False, free_bytes: int | None = None,
                working_memory: float | None = None, sort_rows: bool = True, kept_orders: bool = True) -> ChunkPlan:
    """The chunking of an (n, d) data set for a fit with ``n_components`` components.

    ``working_memory`` (MiB): bound of the device memory beyond X (see the module docstring); None: the defaults.
    ``sort_rows``: the Triton backend's E-steps sort chunks that keep no row order; the chunks are sized for the
    sort (``SORT_ROW_BYTES`` per row) and, separately, for pass 2 beside the partial sums (``PASS2_ROW_BYTES``) when
    the budget leaves no kept orders (False: the dense E-step, chunks beside the partial sums).
    ``kept_orders`` False (with ``sort_rows``): the fit keeps no row orders and no operand copy even when the
    memory allows them (``TritonBackend.kept_orders``; diag fits); its chunks are sized for the transient orders.
    Raises ValueError when the budget cannot hold the O(K D) part and one chunk of ``MIN_CHUNK_ROWS`` rows."""
    transient_only = backend == "triton" and sort_rows and not kept_orders
    if working_memory is None:
        if transient_only:
            return default_transient_plan(d, resident, free_bytes)
        return ChunkPlan(default_chunk_rows(backend, device, n_components, d, diag, resident, free_bytes),
                         torch_bytes=_torch_budget(free_bytes))
    budget = int(float(working_memory) * MIB)
    fixed = fixed_bytes(backend, n_components, d, diag)
    per_row = _row_bytes(backend, n_components, d, resident)
    upload = 0 if resident else 4 * d
    # Triton: the uploaded chunk (if any) stays while the k-means step runs on its pieces; it gets at most half
    share = 2 if backend == "triton" and upload else 1
    need = fixed + MIN_CHUNK_ROWS * (share * per_row + (KMEANS_ROW_BYTES if backend == "triton" else 0))
    if budget < need:
        raise ValueError(f"working_memory={working_memory} MiB cannot hold the fit's O(K D) buffers "
                         f"(~{fixed / MIB:.0f} MiB for K={n_components}, D={d}, {'diag' if diag else 'spherical'}) "
                         f"and a chunk of {MIN_CHUNK_ROWS} rows: give at least {-(-need // MIB)} MiB, or None for "
                         "the defaults.")
    free = budget - fixed
    if backend != "triton":
        return ChunkPlan(int(min(n, free // per_row)), True, 0)
    copy_row = (6 if diag else 2) * d
    with_copy = (free // share) // (per_row + copy_row)
    copy = bool(with_copy >= min(n, MIN_COPY_ROWS)) and not transient_only
    rows = int(max(MIN_CHUNK_ROWS, min(n, with_copy if copy else (free // share) // per_row)))
    left = free - rows * (per_row + (copy_row if copy else 0))
    # row orders: 8 bytes per ordered row, and their per-chunk buffers, when at least one chunk can have one
    order_bytes = left - rows * ORDER_ROW_BYTES
    if order_bytes < 8 * rows or transient_only:
        order_bytes = 0
    partials = partial_bytes(backend, diag)
    if order_bytes == 0 and sort_rows:
        # no kept orders: each E-step sorts its chunk (transient order, no operand copy) in two phases, each sized
        # on its own: pass 1 and the sort (no partial sums yet), then pass 2 beside the partial sums (at N=1e8,
        # K=1024, D=128 in 64 MiB: diag chunks of ~560k rows instead of 2^18 when both phases were summed)
        rows = int(max(MIN_CHUNK_ROWS, min(n, ((free + partials) // share) // (per_row + SORT_ROW_BYTES),
                                           (free // share) // (per_row + PASS2_ROW_BYTES))))
    # the k-means step allocates no partial sums
    kmeans_rows = int(max(MIN_CHUNK_ROWS, min(rows, (free + partials - rows * upload) // KMEANS_ROW_BYTES)))
    # the torch paths run after the chunk's kernels: beside the chunk's per-row outputs (and upload) and the kept
    # orders, in what the E-step's transient buffers (the operand copy among them) and partial sums leave (at
    # least the partials' room)
    torch_bytes = free + partials - order_bytes - rows * per_row
    return ChunkPlan(rows, copy, int(order_bytes), kmeans_rows, int(torch_bytes))
