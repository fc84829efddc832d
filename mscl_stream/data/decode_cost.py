"""Decode cost per MSCL sample, measured one sample at a time on one core, for each decode path.

What a sample costs to decode is not what it asks for: a decoder reaches a wanted frame only by
decoding forward from the keyframe before it, so long keyframe intervals (GOP 250 in real datasets)
multiply the frames decoded. For each path this measures, per sample: frames requested and wanted
(unique), frames decoded (PyAV: counted from the decoder; DALI: the same keyframe sweep computed from
the packet index, :func:`~mscl_stream.data.pyav_decode.sweep_frames`, since DALI cannot report it),
amplification = decoded / wanted, CPU milliseconds (process CPU time: robust to other jobs on the
machine, unlike wall time) and wall milliseconds. Used by ``benchmarks/decode.py`` and
``mscl-stream bench`` (cores per GPU the PyAV path needs to feed the step).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.pyav_decode import decode_frames, frame_index, sweep_frames
from mscl_stream.data.sampler import SampleSpec


def _row(requested: int, wanted: int, decoded: int, seeks: int, cpu_s: float, wall_s: float,
         skipped: int = 0) -> dict:
    return {"requested": requested, "wanted": wanted, "decoded": decoded, "skipped": skipped, "seeks": seeks,
            "amplification": decoded / max(wanted, 1), "cpu_ms": 1e3 * cpu_s, "wall_ms": 1e3 * wall_s}


def pyav_costs(records: list[VideoRecord], specs: list[SampleSpec], size: tuple[int, int] | None,
               skip_unreferenced: bool = True) -> list[dict]:
    """Decode every spec with ``decode_frames`` (one thread) and return one cost row per sample
    (``skip_unreferenced=False``: every frame of the sweep decoded, the plain forward decoder's cost).

    The process should run nothing else meanwhile: CPU time is the whole process's. Each file's packet
    index is read once before timing (the loader caches it too).
    """
    rows = []
    for s in specs:
        path = records[s.video_idx].path
        frame_index(path)
        st: dict = {}
        c0, w0 = time.process_time(), time.perf_counter()
        decode_frames(path, s.all_frames(), size, threads=1, stats=st, skip_unreferenced=skip_unreferenced)
        rows.append(_row(st["requested"], st["wanted"], st["decoded"], st["seeks"], time.process_time() - c0,
                         time.perf_counter() - w0, st["skipped"]))
    return rows


def dali_cpu_costs(records: list[VideoRecord], specs: list[SampleSpec], size: tuple[int, int]) -> list[dict]:
    """Decode every spec with the project's DALI decoder on the CPU (batch 1, one thread), one cost row
    per sample; frames decoded are the keyframe-sweep model (DALI does not report them).

    VP8/VP9/MJPEG files only (DALI's CPU decoders). Needs nvidia-dali.
    """
    import torch

    from mscl_stream.data.dali.decoder import DaliDecoder

    dec = DaliDecoder(1, tuple(size), 1, torch.device("cpu"))
    rows = []
    try:
        warm = specs[0]
        dec.decode([np.fromfile(records[warm.video_idx].path, np.uint8)], [np.unique(warm.all_frames())])
        for s in specs:
            path = records[s.video_idx].path
            enc, want = np.fromfile(path, np.uint8), np.unique(s.all_frames())
            decoded, seeks = sweep_frames(frame_index(path), want)
            c0, w0 = time.process_time(), time.perf_counter()
            dec.decode([enc], [want])
            rows.append(_row(len(s.all_frames()), len(want), decoded, seeks, time.process_time() - c0,
                             time.perf_counter() - w0))
    finally:
        dec.close()
    return rows


def summarize(rows: list[dict]) -> dict:
    """Medians over samples, plus the per-core rates they imply: ``samples_per_cpu_s`` = samples one
    fully used core decodes per second (1000 / median CPU ms), ``samples_per_s`` the same from wall time."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"samples": len(rows), **{f"median_{k}": v for k, v in med.items()},
            "mean_amplification": sum(r["decoded"] for r in rows) / max(sum(r["wanted"] for r in rows), 1),
            "samples_per_cpu_s": 1e3 / med["cpu_ms"], "samples_per_s": 1e3 / med["wall_ms"]}


def pyav_group_costs(records: list[VideoRecord], groups: list[list[SampleSpec]], size: tuple[int, int],
                     skip_unreferenced: bool = True) -> list[dict]:
    """Repeated sampling: each group (R samples of one video) decoded in one sweep over the union of its
    frames; one row per group with per-sample values (CPU and wall time divided by R, frames summed over
    the group's samples, so amplification = decoded / wanted of the whole group)."""
    rows = []
    for g in groups:
        path = records[g[0].video_idx].path
        frame_index(path)
        st: dict = {}
        c0, w0 = time.process_time(), time.perf_counter()
        decode_frames(path, np.concatenate([s.all_frames() for s in g]), size, threads=1, stats=st,
                      skip_unreferenced=skip_unreferenced)
        r = len(g)
        row = _row(st["requested"], st["wanted"], st["decoded"], st["seeks"], (time.process_time() - c0) / r,
                   (time.perf_counter() - w0) / r, st["skipped"])
        rows.append({**row, "repeat": r})
    return rows
