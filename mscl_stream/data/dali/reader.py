"""DaliFrameReader: many samples' frames through DALI's video readers and per-sample file lists.

Two readers, both given lists of ``path slot start end`` lines (frame numbers):

* ``fn.experimental.readers.video`` (``op="experimental"``, CPU or GPU; ``data.dali_mode=reader``),
  one line per wanted frame (``file_list_format="frames"``, sequence length 1). A reader keeps its
  decoder open while consecutive lines name the same file and caches every file's frame index for the
  process, so each sample (its sorted frames) is one forward sweep of one decoder, and only wanted
  frames are converted and resized.
* ``fn.readers.video`` (``op="legacy"``, GPU only; ``data.dali_mode=legacy``), one line per window:
  a fixed-length sequence at a fixed stride (every wanted frame of an MSCL window lies on the
  stride-``gcd(frame_stride, flow_gap)`` grid from its start). It keeps files open but seeks and
  flushes NVDEC for every sequence, and cannot express a window that wraps around the video's end
  (those samples go elsewhere, see :mod:`mscl_stream.data.dali.source`).

Samples are dealt round-robin to P readers (each decodes in its own background thread; consecutive
samples of one file stay on one reader, which keeps its decoder open); the pipeline's
batch is ``frames_per_run`` lines of every reader, and ``depth`` runs are scheduled ahead
(:mod:`mscl_stream.data.dali.pipeline`: the scheduling and the geometry shared with the decoder).

A line's label is its slot: the reader's position in its list. Readers deliver their lines in list
order, so a slot that jumps ahead means the reader dropped lines at build time (it drops files it
cannot open, with a line on stderr): those samples fail. A run that raises (a file damaged after the
build) invalidates the pipeline: the sample each unfinished reader was on fails, and the samples not
yet complete are read again by a fresh pipeline. Failed samples raise :class:`DaliDecodeError` from
:meth:`DaliFrameReader.result`; the caller decides what to do with them (the loader retries them
alone, then with PyAV).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
import torch

from mscl_stream.data.dali.pipeline import (DALI_ERRORS, DaliDecodeError, RunCounts, build_pipeline, error_line,
                                            fit_in_graph, resize_owned, to_torch_cuda)


def _host(tensor_list):
    """A DALI TensorList in host memory (``as_cpu`` for GPU lists)."""
    return tensor_list.as_cpu() if hasattr(tensor_list, "as_cpu") else tensor_list


@dataclass
class FrameJob:
    """One sample: ``frames`` sorted unique raw indices of the video at ``path``.

    ``starts`` (legacy reader): the start frame of each sequence line; ``rows[k]`` is the row of
    wanted frame k in the concatenated sequences. Without ``starts`` every frame is its own line.
    """

    key: Hashable
    path: str
    frames: np.ndarray
    starts: np.ndarray | None = None
    rows: np.ndarray | None = None
    got: list = field(default_factory=list)      # decoded lines so far, in order

    def lines(self) -> np.ndarray:
        return self.frames if self.starts is None else self.starts


def window_job(key: Hashable, path: str, frames: np.ndarray, windows: Sequence[np.ndarray], length: int,
               stride: int) -> FrameJob | None:
    """A legacy-reader job: each window (its sorted raw frames) as one sequence of ``length`` frames at
    ``stride`` from its first frame; None if some window is not on that grid (e.g. it wraps)."""
    starts = []
    for w in windows:
        off = np.asarray(w, np.int64) - int(w[0])
        if (off < 0).any() or (off % stride).any() or off.max() > (length - 1) * stride:
            return None
        starts.append(int(w[0]))
    grid = np.concatenate([s + stride * np.arange(length) for s in starts])
    rows = np.array([int(np.flatnonzero(grid == f)[0]) for f in frames])
    return FrameJob(key, path, np.asarray(frames), np.asarray(starts), rows)


class DaliFrameReader(RunCounts):
    """Decode ``jobs`` (in order) with P ``fn.experimental.readers.video`` readers, pipelined.

    Args:
        jobs: the samples; keys must be unique. Paths must not contain whitespace (the list format).
        frame_size: (H, W) output size (resize to cover, centre crop).
        device: CPU ("cpu" readers, FFmpeg: VP8/VP9/MJPEG) or CUDA ("gpu" readers, NVDEC).
        readers: P, parallel readers (at most one per job).
        frames_per_run: lines each reader delivers per pipeline run.
        op: "experimental" (``fn.experimental.readers.video``, one line per frame) or "legacy"
            (``fn.readers.video``, GPU only, jobs made by :func:`window_job` with ``seq``).
        seq: (length, stride) of the legacy reader's sequences.
        depth: runs scheduled ahead.
        num_threads: DALI's CPU thread pool (the readers decode in their own threads).
    """

    def __init__(self, jobs: Sequence[FrameJob], frame_size: tuple[int, int], device: torch.device,
                 readers: int = 2, frames_per_run: int = 64, depth: int = 2, num_threads: int = 1,
                 seed: int = 0, op: str = "experimental", seq: tuple[int, int] = (1, 1)) -> None:
        if op not in ("experimental", "legacy") or (op == "legacy" and torch.device(device).type != "cuda"):
            raise ValueError(f"DaliFrameReader: op {op!r} on {device}: legacy needs CUDA")
        super().__init__()
        self.op, self.seq = op, (1, 1) if op == "experimental" else tuple(seq)
        self.frame_size, self.device = tuple(frame_size), torch.device(device)
        self.readers, self.frames_per_run = max(1, int(readers)), max(1, int(frames_per_run))
        self.depth, self.num_threads, self.seed = max(1, int(depth)), num_threads, seed
        self.jobs = {j.key: j for j in jobs}
        if len(self.jobs) != len(jobs):
            raise ValueError("DaliFrameReader: job keys must be unique")
        for j in jobs:
            if any(c.isspace() for c in j.path):
                raise ValueError(f"{j.path}: whitespace in the path cannot go into a DALI file list")
        self._order = {k: i for i, k in enumerate(self.jobs)}
        self.failed: dict[Hashable, str] = {}
        self.done: set[Hashable] = set()
        self.lines = 0                            # lines written to lists (decoded frames requested)
        self._tmp = tempfile.TemporaryDirectory(prefix="mscl-dali-lists-")
        self._start([j.key for j in jobs])

    # ------------------------------------------------------------------ build
    def _start(self, keys: list) -> None:
        """A fresh pipeline over the jobs ``keys`` (in order); their partial results are discarded."""
        self._pipe, self._scheduled, self._consumed = None, 0, 0
        keys = [k for k in keys if k not in self.failed and k not in self.done]
        for k in keys:
            self.jobs[k].got = []
        p = min(self.readers, len(keys))
        if p == 0:
            self._lists, self._total = [], 0
            return
        # slot lists: per reader, (key, frame) in order; samples dealt round-robin, except that a sample
        # of the same file as the one before stays on its reader (whose decoder is still open there)
        self._lists = [[] for _ in range(p)]
        r, prev = -1, None
        for k in keys:
            job = self.jobs[k]
            if job.path != prev:
                r, prev = (r + 1) % p, job.path
            self._lists[r] += [(k, int(f)) for f in job.lines()]
        self._lists = [lst for lst in self._lists if lst]          # one file only: fewer readers
        p = len(self._lists)
        self._next = [0] * p                      # next expected slot per reader
        self._total = max(-(-len(lst) // self.frames_per_run) for lst in self._lists)
        files, span = [], 1 + (self.seq[0] - 1) * self.seq[1]     # end frame exclusive
        for r, lst in enumerate(self._lists):
            path = os.path.join(self._tmp.name, f"list{self.rebuilds}_{r}.txt")
            with open(path, "w") as f:
                f.writelines(f"{self.jobs[k].path} {s} {fr} {fr + span}\n" for s, (k, fr) in enumerate(lst))
            files.append(path)
        self.lines += sum(len(lst) for lst in self._lists)
        try:
            self._pipe = self._build(files)
        except DALI_ERRORS as e:                   # e.g. no line of some list survived the build
            for k in keys:
                self.failed[k] = f"DALI reader: {error_line(e)}"
            self._lists, self._total = [], 0
            return
        while self._scheduled < min(self.depth, self._total):
            self._schedule()

    def _build(self, files: list[str]):
        """A pipeline with one reader per list file; per reader its outputs (frames, slots, frame numbers)."""
        def graph():
            from nvidia.dali import fn
            outs = []
            for r, path in enumerate(files):
                if self.op == "legacy":
                    video, slot, frame = fn.readers.video(
                        device="gpu", file_list=path, file_list_frame_num=True, sequence_length=self.seq[0],
                        stride=self.seq[1], step=1 << 20, random_shuffle=False, enable_frame_num=True,
                        name=f"windows{r}")
                else:
                    video, slot, frame = fn.experimental.readers.video(
                        device="gpu" if self.device.type == "cuda" else "cpu", file_list=path,
                        file_list_format="frames", file_list_include_end=False, sequence_length=1, stride=1,
                        step=1, random_shuffle=False, pad_mode="none", enable_frame_num=True, name=f"frames{r}")
                outs += [fit_in_graph(video, self.frame_size, self.device), slot, frame]
            return tuple(outs)

        return build_pipeline(graph, self.frames_per_run, self.num_threads, self.device, self.seed, self.depth)

    def _schedule(self) -> None:
        self._pipe.schedule_run()
        self._scheduled += 1
        self.count_run(self._scheduled - self._consumed)

    # ------------------------------------------------------------------ results
    def result(self, key: Hashable) -> torch.Tensor:
        """The job's frames: (U, H, W, 3) uint8 on the device, row k = raw frame ``frames[k]``.

        Raises:
            DaliDecodeError: the job failed (unreadable or damaged file, dropped by the reader).
            KeyError: not a job of this reader.
        """
        job = self.jobs[key]
        while key not in self.done and key not in self.failed:
            self._pull()
        if key in self.failed:
            raise DaliDecodeError(self.failed[key])
        if self.device.type == "cuda":
            frames = torch.cat(job.got)
            if job.rows is not None:
                frames = frames[torch.from_numpy(job.rows).to(frames.device)]
        else:
            full = np.concatenate(job.got)
            frames = resize_owned(full if job.rows is None else full[job.rows], self.frame_size)
        job.got = []
        return frames

    def _pull(self) -> None:
        if self._pipe is None or self._consumed >= self._total:
            # nothing in flight yet the job is incomplete: its lines were never delivered
            for k in self._incomplete():
                self.failed[k] = "DALI reader: frames never delivered"
            return
        try:
            outs = self._pipe.outputs()
        except DALI_ERRORS as e:
            self._restart(error_line(e))
            return
        self._consumed += 1
        if self._scheduled < self._total:
            self._schedule()
        for r in range(len(self._lists)):
            video, slots, frames = outs[3 * r:3 * r + 3]
            if self.device.type == "cuda":
                batch = to_torch_cuda(video.as_tensor(), self.device)
                rows = [batch[i] for i in range(len(slots))]
            else:
                rows = [np.array(video[i]) for i in range(len(slots))]       # (frames, h, w, 3) copies
            # GPU readers give their labels and frame numbers on the device too
            slot_ids = np.asarray(_host(slots).as_tensor()).reshape(-1)
            frame_ids = np.asarray(_host(frames).as_tensor()).reshape(-1)
            for row, s, fr in zip(rows, slot_ids.tolist(), frame_ids.tolist()):
                self._deliver(r, s, fr, row)

    def _deliver(self, r: int, s: int, frame: int, row) -> None:
        lst, nxt = self._lists[r], self._next[r]
        if s < nxt or nxt >= len(lst):
            return                                # the reader wrapped around its list: not ours
        for k, _ in lst[nxt:s]:                   # lines the reader skipped: dropped at build
            if k not in self.done:
                self.failed.setdefault(k, "DALI reader dropped the file (cannot open it)")
        self._next[r] = s + 1
        key, want = lst[s]
        if key in self.failed:
            return
        if frame != want:                         # never expected; guards the slot bookkeeping
            self.failed[key] = f"DALI reader returned frame {frame} for {want}"
            return
        job = self.jobs[key]
        job.got.append(row)
        if len(job.got) == len(job.lines()):
            self.done.add(key)

    def _incomplete(self) -> list:
        seen, out = set(), []
        for lst in self._lists:
            for k, _ in lst:
                if k not in seen and k not in self.done and k not in self.failed:
                    seen.add(k)
                    out.append(k)
        return out

    def _restart(self, reason: str) -> None:
        """A run failed: the sample each unfinished reader was on fails; the rest is read again."""
        self.rebuilds += 1
        for r, lst in enumerate(self._lists):
            if self._next[r] < len(lst):
                key = lst[self._next[r]][0]
                if key not in self.done:
                    self.failed[key] = f"DALI reader: {reason}"
        rest = sorted(self._incomplete(), key=self._order.__getitem__)
        self._start(rest)

    def close(self) -> None:
        self._pipe = None
        self._tmp.cleanup()
