"""Ahead-of-time DALI decode for the loader: samples are submitted by epoch position, several batches
before the loader asks for them, and collected in order.

A source serves one loader iteration. ``lookup(position)`` gives the loader's work item for a position
(anything with ``position``, ``record.path``, ``specs`` and ``all_frames()``) or None where the sample
does not go to DALI (another codec, a file that failed before). ``group_of(position)`` gives the
positions decoded together: the repeated-sampling group (``ClipSampler.group``, R consecutive samples
of one video), one position otherwise. A group is one DALI sample: the union of its members' frames,
one sweep; each member gets its rows of it. :meth:`take` returns a sample's decoded frames; the loader
asks for positions in increasing order (refills after a skipped sample ask for later ones).

* :class:`DecoderSource` (``data.dali_mode=decoder``): batches of ``batch_size`` groups through
  :class:`~mscl_stream.data.dali.decoder.DaliDecoder`, its ``depth`` batches in flight.
* :class:`ReaderSource` (``data.dali_mode=reader`` / ``legacy``): chunks of ``chunk`` positions through
  :class:`~mscl_stream.data.dali.reader.DaliFrameReader`; the next chunk's lists and pipeline are built
  in a background thread while the current one is consumed, so its readers start decoding before the
  loader gets there. Groups the reader cannot express (``to_job`` gives None: a window of the legacy
  reader that wraps around the video's end) go to a ``fallback`` source, in flight at the same time.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mscl_stream.data.dali.decoder import DaliBatch, DaliDecoder
from mscl_stream.data.dali.pipeline import DaliDecodeError
from mscl_stream.data.dali.reader import DaliFrameReader, FrameJob, window_job


def _single(pos: int) -> range:
    return range(pos, pos + 1)


def union_frames(works: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted unique frames of all ``works``, per work the rows of its ``all_frames()`` in them)."""
    uniq = np.unique(np.concatenate([w.all_frames() for w in works]))
    return uniq, [np.searchsorted(uniq, w.all_frames()) for w in works]


def frame_job(key: int, works: list) -> tuple[FrameJob, list[np.ndarray]]:
    """One line per wanted frame of the group (``fn.experimental.readers.video``)."""
    uniq, rows = union_frames(works)
    return FrameJob(key, works[0].record.path, uniq), rows


def window_jobs(length: int, stride: int) -> Callable:
    """``to_job`` for the legacy reader: one sequence line per window (A and B of every candidate of
    every member), or None where a window is off the grid (it wraps around the end of the video)."""
    def to_job(key: int, works: list):
        uniq, rows = union_frames(works)
        windows = [np.unique(np.concatenate([a, p])) for w in works for s in w.specs
                   for a, p in ((s.frame_idx_a, s.partner_idx_a), (s.frame_idx_b, s.partner_idx_b))]
        job = window_job(key, works[0].record.path, uniq, windows, length, stride)
        return None if job is None else (job, rows)
    return to_job


def _members(lookup: Callable, group: range, start: int) -> list:
    """The group's work items at or after ``start`` that go to DALI."""
    return [w for q in group if q >= start and (w := lookup(q)) is not None]


class DecoderSource:
    """``fn.decoders.video`` batches submitted ahead (see the module docstring).

    Args:
        decoder: the pipelined decoder (its ``depth`` bounds the batches in flight).
        lookup: position -> work item or None.
        batch_size: groups per submitted batch.
        limit: positions at or past it (refills past the epoch's end) are submitted only on demand.
        group_of: position -> the positions decoded with it.
    """

    def __init__(self, decoder: DaliDecoder, lookup: Callable, batch_size: int, limit: int,
                 group_of: Callable[[int], range] = _single) -> None:
        self.decoder, self.lookup, self.batch_size, self.limit = decoder, lookup, batch_size, limit
        self.group_of = group_of
        self._subs: dict[int, tuple[DaliBatch | None, int, np.ndarray, str | None]] = {}
        self._next = None                         # first position not submitted yet
        self.frames_requested = 0                 # frames asked of DALI (a group's union once)

    def take(self, work) -> tuple[torch.Tensor, np.ndarray]:
        """(frames (U, H, W, 3) uint8 on the device, rows (len(all_frames()),) into them).

        Raises:
            DaliDecodeError: the sample's batch failed (retry the sample alone to find the culprit).
            OSError: the file could not be read.
        """
        pos = work.position
        if pos not in self._subs:
            self._submit_from(pos)
        per_batch = self.batch_size * len(self.group_of(pos))     # positions per submitted batch
        horizon = min(pos + self.decoder.depth * per_batch, max(self.limit, pos + 1))
        while self._next < horizon and self.decoder.in_flight < self.decoder.depth:
            self._submit_from(self._next)
        if pos not in self._subs:             # lookup() refused it after all: never silently wrong
            raise DaliDecodeError(f"sample {pos} was not submitted to DALI")
        batch, i, rows, err = self._subs.pop(pos)
        if err is not None:
            raise OSError(err)
        return batch.result()[i], rows

    def _submit_from(self, start: int) -> None:
        """Submit the next ``batch_size`` groups from ``start`` (their members that go to DALI)."""
        enc, lists, meta = [], [], []
        p = start
        for _ in range(self.batch_size):
            group = self.group_of(p)
            works = _members(self.lookup, group, p)
            p = group.stop
            if not works:
                continue
            uniq, rows = union_frames(works)
            try:
                enc.append(np.fromfile(works[0].record.path, dtype=np.uint8))
            except OSError as e:
                for w, r in zip(works, rows):
                    self._subs[w.position] = (None, 0, r, f"cannot read: {e.strerror or e}")
                continue
            lists.append(uniq)
            self.frames_requested += len(uniq)
            meta.append([(w.position, r) for w, r in zip(works, rows)])
        if enc:
            batch = self.decoder.submit(enc, lists)
            for i, members in enumerate(meta):
                for q, r in members:
                    self._subs[q] = (batch, i, r, None)
        self._next = max(self._next or 0, p)

    def close(self) -> None:
        """Forget this iteration's submissions; runs still in flight (an abandoned iteration) are
        dropped with the pipeline."""
        self._subs.clear()
        if self.decoder.in_flight:
            self.decoder.close()


