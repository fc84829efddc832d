"""Counting what a piece of the training step dispatches: aten ops, host reads, host-device copies.

A CPU proxy for launch overhead and host syncs on a GPU (the op-count and sync targets in
benchmarks/README.md, "Step input path: ops and syncs"): every aten op that reaches the dispatcher is
one kernel launch (or more) on CUDA, and every read of device data on the host, or copy from pageable
host memory, stalls the host until the GPU catches up.

:class:`OpCounter` is a ``TorchDispatchMode`` that also classifies tensors as *host* or *device* as
they flow through the ops, so the same run on CPU tells what would be a sync on CUDA:

* host tensors: made while counting by ``torch.tensor`` / ``torch.from_numpy`` (``lift_fresh``), by a
  factory op that draws from a ``generator`` (host RNG) or pins memory, or by an op whose tensor inputs
  are all host;
* device tensors: everything else (the step's inputs, the model, cached constants, ``empty(device=)``).

Counted per call:

* ``ops``: aten ops (views included), by name in ``by_op``;
* ``host_reads``: ops that hand device data to the host (``.item()``, ``bool(t)``, ``nonzero``,
  ``masked_select``, ``unique``, ``equal``, tensor-valued ``repeat_interleave``) or Python-side reads
  (``.tolist()``, ``.numpy()``, ``.cpu()``) of a device tensor;
* ``blocking_copies``: an op that mixes a device tensor with a host tensor of dim > 0 (on CUDA an
  implicit copy or an error: a sync either way), a ``copy_`` from host to device without
  ``non_blocking=True``, or ``host.to(device)`` without it (on CPU a no-op, on CUDA a copy; its result
  counts as a device tensor from then on);
* ``async_uploads``: ``copy_(device, host, non_blocking=True)`` (the one allowed upload: on CUDA from
  pinned memory, no sync);
* ``triton_launches``: Triton kernel launches (under ``TRITON_INTERPRET=1`` the interpreter's own
  tensor copies are not counted: on CUDA they do not exist).

Limits: a Python-side read is only seen through the methods above; the CUDA test under
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth on a GPU.
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select",
          "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal", "allclose"}


@dataclass
class Counts:
    """What one counted region dispatched (see the module doc for the categories)."""

    ops: int = 0
    host_reads: int = 0
    blocking_copies: int = 0
    async_uploads: int = 0
    triton_launches: int = 0
    by_op: Counter = field(default_factory=Counter)
    read_ops: Counter = field(default_factory=Counter)
    copy_ops: Counter = field(default_factory=Counter)
    where: Counter = field(default_factory=Counter)     # "file:line in function" of each read / copy

    def as_dict(self, top: int = 25) -> dict[str, Any]:
        return {"ops": self.ops, "host_reads": self.host_reads, "blocking_copies": self.blocking_copies,
                "async_uploads": self.async_uploads, "triton_launches": self.triton_launches,
                "top_ops": dict(self.by_op.most_common(top)), "read_ops": dict(self.read_ops),
                "copy_ops": dict(self.copy_ops), "where": dict(self.where)}


class OpCounter(TorchDispatchMode):
    """Counts aten ops and would-be syncs; ``with counter.region() as c:`` gives one :class:`Counts`.

    The mode stays active between regions (enter it once around warm-up and measured calls) so that
    tensors made during warm-up (caches) are classified too.
    """

    def __init__(self) -> None:
        super().__init__()
        self._root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
        self._host: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._paused = 0
        self.current: Counts | None = None
        self._patches: list[tuple[Any, str, Any]] = []

    def _where(self) -> None:
        # the innermost frame in this package's own code (not torch, kornia or this module)
        import traceback
        for fr in reversed(traceback.extract_stack()[:-2]):
            if fr.filename.startswith(self._root) and not fr.filename.endswith("opcount.py"):
                self.current.where[f"{fr.filename[len(self._root) + 1:]}:{fr.lineno} in {fr.name}"] += 1
                return

    # ---------------------------------------------------------------- classification
    def is_host(self, t: torch.Tensor) -> bool:
        return self._host.get(id(t)) is t

    def _mark_host(self, out: Any) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [self.is_host(t) for t in tensors]
        c = self.current
        if c is not None:
            c.ops += 1
            c.by_op[name] += 1
            dev_in = [t for t, h in zip(tensors, host) if not h]
            if name in _READS or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                  and len(args) > 1 and isinstance(args[1], torch.Tensor)
                                  and kwargs.get("output_size") is None):
                if dev_in:
                    c.host_reads += 1
                    c.read_ops[name] += 1
                    self._where()
            elif name == "copy_" and len(tensors) >= 2 and not host[0] and host[1]:
                nb = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
                if nb:
                    c.async_uploads += 1
                else:
                    c.blocking_copies += 1
                    c.copy_ops[name] += 1
                    self._where()
            # (0-dim "device" tensors here are mostly Python numbers wrapped by C++, never seen by this mode)
            elif any(t.dim() > 0 for t in dev_in) and any(h and t.dim() > 0 for t, h in zip(tensors, host)):
                c.blocking_copies += 1
                c.copy_ops[name] += 1
                self._where()
        if name == "lift_fresh" or (tensors and all(host)) or \
                (not tensors and (kwargs.get("generator") is not None or kwargs.get("pin_memory"))):
            if name != "copy_":      # copy_ returns its (device) destination
                self._mark_host(out)
        return out

    # ---------------------------------------------------------------- Python-side reads, Triton
    def _python_read(self, t: torch.Tensor) -> None:
        if self.current is not None and not self._paused and not self.is_host(t):
            self.current.host_reads += 1
            self.current.read_ops["python_read"] += 1
            self._where()

    def __enter__(self):
        counter = self
        for meth in ("tolist", "numpy", "cpu"):
            orig = getattr(torch.Tensor, meth)

            def wrapped(t, *a, _orig=orig, **k):
                counter._python_read(t)
                return _orig(t, *a, **k)
            self._patches.append((torch.Tensor, meth, orig))
            setattr(torch.Tensor, meth, wrapped)
        orig_to = torch.Tensor.to

        def to(t, *a, _orig=orig_to, **k):
            # an explicit move to a device: on CUDA a host-to-device copy even where the CPU makes it a no-op
            dev, _, non_blocking, _ = torch._C._nn._parse_to(*a, **k)
            host = counter.is_host(t)
            out = _orig(t, *a, **k)
            if dev is not None and host and not counter._paused:
                if counter.current is not None:
                    if non_blocking:
                        counter.current.async_uploads += 1
                    else:
                        counter.current.blocking_copies += 1
                        counter.current.copy_ops["to(device)"] += 1
                        counter._where()
                counter._host.pop(id(out), None)
            return out
        self._patches.append((torch.Tensor, "to", orig_to))
        torch.Tensor.to = to
        try:
            from triton.runtime.interpreter import GridExecutor
        except ImportError:
            GridExecutor = None
        if GridExecutor is not None:
            orig_call = GridExecutor.__call__

            def launch(ex, *a, _orig=orig_call, **k):
                if counter.current is not None:
                    counter.current.triton_launches += 1
                counter._paused += 1
                try:
                    return _orig(ex, *a, **k)
                finally:
                    counter._paused -= 1
            self._patches.append((GridExecutor, "__call__", orig_call))
            GridExecutor.__call__ = launch
            from triton.runtime.jit import JITFunction
            orig_run = JITFunction.run

            def run(fn, *a, _orig=orig_run, **k):      # compiled launches (CUDA)
                if counter.current is not None and not k.get("warmup", False):
                    counter.current.triton_launches += 1
                return _orig(fn, *a, **k)
            self._patches.append((JITFunction, "run", orig_run))
            JITFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, meth, orig in reversed(self._patches):
            setattr(owner, meth, orig)
        self._patches.clear()
        return super().__exit__(*exc)

    @contextmanager
    def region(self) -> Iterator[Counts]:
        prev, self.current = self.current, Counts()
        try:
            yield self.current
        finally:
            self.current = prev
