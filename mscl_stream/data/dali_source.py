"""Ahead-of-time DALI decode for the loader: samples are submitted by epoch position, several batches
before the loader asks for them, and collected in order.

A source serves one loader iteration. ``lookup(position)`` gives the loader's work item for a position
(anything with ``position``, ``record.path`` and ``all_frames()``) or None where the sample does not go
to DALI (another codec, a file that failed before). :meth:`take` returns a sample's decoded frames;
the loader asks for positions in increasing order (refills after a skipped sample ask for later ones).

* :class:`DecoderSource` (``data.dali_mode=decoder``): batches of ``batch_size`` consecutive positions
  through :class:`~mscl_stream.data.pipeline.DaliDecoder`, ``ahead`` batches in flight.
* :class:`ReaderSource` (``data.dali_mode=reader`` / ``legacy``): chunks of ``chunk`` batches through
  :class:`~mscl_stream.data.dali_reader.DaliFrameReader`; the next chunk's lists and pipeline are built
  in a background thread while the current one is consumed, so its readers start decoding before the
  loader gets there. Samples the reader cannot express (``to_job`` gives None: a window of the legacy
  reader that wraps around the video's end) go to a ``fallback`` source, in flight at the same time.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mscl_stream.data.dali_reader import DaliFrameReader, FrameJob, window_job
from mscl_stream.data.pipeline import DaliBatch, DaliDecodeError, DaliDecoder


def _wanted(work) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique frames, rows of them for each of ``all_frames()``)."""
    return tuple(np.unique(work.all_frames(), return_inverse=True))


def frame_job(pos: int, work) -> tuple[FrameJob, np.ndarray]:
    """One line per wanted frame (``fn.experimental.readers.video``)."""
    uniq, inv = _wanted(work)
    return FrameJob(pos, work.record.path, uniq), inv


def window_jobs(length: int, stride: int) -> Callable:
    """``to_job`` for the legacy reader: one sequence line per window (A, B of every candidate), or
    None where a window is off the grid (it wraps around the end of the video)."""
    def to_job(pos: int, work):
        uniq, inv = _wanted(work)
        windows = [np.unique(np.concatenate([a, p])) for s in work.specs
                   for a, p in ((s.frames_a, s.partners_a), (s.frames_b, s.partners_b))]
        job = window_job(pos, work.record.path, uniq, windows, length, stride)
        return None if job is None else (job, inv)
    return to_job


class DecoderSource:
    """``fn.decoders.video`` batches submitted ahead (see the module docstring).

    Args:
        decoder: the pipelined decoder (its ``depth`` bounds the batches in flight).
        lookup: position -> work item or None.
        batch_size: positions per submitted batch.
        limit: positions at or past it (refills past the epoch's end) are submitted only on demand.
    """

    def __init__(self, decoder: DaliDecoder, lookup: Callable, batch_size: int, limit: int) -> None:
        self.decoder, self.lookup, self.batch_size, self.limit = decoder, lookup, batch_size, limit
        self._subs: dict[int, tuple[DaliBatch | None, int, np.ndarray, str | None]] = {}
        self._next = None                         # first position not submitted yet

    def take(self, work) -> tuple[torch.Tensor, np.ndarray]:
        """(frames (U, H, W, 3) uint8 on the device, rows (len(all_frames()),) into them).

        Raises:
            DaliDecodeError: the sample's batch failed (retry the sample alone to find the culprit).
            OSError: the file could not be read.
        """
        pos = work.position
        if self._next is None or pos >= self._next or pos not in self._subs:
            self._submit_from(pos)
        horizon = min(pos + self.decoder.depth * self.batch_size, max(self.limit, pos + 1))
        while self._next < horizon and self.decoder.in_flight < self.decoder.depth:
            self._submit_from(self._next)
        batch, i, inv, err = self._subs.pop(pos)
        if err is not None:
            raise OSError(err)
        return batch.result()[i], inv

    def _submit_from(self, start: int) -> None:
        """Submit the batch of positions [start, start + batch_size) that go to DALI."""
        enc, lists, meta = [], [], []
        for p in range(start, start + self.batch_size):
            w = self.lookup(p)
            if w is None:
                continue
            uniq, inv = _wanted(w)
            try:
                enc.append(np.fromfile(w.record.path, dtype=np.uint8))
            except OSError as e:
                self._subs[p] = (None, 0, inv, f"cannot read: {e.strerror or e}")
                continue
            lists.append(uniq)
            meta.append((p, inv))
        if enc:
            batch = self.decoder.submit(enc, lists)
            for i, (p, inv) in enumerate(meta):
                self._subs[p] = (batch, i, inv, None)
        self._next = max(self._next or 0, start + self.batch_size)

    def close(self) -> None:
        """Forget this iteration's submissions; runs still in flight (an abandoned iteration) are
        dropped with the pipeline."""
        self._subs.clear()
        if self.decoder.in_flight:
            self.decoder.close()


