"""Replay of repeated GPU work as CUDA graphs (the EM iterations of a fit on resident data).

At N = 1e6 one EM iteration of the Triton backend is ~60-180 kernel launches whose GPU time (~1.4-1.6 ms on
an H200) is below the host's time to issue them from Python (2-3 ms), so the fit is bound by the host. A CUDA
graph records the launches once and replays them with one call. :class:`GraphReplay` does that for a function
of a few input tensors whose Python path is fixed by a caller-supplied key (the Triton backend's
:meth:`~flashgmm_faiss._triton_backend.TritonBackend.graph_key`): the first call with a key runs the function
(it also compiles and autotunes the kernels: nothing may autotune during a capture), the second captures it and
every later call copies its inputs into the graph's input buffers and replays.

Contract of the wrapped function: it reads its inputs and tensors that keep their storage between calls (the
data, the row orders, which the backend updates in place), never synchronises with the host, and returns a
tuple of tensors (or of tuples of tensors). After a replay the returned tensors are the graph's output buffers:
valid until the next call of the same :class:`GraphReplay` (consume or copy them first). Python-side counters
the function updates can be named in ``counters``: a replay adds what the captured call added.
"""
from __future__ import annotations

import torch


class GraphReplay:
    """Run ``fn(*inputs)`` eagerly, capture it, then replay it, per key.

    Parameters
    ----------
    fn : callable(*tensors) -> tuple
    counters : dict of int, optional
        Counters ``fn`` increments in Python; replays add the increments of the captured call.

    Attributes
    ----------
    replays : int
        Calls answered by a replay.
    captures : int
        Graphs captured.
    """

    def __init__(self, fn, counters: dict | None = None):
        self.fn = fn
        self.counters = counters
        self._seen = set()
        self._graphs = {}     # key -> (graph, static inputs, static outputs, counter increments)
        self._pool = None     # one memory pool for all keys: their replays never overlap
        self.replays = 0
        self.captures = 0

    def __call__(self, key, *inputs):
        if key is None:
            return self.fn(*inputs)
        if key not in self._seen:                 # first time: run (compiles, autotunes, allocates)
            self._seen.add(key)
            return self.fn(*inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_in, static_out, inc = self._graphs[key]
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        if self.counters is not None:
            for name, v in inc.items():
                self.counters[name] += v
        self.replays += 1
        return static_out

    def first_call(self, key) -> bool:
        """Whether a call with ``key`` would be its first (an eager run); see :meth:`forget_first_call`."""
        return key is not None and key not in self._seen

    def forget_first_call(self, key):
        """Undo the bookkeeping of a first call with ``key`` whose results were discarded, so that the next call
        with it runs eagerly again, as it would have without the discarded one."""
        self._seen.discard(key)

    def _capture(self, inputs):
        static_in = tuple(t.detach().clone() for t in inputs)
        before = dict(self.counters) if self.counters is not None else {}
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.fn(*static_in)
        if self._pool is None:
            self._pool = graph.pool()
        inc = {name: self.counters[name] - v for name, v in before.items()} if self.counters is not None else {}
        if self.counters is not None:       # capturing executed nothing: undo the captured call's increments
            self.counters.update(before)
        self.captures += 1
        return graph, static_in, tuple(static_out), inc

    def reset(self):
        """Drop the graphs (frees their memory pool once no output is referenced)."""
        self._seen.clear()
        self._graphs.clear()
        self._pool = None
