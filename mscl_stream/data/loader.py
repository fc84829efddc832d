"""Streaming clip loader: ClipSampler -> decode (DALI or PyAV per file) -> ClipBatch on the device.

A background thread decodes the next batches (at most ``data.prefetch`` finished batches wait in a
queue, plus the one being built) while the training loop consumes the current one. DALI work is
submitted by position ahead of that (:mod:`mscl_stream.data.dali_source`): ``max(2, data.prefetch)``
pipeline runs in flight, with ``data.dali_mode`` choosing ``fn.decoders.video`` or per-frame reader
lists (:mod:`mscl_stream.data.dali_decoder`); PyAV work is submitted one batch ahead. Each file goes to
DALI where DALI decodes its codec on the current device (CPU: VP8/VP9/MJPEG; CUDA: also H.264, HEVC,
AV1, MPEG-4), else to a pool of PyAV worker threads (PyAV releases the GIL while decoding); both run
at the same time for a mixed batch. ``data.decoder`` = "dali" / "pyav" forces one path. On CUDA,
``auto`` means PyAV, in worker processes (``data.pyav_workers``), until a DALI engine is measured
faster on that GPU (see :meth:`ClipLoader._route`; measurements in benchmarks/README.md).

Failures at run time (a file damaged or removed after indexing) cost only their samples: a DALI batch
that fails is retried sample by sample in a fresh pipeline, a sample DALI cannot decode is tried with
PyAV (and its file goes to PyAV from then on), and a sample that neither decodes is skipped, counted and
logged with its path; its file is not tried again. The batch is refilled with the next samples of the
epoch, cycling to the epoch's first samples at its end, so every rank still yields exactly ``len()``
batches per epoch and distributed ranks stay in step. Decoded frames are never padded.

With MDS ``online`` a sample is K candidate windows of one video (``ClipSampler.specs``): they are
decoded together as one sample (one file read, shared frames decoded once), so skips and refills stay
per sample, and the batch holds ``batch_size * K`` rows, a sample's candidates adjacent.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import multiprocessing
import queue
from contextlib import nullcontext
import threading
import time
import weakref
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mscl_stream.config import Config, DataConfig
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.dali_reader import DaliFrameReader
from mscl_stream.data.dali_source import DecoderSource, ReaderSource, window_jobs
from mscl_stream.data.dali_decoder import (DaliDecodeError, DaliDecoder, auto_dali_mode_on_gpu, canonical_codec,
                                       dali_available, dali_can_decode)
from mscl_stream.data.pyav_decode import DecodeError, decode_frames_counted, decode_group_counted, ignore_sigint
from mscl_stream.data.sampler import ClipSampler, SampleSpec, clip_span, flow_steps
from mscl_stream.errors import UserError

log = logging.getLogger(__name__)
_END = object()
# data.dali_mode=reader: lines each reader decodes per pipeline run, and batches per chunk of file lists
# (a chunk's lists and pipeline are built in the background while the previous chunk is consumed)
_READER_FRAMES_PER_RUN = 64
_READER_CHUNK_BATCHES = 16
_LIVE: "weakref.WeakSet[ClipLoader]" = weakref.WeakSet()


def _one_torch_thread() -> None:
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


def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


# Stop prefetch threads at interpreter exit before thread pools refuse work and DALI tears its
# pipelines down (both would otherwise fail under a still-running producer). concurrent.futures uses
# this same hook; handlers run last-registered first, so this one runs before the pools shut down.
getattr(threading, "_register_atexit", atexit.register)(_close_live_loaders)


@dataclass
class _Work:
    """One sample (all its candidate windows) on its way through the decoders."""

    position: int          # sampler position (may pass the epoch's end when refilling)
    specs: list[SampleSpec]
    record: VideoRecord

    def all_frames(self) -> np.ndarray:
        """(K * (2T + 2F),) indices: each candidate's ``SampleSpec.all_frames()``, in candidate order."""
        return np.concatenate([s.all_frames() for s in self.specs])


