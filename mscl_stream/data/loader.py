"""Streaming clip loader: ClipSampler -> decode (DALI or PyAV per file) -> ClipBatch on the device.

A background thread decodes the next batches (at most ``data.prefetch`` finished batches wait in a
queue, plus the one being built) while the training loop consumes the current one. DALI work is
submitted by position ahead of that (:mod:`mscl_stream.data.dali.source`): ``max(2, data.prefetch)``
pipeline runs in flight, with ``data.dali_mode`` choosing ``fn.decoders.video`` or per-frame reader
lists (:mod:`mscl_stream.data.dali`); PyAV work is submitted one batch ahead. Each file goes to
DALI where DALI decodes its codec on the current device (CPU: VP8/VP9/MJPEG; CUDA: also H.264, HEVC,
AV1, MPEG-4), else to a pool of PyAV worker threads (PyAV releases the GIL while decoding); both run
at the same time for a mixed batch. ``data.decoder`` = "dali" / "pyav" forces one path. On CUDA,
``auto`` means PyAV, in worker processes (``data.pyav_workers``), until a DALI engine is measured
faster on that GPU (see :meth:`ClipLoader._route`; measurements in benchmarks/README.md). The loader
routes samples and assembles batches; the decodes run in :mod:`mscl_stream.data.decode_jobs`.

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
import logging
import queue
from contextlib import nullcontext
import threading
import time
import weakref
from typing import Iterator

import numpy as np
import torch

from mscl_stream.config import Config, DataConfig
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.dali import auto_dali_mode_on_gpu, canonical_codec, dali_available, dali_can_decode
from mscl_stream.data.decode_jobs import DaliJobs, DecodeStats, PyAVJobs, Work, one_torch_thread
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.pyav_decode import DecodeError
from mscl_stream.data.sampler import ClipSampler, flow_steps
from mscl_stream.errors import UserError

log = logging.getLogger(__name__)
_END = object()
_LIVE: "weakref.WeakSet[ClipLoader]" = weakref.WeakSet()


def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


# Stop prefetch threads at interpreter exit before thread pools refuse work and DALI tears its
# pipelines down (both would otherwise fail under a still-running producer). concurrent.futures uses
# this same hook; handlers run last-registered first, so this one runs before the pools shut down.
getattr(threading, "_register_atexit", atexit.register)(_close_live_loaders)


class ClipLoader:
    """Iterable over :class:`ClipBatch` (``data.batch_size`` samples, already on ``device``; with MDS
    ``online`` each sample is ``data.mds_candidates`` adjacent rows).

    One iteration covers the rest of the current epoch; call :meth:`set_epoch` before each epoch.
    Frames of at most ``prefetch + 2`` batches are alive at once (the queue, the batch being built and
    the one being consumed). Starting a new iteration ends an older, unfinished one.

    Args:
        sampler: the rank's :class:`ClipSampler` (its position is kept in step with consumed batches).
        data: loader settings (batch_size, frame_size, decoder, decode_workers, prefetch).
        device: where batches are delivered; CUDA also selects DALI's NVDEC decoder.
    """

    def __init__(self, sampler: ClipSampler, data: DataConfig, device: torch.device) -> None:
        self.sampler, self.data, self.device = sampler, data, torch.device(device)
        self.records = sampler.records
        self.steps = torch.from_numpy(flow_steps(data))
        self._batch = 0                       # batches consumed in the current epoch
        self._resumed = False
        self._stats = DecodeStats()
        self._routes_logged: set[str] = set()
        self._active: tuple[threading.Event, threading.Thread] | None = None
        self._use_dali = data.decoder != "pyav" and dali_available()
        # data.decoder=auto on a GPU: the DALI engine measured faster than PyAV there, if any
        self._auto_gpu_mode = auto_dali_mode_on_gpu(torch.cuda.get_device_name(self.device)) \
            if data.decoder == "auto" and self.device.type == "cuda" else None
        self._pyav = PyAVJobs(data, self.device, sampler, self._work, self._stats)
        self._dali = DaliJobs(data, self.device, sampler, self._auto_gpu_mode or data.dali_mode, self._stats,
                              self._pyav)
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
        return self._stats.snapshot()

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
                    item = None
                if stop.is_set():                 # a newer iterator or set_epoch took over: end here, and
                    return                        # hand out nothing already queued (the new one decodes it)
                if item is None:
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
                self._stats.add("batches")
                self._stats.add("samples", batch.batch_size // batch.candidates)
                yield batch
        finally:
            if self._active is not None and self._active[0] is stop:
                self._stop_active()               # only its own producer: not one that took over since
            else:
                stop.set()

    def _stop_active(self) -> None:
        if self._active is None:
            return
        stop, th = self._active
        stop.set()
        th.join()
        self._active = None

    def worker_pids(self) -> list[int]:
        """Process ids of the PyAV worker processes now running (empty with ``pyav_workers: threads``)."""
        return self._pyav.worker_pids()

    def close(self) -> None:
        """Stop the prefetch thread and release DALI and the PyAV workers."""
        self._stop_active()
        self._pyav.close()
        self._dali.close()

    def _produce(self, cursor: int, batch_no: int, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        self._pyav.ahead = {}
        one_torch_thread()
        try:
            if self._use_dali:
                self._dali.start(self._dali_work, len(self) * self.data.batch_size)
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
                self._stats.add("decode_seconds", time.perf_counter() - t0)
                if not put((batch, cursor)):
                    return
            put(_END)
        except BaseException as e:          # surfaces in the consuming thread
            put(e)
        finally:
            self._pyav.cancel_ahead()
            self._dali.end()

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
                                f"{self._stats.counts['skipped_files'][-1]['path']}: "
                                f"{self._stats.counts['skipped_files'][-1]['reason']}")
            got += done
        return self._assemble(got), cursor

    def _route(self, rec: VideoRecord) -> str:
        codec = canonical_codec(rec.codec)
        if self.data.decoder == "pyav" or not self._use_dali or rec.path in self._stats.dali_bad:
            return "pyav"
        if self.data.decoder == "auto" and self.device.type == "cuda" and self._auto_gpu_mode is None:
            # The rule (docs/data.md, "Choosing the decoder"): PyAV in worker processes unless this GPU
            # has a measured DALI variant faster than PyAV (AUTO_DALI_ON_GPU in data/dali); the old
            # synchronous NVDEC path lost to PyAV. data.decoder=dali still forces NVDEC.
            if "auto-cuda" not in self._routes_logged:
                self._routes_logged.add("auto-cuda")
                log.info("data.decoder=auto on CUDA: PyAV decodes (%d workers), frames go to the GPU; no DALI "
                         "variant is measured faster on this GPU (docs/data.md); data.decoder=dali selects NVDEC",
                         self.data.decode_workers)
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

    def _decode(self, works: list[Work]) -> list[tuple[Work, torch.Tensor, torch.Tensor]]:
        """Decode ``works``; returns the successes in order as (work, frames, where): frames (U, H, W, 3)
        uint8 on the device, where (K*(2T+2F),) long: row of ``frames`` for each of ``w.all_frames()``."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        dali, pyav = [], []
        for w in works:
            if w.record.path in self._stats.bad:
                self._stats.skip(w, f"{self._stats.bad[w.record.path]} (failed before)", quiet=True)
            else:
                (dali if self._route(w.record) == "dali" else pyav).append(w)
        futures = [(w, self._pyav.ahead.pop(w.position, None) or self._pyav.submit(w)) for w in pyav]
        if dali:
            self._dali.collect(dali, out)
        for w, fut in futures:
            try:
                out[w.position] = self._pyav.to_device(self._pyav.result(w, fut))
                self._stats.add("pyav_samples")
            except DecodeError as e:
                self._stats.fail(w, f"PyAV: {e}")
        return [(w, *out[w.position]) for w in works if w.position in out]

    def _work(self, pos: int) -> Work:
        """The sample at epoch position ``pos``: its candidates' specs and their video."""
        specs = self.sampler.specs(pos)
        return Work(pos, specs, self.records[specs[0].video_idx])

    def _dali_work(self, pos: int) -> Work | None:
        """The sample at ``pos`` where DALI decodes it, else None (DALI's look-ahead skips it)."""
        w = self._work(pos)
        ok = w.record.path not in self._stats.bad and self._route(w.record) == "dali"
        return w if ok else None

    def _submit_ahead(self, start: int) -> None:
        """Start decoding the next batch's PyAV samples (positions ``start`` to ``start + batch_size``)
        now, so the workers never idle while this batch's stragglers finish and it is assembled and
        uploaded. A refill after skips uses the same positions, so nothing is decoded twice."""
        end = min(start + self.data.batch_size, len(self) * self.data.batch_size)
        for pos in range(start, end):
            if pos in self._pyav.ahead:
                continue
            w = self._work(pos)
            if w.record.path not in self._stats.bad and self._route(w.record) == "pyav":
                self._pyav.ahead[pos] = self._pyav.submit(w)

    def _assemble(self, got: list[tuple[Work, torch.Tensor, torch.Tensor]]) -> ClipBatch:
        """Gather each sample's frames straight into the batch tensors (one copy per delivered frame),
        HWC -> CHW on the way: (B*K, T or F, 3, H, W) uint8, candidate c of sample b at row b*K + c."""
        t, f, k = self.data.frames_per_clip, len(self.steps), self.sampler.candidates
        (h, w), n, dev = self.data.frame_size, len(got) * k, self.device
        per = 2 * t + 2 * f          # rows of ``where`` per candidate
        parts = {"rgb_a": slice(0, t), "rgb_b": slice(t, 2 * t), "partner_rgb_a": slice(2 * t, 2 * t + f),
                 "partner_rgb_b": slice(2 * t + f, per)}
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
            **out, flow_steps=self.steps.to(dev), frame_idx_a=idx("frame_idx_a"), frame_idx_b=idx("frame_idx_b"),
            partner_idx_a=idx("partner_idx_a"), partner_idx_b=idx("partner_idx_b"),
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
