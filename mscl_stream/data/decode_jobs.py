"""The loader's decode jobs: samples (:class:`Work`), PyAV in worker threads or processes, the DALI
look-ahead of one iteration, and the counters and failed files they share (:class:`DecodeStats`).

:class:`~mscl_stream.data.loader.ClipLoader` decides which engine decodes a sample (its ``route``) and
assembles batches; the classes here run the decodes. PyAV work is submitted one batch ahead to a pool
of threads (PyAV releases the GIL while decoding) or processes (``data.pyav_workers``); a repeated-
sampling group is one PyAV sweep shared by its members. DALI work is submitted by epoch position
through :mod:`mscl_stream.data.dali.source`; a sample whose DALI run failed is decoded again alone,
then with PyAV, and a sample neither decodes is skipped and its file not tried again.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import threading
import weakref
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mscl_stream.config import DataConfig
from mscl_stream.data.dali.decoder import DaliDecodeError, DaliDecoder
from mscl_stream.data.dali.reader import DaliFrameReader
from mscl_stream.data.dali.source import DecoderSource, ReaderSource, window_jobs
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data import shm_handoff
from mscl_stream.data.frame_sink import YuvFrames
from mscl_stream.data.pyav_decode import DecodeError, decode_frames_counted, decode_group_counted, ignore_sigint
from mscl_stream.data.sampler import ClipSampler, SampleSpec, clip_span
from mscl_stream.data.yuv import yuv420_to_rgb_cover_crop

log = logging.getLogger("mscl_stream.data.loader")   # the loader's messages, under the one name users filter on
# data.dali_mode=reader: lines each reader decodes per pipeline run, and batches per chunk of file lists
# (a chunk's lists and pipeline are built in the background while the previous chunk is consumed)
_READER_FRAMES_PER_RUN = 64
_READER_CHUNK_BATCHES = 16


@dataclass
class Work:
    """One sample (all its candidate windows) on its way through the decoders."""

    position: int          # sampler position (may pass the epoch's end when refilling)
    specs: list[SampleSpec]
    record: VideoRecord

    def all_frames(self) -> np.ndarray:
        """(K * (2T + 2F),) indices: each candidate's ``SampleSpec.all_frames()``, in candidate order."""
        return np.concatenate([s.all_frames() for s in self.specs])


def one_torch_thread() -> None:
    """Loader threads resize and gather with torch on one OpenMP thread each: their own OpenMP teams
    beside DALI's threads and the training thread spun on idle cores (several times the CPU time per
    sample; benchmarks/README.md). ``torch.set_num_threads`` would also change the process-wide default (new
    threads, the training thread if it had run no parallel op yet), so the OpenMP runtime's own
    per-thread setting is used, after torch's lazy per-thread initialisation has run."""
    torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), size=(2, 2), mode="bilinear", antialias=True)
    omp = _openmp()
    if omp is not None:
        omp.omp_set_num_threads(1)


def _openmp():
    """The OpenMP runtime torch loaded (libgomp / libiomp5), or None where it cannot be found."""
    global _OMP
    if _OMP is None:
        _OMP = False
        try:
            with open("/proc/self/maps") as f:
                path = next((ln.split()[-1] for ln in f if "libgomp" in ln or "libiomp" in ln), None)
            _OMP = ctypes.CDLL(path) if path else False
        except OSError:
            pass
    return _OMP or None


_OMP = None


class DecodeStats:
    """The loader's counters (read through ``ClipLoader.stats``) and the files that failed to decode."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"batches": 0, "samples": 0, "decode_seconds": 0.0, "skipped": 0, "skipped_files": [],
                       "dali_samples": 0, "pyav_samples": 0, "dali_rebuilds": 0,
                       "pyav_frames_requested": 0, "pyav_frames_wanted": 0, "pyav_frames_decoded": 0,
                       "pyav_frames_skipped": 0, "pyav_seeks": 0, "pyav_cpu_seconds": 0.0, "dali_runs": 0,
                       "dali_max_in_flight": 0, "dali_reader_fallbacks": 0, "dali_frames_requested": 0}
        self.bad: dict[str, str] = {}        # path -> reason: files that decode with neither path
        self.dali_bad: set[str] = set()      # files DALI failed on (PyAV may still read them)

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.counts, "skipped_files": list(self.counts["skipped_files"])}

    def add(self, key: str, value: float = 1) -> None:
        with self.lock:
            self.counts[key] += value

    def add_pyav_cost(self, cost: dict) -> None:
        with self.lock:
            for k in ("requested", "wanted", "decoded", "skipped"):
                self.counts[f"pyav_frames_{k}"] += cost[k]
            self.counts["pyav_seeks"] += cost["seeks"]
            self.counts["pyav_cpu_seconds"] += cost["cpu_seconds"]

    def fail(self, w: Work, reason: str) -> None:
        """``w``'s file decodes with neither engine: skip the sample and never try the file again."""
        self.bad[w.record.path] = reason
        self.skip(w, reason)

    def skip(self, w: Work, reason: str, quiet: bool = False) -> None:
        with self.lock:
            self.counts["skipped"] += 1
            self.counts["skipped_files"].append({"path": w.record.path, "reason": reason})
        (log.debug if quiet else log.warning)("skipped a sample of %s: %s", w.record.path, reason)