class ClipLoader:
    """Iterable over :class:`ClipBatch` (``data.batch_size`` samples, already on ``device``; with MDS
    ``online`` each sample is ``data.mds_candidates`` adjacent rows).

    One iteration covers the rest of the current epoch; call :meth:`set_epoch` before each epoch.
    Frames of at most ``prefetch + 2`` batches are alive at once (the queue, the batch being built and
    the one being consumed). Starting a new iteration ends an older, unfinished one.

    Args:
        sampler: the rank's :class:`ClipSampler` (its position is kept in step with consumed batches).
        data: loader settings (batch_size, frame_size, decoder, num_threads, prefetch).
        device: where batches are delivered; CUDA also selects DALI's NVDEC decoder.
    """

    def __init__(self, sampler: ClipSampler, data: DataConfig, device: torch.device) -> None:
        self.sampler, self.data, self.device = sampler, data, torch.device(device)
        self.records = sampler.records
        self.steps = torch.from_numpy(flow_steps(data))
        self._batch = 0                       # batches consumed in the current epoch
        self._resumed = False
        self._lock = threading.Lock()
        self._stats = {"batches": 0, "samples": 0, "decode_seconds": 0.0, "skipped": 0, "skipped_files": [],
                       "dali_samples": 0, "pyav_samples": 0, "dali_rebuilds": 0,
                       "pyav_frames_requested": 0, "pyav_frames_wanted": 0, "pyav_frames_decoded": 0,
                       "pyav_seeks": 0, "pyav_cpu_seconds": 0.0, "dali_runs": 0,
                       "dali_max_in_flight": 0, "dali_reader_fallbacks": 0, "dali_frames_requested": 0}
        self._bad: dict[str, str] = {}        # path -> reason: files that decode with neither path
        self._dali_bad: set[str] = set()      # files DALI failed on (PyAV may still read them)
        self._routes_logged: set[str] = set()
        self._dali: DaliDecoder | None = None            # pipelined, data.prefetch batches in flight
        self._dali_one: DaliDecoder | None = None        # one sample at a time (finding a culprit)
        self._src: DecoderSource | ReaderSource | None = None   # this iteration's DALI look-ahead
        self._reader_runs = 0                 # runs of the readers of finished iterations
        self._dali_frames = 0                 # frames requested from DALI in finished iterations
        self._pool: ThreadPoolExecutor | None = None
        self._procs: ProcessPoolExecutor | None = None    # PyAV worker processes (data.pyav_workers)
        self._ahead: dict[int, Future] = {}   # position -> PyAV decode already submitted (producer thread)
        # repeated sampling: first position of a group -> its one PyAV decode (shared by the members)
        self._groups: dict[int, Future] = {}
        self._groups_counted: "weakref.WeakSet[Future]" = weakref.WeakSet()
        self._active: tuple[threading.Event, threading.Thread] | None = None
        self._use_dali = data.decoder != "pyav" and dali_available()
        # data.decoder=auto on a GPU: the DALI engine measured faster than PyAV there, if any
        self._auto_gpu_mode = auto_dali_mode_on_gpu(torch.cuda.get_device_name(self.device)) \
            if data.decoder == "auto" and self.device.type == "cuda" else None
        self._dali_mode = self._auto_gpu_mode or data.dali_mode
        _LIVE.add(self)
        if data.decoder == "dali" and not dali_available():
            raise UserError("data.decoder=dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")

    # ------------------------------------------------------------------ epoch / state
    def __len__(self) -> int:
        """Batches per epoch (partial last batch dropped); the same on every rank."""
        return len(self.sampler) // self.data.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (unless a state of this epoch was just loaded)."""
        self._stop_active()
        keep = self._resumed and epoch == self.sampler.epoch
        self._resumed = False
        self.sampler.set_epoch(epoch)
        if not keep:
            self._batch = 0

    def state_dict(self) -> dict:
        """Sampler state at the last batch handed out, plus the batch count of the epoch."""
        return {"sampler": self.sampler.state_dict(), "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was taken (the same remaining batches follow)."""
        self._stop_active()
        self.sampler.load_state_dict(state["sampler"])
        self._batch = int(state["batch"])
        self._resumed = True

    @property
    def stats(self) -> dict:
        """Counters: batches, samples (handed out), decode_seconds, skipped (samples), skipped_files
        (list of {"path", "reason"}), dali_samples, pyav_samples (with pyav_frames_requested / _wanted /
        _decoded, pyav_seeks and pyav_cpu_seconds: what they cost to decode, docs/data.md), dali_rebuilds,
        dali_runs (DALI pipeline runs scheduled), dali_max_in_flight (most runs scheduled and not yet
        collected at once: the pipelining actually reached), dali_reader_fallbacks (samples the
        legacy reader cannot express, decoded by fn.decoders.video instead) and dali_frames_requested
        (frames DALI was asked to output: a repeated-sampling group's union once)."""
        with self._lock:
            return {**self._stats, "skipped_files": list(self._stats["skipped_files"])}

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[ClipBatch]:
        self._stop_active()
        if self._batch >= len(self):
            return
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.data.prefetch)
        th = threading.Thread(target=self._produce, name="clip-loader",
                              args=(self.sampler.position, self._batch, q, stop), daemon=True)
        self._active = (stop, th)
        th.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.2)
                except queue.Empty:
                    if stop.is_set():             # a newer iterator or set_epoch took over: end here
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, cursor = item
                if self.device.type == "cuda":
                    stream = torch.cuda.current_stream(self.device)
                    for t in batch.tensors().values():   # made on the loader's stream: keep the memory alive
                        t.record_stream(stream)
                self._batch += 1
                self.sampler.position = cursor
                with self._lock:
                    self._stats["batches"] += 1
                    self._stats["samples"] += batch.batch_size // batch.candidates
                yield batch
        finally:
            self._stop_active()

    def _stop_active(self) -> None:
        if self._active is None:
            return
        stop, th = self._active
        stop.set()
        th.join()
        self._active = None

    def close(self) -> None:
        """Stop the prefetch thread and release DALI and the PyAV workers."""
        self._stop_active()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
            self._procs = None
        for dec in (self._dali, self._dali_one):
            if dec is not None:
                dec.close()
        self._dali = self._dali_one = None

    def _produce(self, cursor: int, batch_no: int, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        self._ahead = {}
        _one_torch_thread()
        try:
            self._src = self._dali_source(cursor)
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            for _ in range(batch_no, len(self)):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    batch, cursor = self._next_batch(cursor, stop)
                    if batch is None:
                        return
                if stream is not None:
                    stream.synchronize()
                with self._lock:
                    self._stats["decode_seconds"] += time.perf_counter() - t0
                if not put((batch, cursor)):
                    return
            put(_END)
        except BaseException as e:          # surfaces in the consuming thread
            put(e)
        finally:
            for fut in self._ahead.values():
                fut.cancel()
            self._ahead = {}
            if self._src is not None:
                self._dali_counters(closing=True)
                self._src.close()
                self._src = None

    # ------------------------------------------------------------------ one batch
    def _next_batch(self, cursor: int, stop: threading.Event) -> tuple[ClipBatch | None, int]:
        """Decode samples from ``cursor`` on until a full batch decoded; returns it and the new cursor."""
        bsz, got, failures = self.data.batch_size, [], 0   # got: (work, frames, rows) per sample
        while len(got) < bsz:
            if stop.is_set():
                return None, cursor
            need = bsz - len(got)
            works = [self._work(pos) for pos in range(cursor, cursor + need)]
            cursor += need
            self._submit_ahead(cursor)
            done = self._decode(works)
            failures = 0 if done else failures + need
            if failures > max(64, 4 * bsz):
                raise UserError(f"data: {failures} samples in a row failed to decode; last: "
                                f"{self._stats['skipped_files'][-1]['path']}: "
                                f"{self._stats['skipped_files'][-1]['reason']}")
            got += done
        return self._assemble(got), cursor

    def _route(self, rec: VideoRecord) -> str:
        codec = canonical_codec(rec.codec)
        if self.data.decoder == "pyav" or not self._use_dali or rec.path in self._dali_bad:
            return "pyav"
        if self.data.decoder == "auto" and self.device.type == "cuda" and self._auto_gpu_mode is None:
            # The rule (docs/data.md, "Choosing the decoder"): PyAV in worker processes unless this GPU
            # has a measured DALI variant faster than PyAV (pipeline.AUTO_DALI_ON_GPU); the old
            # synchronous NVDEC path lost to PyAV. data.decoder=dali still forces NVDEC.
            if "auto-cuda" not in self._routes_logged:
                self._routes_logged.add("auto-cuda")
                log.info("data.decoder=auto on CUDA: PyAV decodes (%d workers), frames go to the GPU; no DALI "
                         "variant is measured faster on this GPU (docs/data.md); data.decoder=dali selects NVDEC",
                         self.data.num_threads)
            return "pyav"
        if dali_can_decode(codec, self.device):
            if codec not in self._routes_logged:
                self._routes_logged.add(codec)
                log.info("codec %s: decoded by DALI (%s)", codec, "NVDEC" if self.device.type == "cuda" else "CPU")
            return "dali"
        if self.data.decoder == "dali":
            raise UserError(f"data.decoder=dali: {rec.path} is {codec or 'of unknown codec'}, which DALI cannot "
                            f"decode on {self.device.type}; use data.decoder=auto")
        if codec not in self._routes_logged:
            self._routes_logged.add(codec)
            log.info("codec %s: DALI cannot decode it on %s; those files use PyAV", codec, self.device.type)
        return "pyav"

    def _decode(self, works: list[_Work]) -> list[tuple[_Work, torch.Tensor, torch.Tensor]]:
        """Decode ``works``; returns the successes in order as (work, frames, where): frames (U, H, W, 3)
        uint8 on the device, where (K*(2T+2F),) long: row of ``frames`` for each of ``w.all_frames()``."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        dali, pyav = [], []
        for w in works:
            if w.record.path in self._bad:
                self._skip(w, f"{self._bad[w.record.path]} (failed before)", quiet=True)
            else:
                (dali if self._route(w.record) == "dali" else pyav).append(w)
        futures = [(w, self._ahead.pop(w.position, None) or self._submit_pyav(w)) for w in pyav]
        if dali:
            self._dali_batch(dali, out)
        for w, fut in futures:
            try:
                out[w.position] = self._from_pyav(self._pyav_result(w, fut))
                self._count("pyav_samples")
            except DecodeError as e:
                self._fail(w, f"PyAV: {e}")
        return [(w, *out[w.position]) for w in works if w.position in out]

    def _work(self, pos: int) -> _Work:
        """The sample at epoch position ``pos``: its candidates' specs and their video."""
        specs = self.sampler.specs(pos)
        return _Work(pos, specs, self.records[specs[0].video_idx])

    def _submit_ahead(self, start: int) -> None:
        """Start decoding the next batch's PyAV samples (positions ``start`` to ``start + batch_size``)
        now, so the workers never idle while this batch's stragglers finish and it is assembled and
        uploaded. A refill after skips uses the same positions, so nothing is decoded twice."""
        end = min(start + self.data.batch_size, len(self) * self.data.batch_size)
        for pos in range(start, end):
            if pos in self._ahead:
                continue
            w = self._work(pos)
            if w.record.path not in self._bad and self._route(w.record) == "pyav":
                self._ahead[pos] = self._submit_pyav(w)

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.data.num_threads, thread_name_prefix="pyav-decode",
                                            initializer=_one_torch_thread)
        return self._pool

    def _pyav_pool(self) -> Executor:
        """Where PyAV decodes: worker processes or the loader's threads (``data.pyav_workers``)."""
        if self._procs is not None:
            return self._procs
        mode = self.data.pyav_workers
        if mode == "auto":
            mode = "processes" if self.device.type == "cuda" else "threads"
        if mode == "threads":
            return self._workers()
        # forkserver: never fork a process that holds CUDA state; the workers import PyAV + numpy only
        self._procs = ProcessPoolExecutor(self.data.num_threads, mp_context=multiprocessing.get_context("forkserver"),
                                          initializer=ignore_sigint)
        log.info("PyAV decodes in %d worker processes", self.data.num_threads)
        return self._procs

    def _submit_pyav(self, w: _Work) -> Future:
        if self.sampler.repeat > 1:
            return self._submit_group(w)
        args = self._pyav_args(w)
        try:
            return self._pyav_pool().submit(decode_frames_counted, *args, threads=1)
        except BrokenProcessPool:             # a worker died since the last batch
            self._restart_procs()
            return self._pyav_pool().submit(decode_frames_counted, *args, threads=1)

    def _submit_group(self, w: _Work) -> Future:
        """Repeated sampling (data.repeat_samples): one PyAV sweep over the union of the frames of the
        group holding ``w`` (``ClipSampler.group``), shared by every member's future; each member takes
        its part in :meth:`_pyav_result`."""
        g = self.sampler.group(w.position)
        fut = self._groups.get(g.start)
        if fut is None or fut.cancelled():
            args = (w.record.path, [self._work(p).all_frames() for p in g], tuple(self.data.frame_size))
            try:
                fut = self._pyav_pool().submit(decode_group_counted, *args, threads=1)
            except BrokenProcessPool:         # a worker died since the last batch
                self._restart_procs()
                fut = self._pyav_pool().submit(decode_group_counted, *args, threads=1)
            self._groups[g.start] = fut
            while len(self._groups) > 4 * self.data.batch_size:   # oldest first: long consumed
                self._groups.pop(next(iter(self._groups)))
        return fut

    def _pyav_result(self, w: _Work, fut: Future) -> np.ndarray:
        try:
            frames, cost = fut.result()
            if isinstance(frames, list):      # a repeated-sampling group: its cost once, this member's part
                if fut not in self._groups_counted:
                    self._groups_counted.add(fut)
                    self._count_pyav(cost)
                return frames[w.position - self.sampler.group(w.position).start]
            self._count_pyav(cost)
            return frames
        except BrokenProcessPool:             # a worker died while this sample was in flight
            self._restart_procs()
            return self._pyav_one(w)          # this sample retried in-process

    def _restart_procs(self) -> None:
        if self._procs is not None:           # e.g. killed, or a crash inside FFmpeg
            log.warning("a PyAV worker process died; starting a new pool")
            self._procs.shutdown(wait=False, cancel_futures=True)
            self._procs = None
            self._ahead = {}                  # submitted to the dead pool: decoded again on demand

    def _pyav_args(self, w: _Work) -> tuple:
        return w.record.path, w.all_frames(), tuple(self.data.frame_size)

    def _pyav_one(self, w: _Work) -> np.ndarray:
        """Decode ``w`` in this process (fallbacks; the batch path goes through :meth:`_submit_pyav`)."""
        frames, cost = decode_frames_counted(*self._pyav_args(w), threads=1)
        self._count_pyav(cost)
        return frames

    def _count_pyav(self, cost: dict) -> None:
        with self._lock:
            for k in ("requested", "wanted", "decoded"):
                self._stats[f"pyav_frames_{k}"] += cost[k]
            self._stats["pyav_seeks"] += cost["seeks"]
            self._stats["pyav_cpu_seconds"] += cost["cpu_seconds"]

    def _dali_source(self, cursor: int) -> DecoderSource | ReaderSource | None:
        """This iteration's DALI look-ahead (None without DALI): ``data.prefetch`` batches in flight
        from ``cursor`` on, the engine chosen by ``data.dali_mode``."""
        if not self._use_dali:
            return None
        bsz, depth = self.data.batch_size, max(2, self.data.prefetch)
        limit = len(self) * bsz

        def lookup(pos: int) -> _Work | None:
            w = self._work(pos)
            ok = w.record.path not in self._bad and self._route(w.record) == "dali"
            return w if ok else None

        if self._dali is None:
            self._dali = DaliDecoder(bsz, tuple(self.data.frame_size), self.data.num_threads, self.device,
                                     seed=self.data.seed, executor=self._workers(), depth=depth)
        group_of = self.sampler.group             # repeated sampling: a group is one DALI sample
        if self._dali_mode == "decoder":
            return DecoderSource(self._dali, lookup, bsz, limit, group_of=group_of)
        legacy = self._dali_mode == "legacy"
        # legacy: a window is one sequence on the grid of gcd(frame_stride, flow_gap) from its start
        g = math.gcd(self.data.frame_stride, self.data.flow_gap)
        seq = ((clip_span(self.data) - 1) // g + 1, g) if legacy else (1, 1)

        def make(jobs) -> DaliFrameReader:
            return DaliFrameReader(jobs, tuple(self.data.frame_size), self.device,
                                   readers=self.data.num_threads, frames_per_run=max(1, _READER_FRAMES_PER_RUN // seq[0]),
                                   depth=depth, num_threads=1, seed=self.data.seed,
                                   op="legacy" if legacy else "experimental", seq=seq)
        chunk = _READER_CHUNK_BATCHES * bsz * self.sampler.repeat
        if not legacy:
            return ReaderSource(make, lookup, chunk=chunk, limit=limit, group_of=group_of)
        src = ReaderSource(make, lookup, chunk=chunk, limit=limit, to_job=window_jobs(*seq), group_of=group_of)
        # groups with a window the legacy reader cannot express (it wraps): fn.decoders.video, alongside
        src.fallback = DecoderSource(self._dali, lambda p: lookup(p) if src.refused(p) else None, bsz, limit,
                                     group_of=group_of)
        return src

    def _dali_counters(self, closing: bool = False) -> None:
        """Fold the DALI engines' run counters into the stats (readers live for one iteration)."""
        readers = self._src.readers if isinstance(self._src, ReaderSource) else []
        engines = readers + ([self._dali] if self._dali is not None else [])
        with self._lock:
            st = self._stats
            st["dali_max_in_flight"] = max([st["dali_max_in_flight"]] + [e.max_in_flight for e in engines])
            st["dali_runs"] = self._reader_runs + sum(e.runs for e in engines)
            frames = self._src.frames_requested if self._src is not None else 0
            st["dali_frames_requested"] = self._dali_frames + frames
            if closing:
                self._reader_runs += sum(e.runs for e in readers)
                self._dali_frames += frames
                if isinstance(self._src, ReaderSource):
                    st["dali_reader_fallbacks"] += self._src.fallback_samples

    def _dali_batch(self, works: list[_Work], out: dict) -> None:
        """Collect ``works`` from this iteration's DALI look-ahead; a sample whose run failed is decoded
        again alone (which finds the damaged file), then with PyAV."""
        for w in works:
            try:
                frames, inv = self._src.take(w)
            except OSError as e:
                self._fail(w, str(e))
                continue
            except DaliDecodeError as e:
                self._count("dali_rebuilds")
                self._dali_single(w, str(e), out)
                continue
            out[w.position] = (frames, torch.from_numpy(inv).to(frames.device))
            self._count("dali_samples")
        self._dali_counters()

    def _dali_single(self, w: _Work, reason: str, out: dict) -> None:
        if self._dali_one is None:
            self._dali_one = DaliDecoder(1, tuple(self.data.frame_size), 1, self.device, seed=self.data.seed)
        uniq, inv = np.unique(w.all_frames(), return_inverse=True)
        try:
            (frames,) = self._dali_one.decode([np.fromfile(w.record.path, dtype=np.uint8)], [uniq])
        except OSError as e:
            self._fail(w, f"cannot read: {e.strerror or e}")
            return
        except DaliDecodeError as e:
            self._count("dali_rebuilds")
            self._dali_fallback(w, f"{reason}; alone: {e}" if reason != str(e) else reason, out)
            return
        out[w.position] = (frames, torch.from_numpy(inv).to(frames.device))
        self._count("dali_samples")

    def _dali_fallback(self, w: _Work, reason: str, out: dict) -> None:
        """DALI failed on this sample: its file goes to PyAV from now on; try PyAV right away."""
        self._dali_bad.add(w.record.path)
        log.warning("DALI could not decode %s (%s); trying PyAV for this file", w.record.path, reason)
        try:
            out[w.position] = self._from_pyav(self._pyav_one(w))
            self._count("pyav_samples")
        except DecodeError as e:
            self._fail(w, f"DALI: {reason}; PyAV: {e}")

    # ------------------------------------------------------------------ helpers
    def _from_pyav(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """PyAV output (already in ``all_frames()`` order) -> (frames on the device, identity rows)."""
        t = torch.from_numpy(frames)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t, torch.arange(len(frames), device=self.device)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _fail(self, w: _Work, reason: str) -> None:
        self._bad[w.record.path] = reason
        self._skip(w, reason)

    def _skip(self, w: _Work, reason: str, quiet: bool = False) -> None:
        with self._lock:
            self._stats["skipped"] += 1
            self._stats["skipped_files"].append({"path": w.record.path, "reason": reason})
        (log.debug if quiet else log.warning)("skipped a sample of %s: %s", w.record.path, reason)

    def _assemble(self, got: list[tuple[_Work, torch.Tensor, torch.Tensor]]) -> ClipBatch:
        """Gather each sample's frames straight into the batch tensors (one copy per delivered frame),
        HWC -> CHW on the way: (B*K, T or F, 3, H, W) uint8, candidate c of sample b at row b*K + c."""
        t, f, k = self.data.frames_per_clip, len(self.steps), self.sampler.candidates
        (h, w), n, dev = self.data.frame_size, len(got) * k, self.device
        per = 2 * t + 2 * f          # rows of ``where`` per candidate
        parts = {"rgb_a": slice(0, t), "rgb_b": slice(t, 2 * t), "partner_a": slice(2 * t, 2 * t + f),
                 "partner_b": slice(2 * t + f, per)}
        out = {name: torch.empty((n, sl.stop - sl.start, 3, h, w), dtype=torch.uint8, device=dev)
               for name, sl in parts.items()}
        for b, (_, frames, where) in enumerate(got):
            src = frames.permute(0, 3, 1, 2)
            for c in range(k):
                for name, sl in parts.items():
                    rows = where[c * per + sl.start:c * per + sl.stop]
                    torch.index_select(src, 0, rows, out=out[name][b * k + c])
        specs = [s for wk, _, _ in got for s in wk.specs]
        idx = lambda name: torch.from_numpy(np.stack([getattr(s, name) for s in specs])).to(dev)  # noqa: E731
        return ClipBatch(
            **out, flow_steps=self.steps.to(dev), frames_a=idx("frames_a"), frames_b=idx("frames_b"),
            partners_a=idx("partners_a"), partners_b=idx("partners_b"),
            labels=torch.tensor([wk.record.label for wk, _, _ in got for _ in wk.specs], dtype=torch.long,
                                device=dev),
            video_idx=torch.tensor([s.video_idx for s in specs], dtype=torch.long, device=dev), candidates=k)


def build_loader(cfg: Config, records: list[VideoRecord], *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> ClipLoader:
    """The training loader of one rank: a :class:`ClipSampler` over ``records`` and the decode paths.

    Raises:
        UserError: no records, or ``data.decoder=dali`` with a codec DALI cannot decode on ``device``.
    """
    device = torch.device(device)
    if cfg.data.dali_mode == "legacy" and cfg.data.decoder != "pyav" and device.type != "cuda":
        raise UserError("data.dali_mode=legacy: fn.readers.video decodes on the GPU only; use data.dali_mode=reader "
                        "or decoder on CPU")
    if cfg.data.dali_mode != "decoder" and cfg.data.decoder != "pyav":
        spaced = [r.path for r in records if any(c.isspace() for c in r.path)]
        if spaced:
            raise UserError(f"data.dali_mode={cfg.data.dali_mode}: {len(spaced)} paths contain whitespace (e.g. "
                            f"{spaced[0]!r}), which DALI's file lists cannot hold; use data.dali_mode=decoder")
    sampler = ClipSampler(records, cfg.data, rank=rank, world_size=world_size, seed=cfg.data.seed)
    if cfg.data.decoder == "dali":
        bad = [r for r in records if not dali_can_decode(r.codec, device)]
        if bad:
            raise UserError(f"data.decoder=dali: {len(bad)} videos (e.g. {bad[0].path}, codec {bad[0].codec!r}) "
                            f"cannot be decoded by DALI on {device.type}; use data.decoder=auto")
    return ClipLoader(sampler, cfg.data, device)
