"""Batches with their flow, optionally computed one batch ahead on a side CUDA stream.

``train.flow_ahead: false`` (the plain loop): each step takes a batch and computes its flow.
``train.flow_ahead: true``: when a step's batch is handed out, the next batch is taken from the loader
too and its flow is launched on a side CUDA stream, so RAFT for batch N+1 can run on the GPU while
batch N's augmentation, forward and backward run on the main stream. Synchronisation:

* the side stream first waits for the main stream (the batch's frames were written there);
* the batch's tensors are ``record_stream``-ed on the side stream, the flows (allocated on the side
  stream) on the main stream when handed out, so the caching allocator reuses neither block while
  the other stream may still read it;
* the main stream waits for an event recorded after the flow before the step uses it.

On CPU there are no streams: the next batch's flow is computed at once, in the same order, so the
results equal the plain loop's exactly (flow estimation uses no random numbers). The loader is one
batch further on than the step; :meth:`FlowFeed.loader_state` returns its state as of the batch the
step trains on, which is what a checkpoint must record.
"""

from __future__ import annotations

import copy
import time
from typing import Iterator

import torch

from mscl_stream.data.batch import ClipBatch


class FlowFeed:
    """``feed.start(loader)`` per epoch, then ``feed.next(look_ahead)`` per step.

    Args:
        estimator: the flow estimator (``compute_flow``'s).
        loader: the batch loader (``iter``, ``state_dict``).
        device: the training device.
        ahead: compute the next batch's flow ahead (on a side stream on CUDA).
        flow_fn: ``flow_fn(batch, estimator) -> (batch, flow_a, flow_b)``; default
            :func:`mscl_stream.train.inputs.compute_flow` (benchmarks pass their own).
    """

    def __init__(self, estimator, loader, device: torch.device, ahead: bool = False, flow_fn=None) -> None:
        self.estimator, self.loader, self.ahead = estimator, loader, ahead
        if flow_fn is None:
            from mscl_stream.train.inputs import compute_flow as flow_fn
        self.flow_fn = flow_fn
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if ahead and self.device.type == "cuda" else None
        self._it: Iterator | None = None
        self._pending = None           # (batch, flow_a, flow_b, event) of the next step, or None
        self._state = None             # loader state as of the batch last handed out
        self._ahead_wait = 0.0         # seconds spent waiting for the loader inside flow() (look-ahead)

    def start(self, loader_iter: Iterator) -> None:
        """Begin an epoch with ``iter(loader)``."""
        self._it, self._pending = loader_iter, None

    def next_batch(self) -> ClipBatch | None:
        """The step's batch (None at the end of the epoch); its flow comes from :meth:`flow`."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            self._state = item[-1]
            return _Ahead(*item[:-1])
        batch = next(self._it, None)
        if self.ahead:
            self._state = _snapshot(self.loader)
        return batch

    def flow(self, batch, look_ahead: bool = True) -> tuple[ClipBatch, torch.Tensor, torch.Tensor]:
        """(batch, flow_a, flow_b) of the step; with ``ahead`` and ``look_ahead``, launch the next
        batch's flow before returning (``look_ahead=False`` on the last step: no batch is taken)."""
        if isinstance(batch, _Ahead):
            out = batch.collect()
        else:
            out = self.flow_fn(batch, self.estimator)
        if self.ahead and look_ahead:
            self._launch_next()
        return out

    def take_ahead_wait(self) -> float:
        """Seconds the last :meth:`flow` call waited for the loader (taking the next batch), then 0:
        with ``ahead`` that wait happens there instead of in :meth:`next_batch`."""
        wait, self._ahead_wait = self._ahead_wait, 0.0
        return wait

    def loader_state(self) -> dict:
        """The loader's state as of the batch the current step trains on (for checkpoints)."""
        return self._state if (self.ahead and self._state is not None) else self.loader.state_dict()

    def _launch_next(self) -> None:
        t0 = time.perf_counter()
        nxt = next(self._it, None)
        self._ahead_wait += time.perf_counter() - t0
        state = _snapshot(self.loader)
        if nxt is None:
            self._pending = None
            return
        if self.stream is None:
            self._pending = (*self.flow_fn(nxt, self.estimator), None, state)
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for t in nxt.tensors().values():
                if t.device.type == "cuda":
                    t.record_stream(self.stream)
            batch, flow_a, flow_b = self.flow_fn(nxt, self.estimator)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending = (batch, flow_a, flow_b, event, state)


class _Ahead:
    """A batch whose flow was launched ahead; ``collect`` makes the main stream wait for it."""

    def __init__(self, batch: ClipBatch, flow_a: torch.Tensor, flow_b: torch.Tensor, event) -> None:
        self.batch, self.flow_a, self.flow_b, self.event = batch, flow_a, flow_b, event

    def collect(self) -> tuple[ClipBatch, torch.Tensor, torch.Tensor]:
        if self.event is not None:
            main = torch.cuda.current_stream(self.flow_a.device)
            main.wait_event(self.event)
            for t in (self.flow_a, self.flow_b, *self.batch.tensors().values()):
                if t.device.type == "cuda":
                    t.record_stream(main)
        return self.batch, self.flow_a, self.flow_b


def _snapshot(loader) -> dict:
    return copy.deepcopy(loader.state_dict())