def pyav_process_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` PyAV worker processes, as the loader and evaluation start them: forkserver (never fork
    a process that holds CUDA state; the workers import PyAV + numpy only), Ctrl-C left to the parent."""
    return ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("forkserver"),
                               initializer=ignore_sigint)


class PyAVJobs:
    """PyAV decodes of loader samples in the loader's threads or in worker processes (``data.pyav_workers``).

    ``ahead`` maps positions to decodes already submitted (by the producer thread, a batch early);
    ``work_of(position)`` gives the sample at a position. ``output`` is what the decodes hand over
    (``data.pyav_output``): "rgb" frames at the working size, or "yuv" planes that :meth:`to_device`
    converts and resizes on the device.
    """

    def __init__(self, data: DataConfig, device: torch.device, sampler: ClipSampler,
                 work_of: Callable[[int], Work], stats: DecodeStats) -> None:
        self.data, self.device, self.sampler, self.work_of, self.stats = data, device, sampler, work_of, stats
        self.output = data.pyav_output if data.pyav_output != "auto" else ("yuv" if device.type == "cuda" else "rgb")
        self.ahead: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._procs: ProcessPoolExecutor | None = None
        # repeated sampling: first position of a group -> its one PyAV decode (shared by the members)
        self._groups: dict[int, Future] = {}
        self._groups_counted: "weakref.WeakSet[Future]" = weakref.WeakSet()
        self._slots: shm_handoff.Slots | None = None     # shared-memory hand-off of worker processes

    def threads(self) -> ThreadPoolExecutor:
        """The loader's decode threads (PyAV with ``pyav_workers=threads``; DALI's resize/gather)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.data.decode_workers, thread_name_prefix="pyav-decode",
                                            initializer=one_torch_thread)
        return self._pool

    def pool(self) -> Executor:
        """Where PyAV decodes: worker processes or the loader's threads (``data.pyav_workers``)."""
        if self._procs is not None:
            return self._procs
        mode = self.data.pyav_workers
        if mode == "auto":
            mode = "processes" if self.device.type == "cuda" else "threads"
        if mode == "threads":
            return self.threads()
        self._procs = pyav_process_pool(self.data.decode_workers)
        if self.data.pyav_handoff == "shm" and self._slots is None:
            # in flight at most: the batch being read, the one submitted ahead, one per worker
            self._slots = shm_handoff.Slots(2 * self.data.batch_size + self.data.decode_workers)
        log.info("PyAV decodes in %d worker processes (frames returned by %s)", self.data.decode_workers,
                 "shared memory" if self._slots is not None else "pickling")
        return self._procs

    def _submit(self, fn: Callable, *args, **kwargs) -> Future:
        """``fn`` on the pool; from worker processes through shared memory where ``data.pyav_handoff`` says so."""
        pool = self.pool()
        if pool is self._procs and self._slots is not None:
            return shm_handoff.submit(pool, self._slots, fn, *args, **kwargs)
        return pool.submit(fn, *args, **kwargs)

    def worker_pids(self) -> list[int]:
        """The live PyAV worker processes (none with threads): for CPU accounting and tests."""
        return list(self._procs._processes) if self._procs is not None else []

    def submit(self, w: Work) -> Future:
        if self.sampler.repeat > 1:
            return self._submit_group(w)
        args = self._args(w)
        try:
            return self._submit(decode_frames_counted, *args, threads=1, output=self.output)
        except BrokenProcessPool:             # a worker died since the last batch
            self._restart()
            return self._submit(decode_frames_counted, *args, threads=1, output=self.output)

    def _submit_group(self, w: Work) -> Future:
        """Repeated sampling (data.repeat_samples): one PyAV sweep over the union of the frames of the
        group holding ``w`` (``ClipSampler.group``), shared by every member's future; each member takes
        its part in :meth:`result`."""
        g = self.sampler.group(w.position)
        fut = self._groups.get(g.start)
        if fut is None or fut.cancelled():
            args = (w.record.path, [self.work_of(p).all_frames() for p in g], tuple(self.data.frame_size))
            try:
                fut = self._submit(decode_group_counted, *args, threads=1, output=self.output)
            except BrokenProcessPool:         # a worker died since the last batch
                self._restart()
                fut = self._submit(decode_group_counted, *args, threads=1, output=self.output)
            self._groups[g.start] = fut
            while len(self._groups) > 4 * self.data.batch_size:   # oldest first: long consumed
                self._groups.pop(next(iter(self._groups)))
        return fut

    def result(self, w: Work, fut: Future) -> np.ndarray | YuvFrames:
        try:
            frames, cost = fut.result()
            if isinstance(frames, list):      # a repeated-sampling group: its cost once, this member's part
                if fut not in self._groups_counted:
                    self._groups_counted.add(fut)
                    self.stats.add_pyav_cost(cost)
                return frames[w.position - self.sampler.group(w.position).start]
            self.stats.add_pyav_cost(cost)
            return frames
        except BrokenProcessPool:             # a worker died while this sample was in flight
            self._restart()
            return self.decode_here(w)        # this sample retried in-process

    def _restart(self) -> None:
        if self._procs is not None:           # e.g. killed, or a crash inside FFmpeg
            log.warning("a PyAV worker process died; starting a new pool")
            self._procs.shutdown(wait=False, cancel_futures=True)
            self._procs = None
            self.ahead = {}                   # submitted to the dead pool: decoded again on demand

    def _args(self, w: Work) -> tuple:
        return w.record.path, w.all_frames(), tuple(self.data.frame_size)

    def decode_here(self, w: Work) -> np.ndarray | YuvFrames:
        """Decode ``w`` in this process (fallbacks; the batch path goes through :meth:`submit`)."""
        frames, cost = decode_frames_counted(*self._args(w), threads=1, output=self.output)
        self.stats.add_pyav_cost(cost)
        return frames

    def to_device(self, frames: np.ndarray | YuvFrames) -> tuple[torch.Tensor, torch.Tensor]:
        """PyAV output (already in ``all_frames()`` order) -> (frames on the device, identity rows):
        RGB is uploaded as it is; YUV planes are uploaded, then resized and converted there (queued on
        the current stream, no host sync)."""
        yuv = isinstance(frames, YuvFrames)
        ts = [torch.from_numpy(frames.y), torch.from_numpy(frames.uv)] if yuv else [torch.from_numpy(frames)]
        if self.device.type == "cuda":
            ts = [t.pin_memory().to(self.device, non_blocking=True) for t in ts]
        if yuv:
            ts = [yuv420_to_rgb_cover_crop(*ts, tuple(self.data.frame_size), frames.matrix, frames.full_range,
                                           frames.chroma_left)]
        return ts[0], torch.arange(len(frames), device=self.device)

    def cancel_ahead(self) -> None:
        for fut in self.ahead.values():
            fut.cancel()
        self.ahead = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
            self._procs = None
        if self._slots is not None:           # the workers are gone: nobody writes into a slot any more
            self._slots.close()
            self._slots = None


class DaliJobs:
    """DALI decodes of loader samples: one look-ahead source per loader iteration (``data.dali_mode``
    choosing the engine), a one-sample decoder to find a damaged file, PyAV as the last resort."""

    def __init__(self, data: DataConfig, device: torch.device, sampler: ClipSampler, mode: str,
                 stats: DecodeStats, pyav: PyAVJobs) -> None:
        self.data, self.device, self.sampler, self.mode = data, device, sampler, mode
        self.stats, self.pyav = stats, pyav
        self._dali: DaliDecoder | None = None            # pipelined, data.prefetch batches in flight
        self._dali_one: DaliDecoder | None = None        # one sample at a time (finding a culprit)
        self._src: DecoderSource | ReaderSource | None = None   # this iteration's DALI look-ahead
        self._reader_runs = 0                 # runs of the readers of finished iterations
        self._frames = 0                      # frames requested from DALI in finished iterations

    def start(self, lookup: Callable[[int], Work | None], limit: int) -> None:
        """This iteration's look-ahead: ``data.prefetch`` batches in flight from the first position
        ``lookup`` is asked for; ``lookup(position)`` gives the sample there, or None where it does not
        go to DALI; ``limit`` is the epoch's last position."""
        bsz, depth = self.data.batch_size, max(2, self.data.prefetch)
        if self._dali is None:
            self._dali = DaliDecoder(bsz, tuple(self.data.frame_size), self.data.decode_workers, self.device,
                                     seed=self.data.seed, executor=self.pyav.threads(), depth=depth)
        group_of = self.sampler.group             # repeated sampling: a group is one DALI sample
        if self.mode == "decoder":
            self._src = DecoderSource(self._dali, lookup, bsz, limit, group_of=group_of)
            return
        legacy = self.mode == "legacy"
        # legacy: a window is one sequence on the grid of gcd(frame_stride, flow_gap) from its start
        g = math.gcd(self.data.frame_stride, self.data.flow_gap)
        seq = ((clip_span(self.data) - 1) // g + 1, g) if legacy else (1, 1)

        def make(jobs) -> DaliFrameReader:
            return DaliFrameReader(jobs, tuple(self.data.frame_size), self.device,
                                   readers=self.data.decode_workers, frames_per_run=max(1, _READER_FRAMES_PER_RUN // seq[0]),
                                   depth=depth, num_threads=1, seed=self.data.seed,
                                   op="legacy" if legacy else "experimental", seq=seq)
        chunk = _READER_CHUNK_BATCHES * bsz * self.sampler.repeat
        if not legacy:
            self._src = ReaderSource(make, lookup, chunk=chunk, limit=limit, group_of=group_of)
            return
        src = ReaderSource(make, lookup, chunk=chunk, limit=limit, to_job=window_jobs(*seq), group_of=group_of)
        # groups with a window the legacy reader cannot express (it wraps): fn.decoders.video, alongside
        src.fallback = DecoderSource(self._dali, lambda p: lookup(p) if src.refused(p) else None, bsz, limit,
                                     group_of=group_of)
        self._src = src

    def end(self) -> None:
        """The iteration is over: fold its counters in and release its look-ahead."""
        if self._src is not None:
            self._counters(closing=True)
            self._src.close()
            self._src = None

    def _counters(self, closing: bool = False) -> None:
        """Fold the DALI engines' run counters into the stats (readers live for one iteration)."""
        readers = self._src.readers if isinstance(self._src, ReaderSource) else []
        engines = readers + ([self._dali] if self._dali is not None else [])
        with self.stats.lock:
            st = self.stats.counts
            st["dali_max_in_flight"] = max([st["dali_max_in_flight"]] + [e.max_in_flight for e in engines])
            st["dali_runs"] = self._reader_runs + sum(e.runs for e in engines)
            frames = self._src.frames_requested if self._src is not None else 0
            st["dali_frames_requested"] = self._frames + frames
            if closing:
                self._reader_runs += sum(e.runs for e in readers)
                self._frames += frames
                if isinstance(self._src, ReaderSource):
                    st["dali_reader_fallbacks"] += self._src.fallback_samples

    def collect(self, works: list[Work], out: dict) -> None:
        """Collect ``works`` from this iteration's look-ahead into ``out`` (position -> (frames, rows));
        a sample whose run failed is decoded again alone (which finds the damaged file), then with PyAV."""
        for w in works:
            try:
                frames, inv = self._src.take(w)
            except OSError as e:
                self.stats.fail(w, str(e))
                continue
            except DaliDecodeError as e:
                self.stats.add("dali_rebuilds")
                self._single(w, str(e), out)
                continue
            out[w.position] = (frames, torch.from_numpy(inv).to(frames.device))
            self.stats.add("dali_samples")
        self._counters()

    def _single(self, w: Work, reason: str, out: dict) -> None:
        if self._dali_one is None:
            self._dali_one = DaliDecoder(1, tuple(self.data.frame_size), 1, self.device, seed=self.data.seed)
        uniq, inv = np.unique(w.all_frames(), return_inverse=True)
        try:
            (frames,) = self._dali_one.decode([np.fromfile(w.record.path, dtype=np.uint8)], [uniq])
        except OSError as e:
            self.stats.fail(w, f"cannot read: {e.strerror or e}")
            return
        except DaliDecodeError as e:
            self.stats.add("dali_rebuilds")
            self._fallback(w, f"{reason}; alone: {e}" if reason != str(e) else reason, out)
            return
        out[w.position] = (frames, torch.from_numpy(inv).to(frames.device))
        self.stats.add("dali_samples")

    def _fallback(self, w: Work, reason: str, out: dict) -> None:
        """DALI failed on this sample: its file goes to PyAV from now on; try PyAV right away."""
        self.stats.dali_bad.add(w.record.path)
        log.warning("DALI could not decode %s (%s); trying PyAV for this file", w.record.path, reason)
        try:
            out[w.position] = self.pyav.to_device(self.pyav.decode_here(w))
            self.stats.add("pyav_samples")
        except DecodeError as e:
            self.stats.fail(w, f"DALI: {reason}; PyAV: {e}")

    def close(self) -> None:
        for dec in (self._dali, self._dali_one):
            if dec is not None:
                dec.close()
        self._dali = self._dali_one = None
