"""Fused Triton kernels of flashgmm-faiss (installed as ``flashgmm_faiss.kernels``).

One module per kernel family, each with its ``@triton.jit`` kernels, a thin launcher and a design docstring:

* :mod:`.estep`  -- two-pass E-step (logZ, then Nk / Sx / Sq per component block x row slab);
* :mod:`.kmeans` -- k-means step (online argmin assignment, sort-based contention-free update);
* :mod:`.mstep` -- the EM M-step (float64) in one kernel;
* :mod:`.assign` -- scoring (logZ + argmax) and multi-assignment (per-row components above tau: a top-M kernel
  for small copy caps, a threshold kernel for any cap);
* :mod:`.column_stats` -- per-feature sum, minimum and maximum of a chunk (the data centre and range);
* :mod:`.seeding` -- the k-means++ step: distance update (min of the squared distances to a new seed), seed draw.

Set ``TRITON_INTERPRET=1`` *before* importing this package to run the kernels on CPU tensors.
"""
from .assign import assign, score, threshold_assign, topk_responsibilities
from .column_stats import column_stats
from .estep import FLAG_K, PRECISIONS, RowOrder, absmax, component_order, estep, prepare, row_order
from . import mstep
from .kmeans import assign_labels, kmeans_step
from .seeding import draw_seed_, min_sq_dist_, pruned_min_sq_dist_, seed_gaps_

__all__ = ["FLAG_K", "PRECISIONS", "RowOrder", "absmax", "assign", "assign_labels",
           "column_stats", "component_order", "draw_seed_", "estep", "kmeans_step", "min_sq_dist_", "mstep", "prepare",
           "pruned_min_sq_dist_", "row_order", "score", "seed_gaps_", "threshold_assign", "topk_responsibilities"]
