"""Frames from PyAV worker processes through shared memory instead of the pool's pipe.

A process pool returns a result by pickling it into a pipe: the frames are copied into the pickle, through
the kernel twice, and out of the pickle again. Here the worker writes every large array of its result into
a shared-memory slot that the training process owns, and only the small rest (shapes, tags, counts)
travels pickled; the training process copies the arrays out as soon as the result arrives and frees the
slot. docs/data.md ("Where colour conversion happens") has the measured difference.

Safety: slots are created (and their pages reserved with ``posix_fallocate``) by the training process, so
its resource tracker unlinks them whatever way it ends, kill -9 included, and a full ``/dev/shm`` (64 MB in
a default Docker container) shows up as an error at creation instead of a SIGBUS in a worker. Whenever no
slot can be had, or the result does not fit its slot, the result travels pickled as before: the hand-off
never loses or changes a frame.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import weakref
from concurrent.futures import Executor, Future
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

_MIN_ARRAY = 1 << 14          # smaller arrays ride in the pickle: a slot offset would cost more than it saves
_ALIGN = 64


class _NoRoom(Exception):
    """The result does not fit the slot (carries the bytes it needs)."""


class _SlotPickler(pickle.Pickler):
    """Pickles a result with its large C-contiguous arrays written into ``buf`` (persistent ids)."""

    def __init__(self, file: io.BytesIO, buf: memoryview | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.buf, self.used, self.need = buf, 0, 0

    def persistent_id(self, obj: Any):
        if type(obj) is not np.ndarray or obj.nbytes < _MIN_ARRAY or obj.dtype.hasobject:
            return None
        off = -(-self.used // _ALIGN) * _ALIGN
        self.used = self.need = off + obj.nbytes
        if self.buf is None or self.used > len(self.buf):
            raise _NoRoom(self.need)
        np.ndarray(obj.shape, obj.dtype, self.buf, offset=off)[...] = obj
        return off, obj.shape, obj.dtype.str


class _SlotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buf: memoryview) -> None:
        super().__init__(file)
        self.buf = buf

    def persistent_load(self, pid):
        off, shape, dtype = pid
        return np.ndarray(shape, np.dtype(dtype), self.buf, offset=off).copy()


_attached: dict[str, shared_memory.SharedMemory] = {}     # per worker process: slots opened so far


def _open_slot(name: str) -> shared_memory.SharedMemory:
    shm = _attached.get(name)
    if shm is None:
        while len(_attached) >= 256:          # slots replaced by larger ones: forget the oldest
            _attached.pop(next(iter(_attached))).close()
        shm = _attached[name] = shared_memory.SharedMemory(name=name)
    return shm


def run_into_slot(slot: str | None, fn: Callable, *args, **kwargs) -> tuple[str, Any, int]:
    """Worker side: ``fn(*args, **kwargs)`` with its large arrays written into the slot named ``slot``.

    Returns:
        ("slot", pickled rest, bytes used) or, without a slot or when the arrays do not fit,
        ("inline", the result itself, bytes a slot would need).
    """
    result = fn(*args, **kwargs)
    f = io.BytesIO()
    try:
        p = _SlotPickler(f, _open_slot(slot).buf if slot else None)
        p.dump(result)
    except _NoRoom as e:
        return "inline", result, e.args[0]
    return "slot", f.getvalue(), p.used


class Slots:
    """Shared-memory slots owned by this process, lent to one worker task at a time.

    Args:
        cap: most slots alive at once (tasks in flight beyond it travel pickled).
    """

    def __init__(self, cap: int) -> None:
        self.cap, self.size = max(1, cap), 0       # size: bytes a new slot gets (grows with what results need)
        self._free: list[shared_memory.SharedMemory] = []
        self._all: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()
        self.disabled = ""                         # why slots are not used (e.g. /dev/shm full), else ""
        self.counts = {"slot": 0, "inline": 0}
        # an owner that is never closed (an abandoned loader) still frees the memory when collected
        weakref.finalize(self, _unlink_all, self._all)

    def take(self) -> shared_memory.SharedMemory | None:
        with self._lock:
            if self.disabled or self.size == 0:
                return None
            if self._free:
                return self._free.pop()
            if len(self._all) >= self.cap:
                return None
            try:
                shm = shared_memory.SharedMemory(create=True, size=self.size)
            except OSError as e:
                return self._disable(f"cannot create a {self.size} B segment ({e.strerror or e})")
            try:                                   # reserve the pages now: a full /dev/shm errs here, not as SIGBUS
                os.posix_fallocate(shm._fd, 0, self.size)
            except OSError as e:
                shm.close()
                shm.unlink()
                return self._disable(f"/dev/shm has no room for {self.size} B ({e.strerror or e})")
            self._all[shm.name] = shm
            return shm

    def _disable(self, why: str) -> None:
        self.disabled = why
        log.warning("PyAV frames travel pickled: %s", why)
        return None

    def give(self, shm: shared_memory.SharedMemory) -> None:
        with self._lock:
            if shm.size >= self.size and shm.name in self._all:
                self._free.append(shm)
            else:                                  # too small for today's samples: replaced on demand
                self._drop(shm)

    def need(self, nbytes: int) -> None:
        """A result needed ``nbytes``: new slots get that and a quarter more (rounded to 1 MiB)."""
        with self._lock:
            if nbytes > self.size:
                self.size = ((nbytes * 5 // 4) | 0xFFFFF) + 1
                for shm in [s for s in self._free if s.size < self.size]:
                    self._free.remove(shm)
                    self._drop(shm)

    def _drop(self, shm: shared_memory.SharedMemory) -> None:
        self._all.pop(shm.name, None)
        shm.close()
        shm.unlink()

    def close(self) -> None:
        """Unlink every slot (call after the workers are gone)."""
        with self._lock:
            for shm in list(self._all.values()):
                self._drop(shm)
            self._free = []


def _unlink_all(segments: dict[str, shared_memory.SharedMemory]) -> None:
    for shm in list(segments.values()):
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
    segments.clear()


def submit(pool: Executor, slots: Slots, fn: Callable, *args, **kwargs) -> Future:
    """``pool.submit(fn, *args, **kwargs)`` with the result's arrays handed over in a slot of ``slots``.

    The returned future holds ``fn``'s result, its arrays already copied out of the slot (which is free
    again the moment the worker's answer arrives, whether or not anyone reads the future). Cancelling it
    cancels the task if it has not started.
    """
    shm = slots.take()
    inner = pool.submit(run_into_slot, shm.name if shm is not None else None, fn, *args, **kwargs)
    outer: Future = Future()

    def arrived(f: Future) -> None:
        try:
            if f.cancelled():
                raise _Cancelled
            kind, payload, nbytes = f.result()
            if kind == "slot":
                value = _SlotUnpickler(io.BytesIO(payload), shm.buf).load()
            else:
                value = payload
                slots.need(nbytes)
            slots.counts[kind] += 1
        except _Cancelled:
            outer.cancel()
            return
        except BaseException as e:            # noqa: BLE001 - handed to the reader, e.g. BrokenProcessPool
            _settle(outer, exc=e)
            return
        finally:
            if shm is not None:
                slots.give(shm)
        _settle(outer, value=value)

    outer.add_done_callback(lambda o: inner.cancel() if o.cancelled() else None)
    inner.add_done_callback(arrived)
    return outer


class _Cancelled(Exception):
    pass


def _settle(fut: Future, value: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``fut`` unless it was cancelled meanwhile (then the answer is dropped)."""
    if not fut.set_running_or_notify_cancel():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
