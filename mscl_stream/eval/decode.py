"""Evaluation decodes: the clips of each video in one PyAV sweep, in the pretraining loader's PyAV worker
processes (:func:`mscl_stream.data.decode_jobs.pyav_process_pool`), handed back in record order.

A video is decoded by :func:`mscl_stream.data.pyav_decode.decode_group_counted`: every frame its clips
need once, unreferenced frames skipped, one FFmpeg thread (the pool decodes several videos at once). A
video that fails to decode is logged with its path and reason, recorded in ``failed`` and handed back as
None, so the caller counts it; nothing is dropped silently. A worker that dies (a crash inside FFmpeg)
is replaced and its videos decoded again; a video that kills a fresh worker too counts as failed.

``data.pyav_workers: threads`` decodes in threads of this process instead; ``auto`` and ``processes``
use worker processes (evaluation has no training step to share the GIL with, but the decode's own
Python and the batch assembly do).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from mscl_stream.data.decode_jobs import pyav_process_pool
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.pyav_decode import decode_group_counted
from mscl_stream.progress import Progress

log = logging.getLogger(__name__)

# Clip index lists of one video: (clips, T) raw frame numbers.
IndexFn = Callable[[VideoRecord], list[list[int]]]
# (H, W) decode size of one video (resize to cover, centre crop: data.pyav_decode.decode_frames).
SizeFn = Callable[[VideoRecord], tuple[int, int]]


class _Pool:
    """Worker processes (or threads) that decode whole videos; a broken process pool is replaced.

    Process pools are kept for the life of the process (:func:`close_pools` ends them): each worker
    imports the main module once when it starts (seconds), and fine-tuning validates every epoch."""

    _kept: dict[tuple[int, bool], "_Pool"] = {}

    def __init__(self, workers: int, processes: bool) -> None:
        self.workers, self.processes = max(1, workers), processes
        self._ex: Executor | None = None

    @classmethod
    def get(cls, workers: int, processes: bool) -> "_Pool":
        if not processes:
            return cls(workers, False)
        return cls._kept.setdefault((max(1, workers), True), cls(workers, True))

    def executor(self) -> Executor:
        if self._ex is None:
            self._ex = (pyav_process_pool(self.workers) if self.processes
                        else ThreadPoolExecutor(self.workers, thread_name_prefix="eval-decode"))
        return self._ex

    def submit(self, path: str, clips: list[list[int]], size: tuple[int, int]) -> Future:
        args = (path, [np.asarray(c, np.int64) for c in clips], tuple(size))
        try:
            return self.executor().submit(decode_group_counted, *args, threads=1)
        except BrokenProcessPool:
            self.restart()
            return self.executor().submit(decode_group_counted, *args, threads=1)

    def restart(self) -> None:
        log.warning("an evaluation decode worker died; starting a new pool")
        self.close(wait=False)

    def release(self) -> None:
        """End of one pass: threads end; worker processes stay for the next pass."""
        if not self.processes:
            self.close()

    def close(self, wait: bool = True) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=wait, cancel_futures=True)
            self._ex = None


def close_pools() -> None:
    """End the kept evaluation worker processes (they also end with this process)."""
    for pool in _Pool._kept.values():
        pool.close()
    _Pool._kept.clear()


def iter_decoded(records: Sequence[VideoRecord], index_fn: IndexFn, size: tuple[int, int] | SizeFn,
                 threads: int = 2, lookahead: int = 16, *, processes: bool = True, desc: str | None = None,
                 failed: list[dict] | None = None) -> Iterator[tuple[int, np.ndarray | None]]:
    """Decode the clips of each record in worker processes, yielding ``(row, frames)`` in record order.

    Args:
        records: the videos.
        index_fn: the clips of a record, (clips, T) raw frame indices. It runs in the calling thread, in
            record order, so seeded random clip positions stay deterministic.
        size: (H, W) decode size, or a function giving it per record.
        threads: worker processes (or threads with ``processes=False``).
        lookahead: most videos in flight.
        processes: worker processes (the loader's PyAV workers) rather than threads of this process.
        desc: a progress bar / progress lines labelled so (None: none).
        failed: gets ``{"path", "reason"}`` for each video that failed to decode.

    Yields:
        ``(row, frames)``: frames (clips, T, H, W, 3) uint8, or None for a video that failed to decode.
    """
    size_of = size if callable(size) else (lambda rec: size)
    pool = _Pool.get(threads, processes)
    jobs = lambda i: (records[i].path, index_fn(records[i]), size_of(records[i]))  # noqa: E731
    pending: deque[tuple[int, tuple, Future]] = deque()
    rows = iter(range(len(records)))
    progress = Progress(len(records), desc or "decode", unit="video", interval=10.0, plain=log.info,
                        enabled=desc is not None)
    try:
        with progress:
            for done in range(1, len(records) + 1):
                while len(pending) < max(1, lookahead):
                    i = next(rows, None)
                    if i is None:
                        break
                    job = jobs(i)
                    pending.append((i, job, pool.submit(*job)))
                i, job, fut = pending.popleft()
                frames = _result(pool, records[i], job, fut, pending, failed)
                yield i, frames
                progress.update(done)
    finally:
        for _, _, fut in pending:             # a pass left early: its decodes are not wanted
            fut.cancel()
        pool.release()


def _result(pool: _Pool, rec: VideoRecord, job: tuple, fut: Future, pending: deque,
            failed: list[dict] | None) -> np.ndarray | None:
    """One video's (clips, T, H, W, 3) frames, or None (logged and recorded) if it cannot be decoded."""
    try:
        try:
            parts, _ = fut.result()
        except BrokenProcessPool:
            # a worker died: every video in flight is decoded again in a fresh pool, this one first
            pool.restart()
            retry = pool.submit(*job)
            for k, (j, jb, _) in enumerate(pending):
                pending[k] = (j, jb, pool.submit(*jb))
            parts, _ = retry.result()
        return np.stack(parts)
    except Exception as e:  # one bad video must not end an evaluation; it is counted by the caller
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        log.warning("not evaluated: %s: %s", rec.path, reason)
        if failed is not None:
            failed.append({"path": rec.path, "reason": reason})
        return None