class ReaderSource:
    """``fn.experimental.readers.video`` / ``fn.readers.video`` chunks built ahead (module docstring).

    Args:
        make_reader: jobs -> a started :class:`DaliFrameReader`.
        lookup: position -> work item or None.
        chunk: positions per chunk (a multiple of the batch size and of the group size).
        limit: no chunk is started at or past it unless a position there is asked for.
        to_job: (key, the group's works) -> (job, rows per work), or None if the reader cannot take it.
        fallback: where groups go that ``to_job`` refuses (None: they fail).
        group_of: position -> the positions decoded with it.
    """

    def __init__(self, make_reader: Callable[[list[FrameJob]], DaliFrameReader], lookup: Callable, chunk: int,
                 limit: int, to_job: Callable = frame_job, fallback: "DecoderSource | None" = None,
                 group_of: Callable[[int], range] = _single) -> None:
        self.make_reader, self.lookup, self.chunk, self.limit = make_reader, lookup, chunk, limit
        self.to_job, self.fallback, self.group_of = to_job, fallback, group_of
        self.fallback_samples = 0                 # samples the reader could not express
        # (start, end, reader future, position -> (job key, rows)); a job's frames until its members took them
        self._chunks: list[tuple[int, int, Future | None, dict]] = []
        self._frames: dict[int, list] = {}        # job key -> [frames, members still to take them]
        self._refused: dict[int, bool] = {}       # position -> sent to the fallback (listed chunks)
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="dali-lists")
        self.readers: list[DaliFrameReader] = []   # every reader started (for their counters)

    @property
    def frames_requested(self) -> int:
        """Frames asked of DALI: reader lines (legacy: whole sequences) plus the fallback's frames."""
        lines = sum(r.lines * r.seq[0] for r in self.readers)
        return lines + (self.fallback.frames_requested if self.fallback is not None else 0)

    def refused(self, pos: int) -> bool:
        """Whether the sample at ``pos`` goes to the fallback (its filter): as decided when its chunk was
        listed, or, for positions not listed yet, whether ``to_job`` refuses its group."""
        if pos in self._refused:
            return self._refused[pos]
        group = self.group_of(pos)
        works = _members(self.lookup, group, group.start)
        return bool(works) and self.to_job(group.start, works) is None

    def _start(self, start: int, end: int) -> None:
        jobs, rows = [], {}
        p = start
        while p < end:
            group = self.group_of(p)
            works = _members(self.lookup, group, p)
            made = self.to_job(p, works) if works else None
            if made is not None:
                jobs.append(made[0])
                for w, r in zip(works, made[1]):
                    rows[w.position] = (p, r)
            for w in works:
                self._refused[w.position] = made is None
            p = group.stop
        fut = self._builder.submit(self.make_reader, jobs) if jobs else None
        self._chunks.append((start, p, fut, rows))

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
        key, r = rows.pop(pos)
        if key not in self._frames:
            try:
                reader = fut.result()
            except ValueError as e:               # e.g. a path the list format cannot hold
                raise DaliDecodeError(str(e)) from None
            if reader not in self.readers:
                self.readers.append(reader)
            members = 1 + sum(1 for k, _ in rows.values() if k == key)
            self._frames[key] = [reader.result(key), members]
        entry = self._frames[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._frames[key]
        return entry[0], r

    def _close_chunk(self, chunk) -> None:
        fut = chunk[2]
        for key, _ in chunk[3].values():          # members never taken (skipped): drop their frames
            self._frames.pop(key, None)
        if fut is not None:
            fut.add_done_callback(lambda f: f.exception() is None and f.result().close())

    def close(self) -> None:
        for c in self._chunks:
            self._close_chunk(c)
        self._chunks, self._frames = [], {}
        self._builder.shutdown(wait=True)
        if self.fallback is not None:
            self.fallback.close()
