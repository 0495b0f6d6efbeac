"""Lookahead: issue the next iteration of a fit before the host has read the last one's summary.

Each k-means or EM iteration ends with a host decision (convergence, a non-finite log-likelihood, components to
re-seed) that needs a few numbers from the device. Reading them with ``tensor.tolist()`` waits for the GPU, and
the GPU then waits for the host to issue the next iteration: at N = 1e6, K = 1024 (an iteration of ~1.4 ms on an
H100) that idle gap is ~0.1-0.2 ms per iteration. With lookahead the fit launches iteration t + 1 from iteration
t's outputs first and reads t's summary while t + 1 runs; when the summary says stop (or re-seed), iteration
t + 1 is discarded. The parameters, history and decisions are therefore those of the fit without lookahead; the
cost is one discarded iteration of device time when the fit stops (``GaussianMixture`` only looks ahead while an
iteration takes less than ``MAX_SECONDS``, so that the discarded work stays small). Because that decision
depends on timing, a discarded iteration must leave nothing behind that a later one reads: the estimator restores
the Triton backend's row-order schedule and counters after a discard, and never issues ahead an iteration that
rebuilds the row orders (every ``ORDER_REFRESH``-th; the orders are rebuilt in place and would change the
summation order of the later E-steps). Fits are therefore bit for bit those without lookahead.

:class:`Launched` holds one issued iteration: its outputs (copied out of CUDA-graph output buffers, which the
next replay overwrites) and its summary on its way to pinned host memory.
"""
from __future__ import annotations

import torch

MAX_SECONDS = 0.02   # look ahead only while the last iteration took less: at most this much discarded per fit


def _owned(t):
    if isinstance(t, torch.Tensor):
        return t.clone()
    if isinstance(t, tuple):
        return tuple(_owned(u) for u in t)
    return t


class Launched:
    """One issued iteration: ``outputs`` (the step's tuple of tensors, nested tuples allowed) and its summary.

    Parameters
    ----------
    outputs : tuple
        What the step returned; ``outputs[summary_index]`` is a small float tensor (e.g. (2,) float64).
    summary_index : int
    own : bool
        Copy the outputs (they are a CUDA graph's output buffers, valid only until its next replay).
    """

    def __init__(self, outputs, summary_index: int, own: bool):
        self.outputs = _owned(tuple(outputs)) if own else tuple(outputs)
        self.undo = None      # what the issuer needs to forget this iteration (GaussianMixture._launchers)
        summary = self.outputs[summary_index]
        self._event = None
        if summary.is_cuda:   # an asynchronous copy to pinned memory, and an event to wait for it
            self._host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            self._host.copy_(summary, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = summary

    def summary(self) -> list:
        """The summary as Python numbers (waits for this iteration only, not for one issued after it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