class ReaderSource:
    """``fn.experimental.readers.video`` chunks built ahead (see the module docstring).

    Args:
        make_reader: jobs -> a started :class:`DaliFrameReader`.
        lookup: position -> work item or None.
        chunk: positions per chunk (a multiple of the batch size).
        limit: no chunk is started at or past it unless a position there is asked for.
    """

    def __init__(self, make_reader: Callable[[list[FrameJob]], DaliFrameReader], lookup: Callable, chunk: int,
                 limit: int, to_job: Callable = frame_job, fallback: "DecoderSource | None" = None) -> None:
        self.make_reader, self.lookup, self.chunk, self.limit = make_reader, lookup, chunk, limit
        self.to_job, self.fallback = to_job, fallback
        self.fallback_samples = 0                 # samples the reader could not express
        self._chunks: list[tuple[int, int, Future, dict]] = []   # (start, end, reader future, rows)
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="dali-lists")
        self.readers: list[DaliFrameReader] = []   # every reader started (for their counters)

    def _start(self, start: int, end: int) -> None:
        jobs, rows = [], {}
        for p in range(start, end):
            w = self.lookup(p)
            made = self.to_job(p, w) if w is not None else None
            if made is not None:
                jobs.append(made[0])
                rows[p] = made[1]
        fut = self._builder.submit(self.make_reader, jobs) if jobs else None
        self._chunks.append((start, end, fut, rows))

    def take(self, work) -> tuple[torch.Tensor, np.ndarray]:
        pos = work.position
        # chunks wholly behind this position are done with
        while self._chunks and self._chunks[0][1] <= pos:
            self._close_chunk(self._chunks.pop(0))
        chunk = next((c for c in self._chunks if c[0] <= pos < c[1]), None)
        if chunk is None:
            self._chunks = [c for c in self._chunks if c[0] > pos]
            end = pos + self.chunk if pos < self.limit else pos + 1
            self._start(pos, min(end, max(self.limit, pos + 1)))
            self._chunks.sort(key=lambda c: c[0])
            chunk = self._chunks[0]
        start, end, fut, rows = chunk
        # past the chunk's middle: build the next one now, its readers start decoding right away
        last = self._chunks[-1][1]
        if pos >= (start + end) // 2 and last < self.limit and last == end:
            self._start(end, min(end + self.chunk, self.limit))
        if pos not in rows and self.fallback is not None:
            self.fallback_samples += 1
            return self.fallback.take(work)
        if pos not in rows or fut is None:
            raise DaliDecodeError("sample not in the DALI reader's lists")
        try:
            reader = fut.result()
        except ValueError as e:                   # e.g. a path the list format cannot hold
            raise DaliDecodeError(str(e)) from None
        if reader not in self.readers:
            self.readers.append(reader)
        return reader.result(pos), rows.pop(pos)

    def _close_chunk(self, chunk) -> None:
        fut = chunk[2]
        if fut is not None:
            fut.add_done_callback(lambda f: f.exception() is None and f.result().close())

    def close(self) -> None:
        for c in self._chunks:
            self._close_chunk(c)
        self._chunks = []
        self._builder.shutdown(wait=True)
        if self.fallback is not None:
            self.fallback.close()
