"""`mscl-stream transcode`: re-encode a video dataset to the working size and a chosen keyframe interval.

Decode cost per training sample grows with the pixels per frame and with the frames decoded from the
keyframe before each wanted frame (docs/data.md), so storing a dataset at the short side training
uses (e.g. 256 or 320 for Kinetics) with shorter keyframe intervals saves decode time on every epoch,
for both decode paths. The output is video again (never extracted frames or flow), with the folder
layout of the source, so `mscl-stream index DST` works on it as on the source.

Contract:
- Every file below SRC with a video suffix is transcoded to ``DST/<same relative path>`` with the
  codec's suffix (.mp4 for H.264/HEVC, .webm for VP9); other files are listed as skipped. Frames are
  resized so the short side is ``short_side`` (never upscaled; sizes even), re-timed at the source's
  average frame rate (a variable-rate source becomes constant-rate), audio dropped.
- Resumable: an output that exists is complete (outputs are written to a temporary name and renamed
  when finished), so it is skipped; rerunning after an interruption does only the rest.
- Parallel: ``workers`` processes, one file each; a file that fails (unreadable, damaged, no video
  stream, no frames) is reported with its reason and its partial output removed; a worker that
  crashes is replaced and its file retried once.
- ``DST/transcode.report.json`` lists what was done, skipped and failed. Bad arguments, or every file
  failing, end as a one-line UserError (exit 2); partial failures do not.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from pathlib import Path

from mscl_stream.errors import UserError
from mscl_stream.progress import Progress

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ogv",
                  ".wmv", ".ts"}
# codec -> (FFmpeg encoder, suffix, encoder options): x264/x265 `medium` as datasets are usually stored
_ENCODERS = {
    "h264": ("libx264", ".mp4", {"preset": "medium", "crf": "23"}),
    "hevc": ("libx265", ".mp4", {"preset": "medium", "crf": "28", "x265-params": "log-level=error"}),
    "vp9": ("libvpx-vp9", ".webm", {"deadline": "good", "cpu-used": "4", "crf": "32", "b": "0", "row-mt": "1"}),
}


# encoding -> encoder parameters added per codec. "sparse": the B-frames are never references (no
# B-pyramid) and always placed (no adaptive choice), so a decoder that skips unreferenced frames decodes
# only the I/P chain up to a wanted frame (docs/data.md, "Encoding for sparse access"); "medium": the
# encoder's own B-frame decisions, as datasets are usually stored. VP9 has no such frames: both equal.
ENCODINGS = ("sparse", "medium")
_SPARSE_PARAMS = {"h264": ("x264-params", "b-pyramid=none:b-adapt=0:bframes=7"),
                  "hevc": ("x265-params", "b-pyramid=0:b-adapt=0:bframes=7")}


def encoder_options(codec: str, encoding: str = "sparse") -> dict[str, str]:
    """FFmpeg encoder options for ``codec`` stored with ``encoding`` (one of :data:`ENCODINGS`)."""
    options = dict(_ENCODERS[codec][2])
    if encoding == "sparse" and codec in _SPARSE_PARAMS:
        key, value = _SPARSE_PARAMS[codec]
        options[key] = f"{options[key]}:{value}" if key in options else value
    return options


def output_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side ``short_side`` (never larger than the source), aspect kept, both even."""
    s = min(1.0, short_side / min(h, w))
    return max(2, 2 * round(h * s / 2)), max(2, 2 * round(w * s / 2))


def transcode_file(src: str, dst: str, short_side: int, gop: int, codec: str = "h264",
                   encoder_threads: int = 0, encoding: str = "sparse") -> dict:
    """Transcode one file (worker). Returns {"path", "ok", "reason", "frames", "size", "seconds"}; the
    output appears at ``dst`` only when complete."""
    import av

    t0 = time.perf_counter()
    encoder = _ENCODERS[codec][0]
    options = encoder_options(codec, encoding)
    if encoder_threads and codec == "h264":
        options["threads"] = str(encoder_threads)
    dst_p = Path(dst)
    tmp = dst_p.with_name(f".{dst_p.stem}.part{os.getpid()}{dst_p.suffix}")
    res = {"path": src, "ok": False, "reason": None, "frames": 0, "size": None}
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                raise ValueError("no video stream")
            st = inp.streams.video[0]
            st.thread_type = "AUTO"
            rate = st.average_rate or st.guessed_rate or Fraction(25)
            rate = Fraction(rate).limit_denominator(1001)
            h, w = output_size(st.codec_context.height, st.codec_context.width, short_side)
            res["size"] = [h, w]
            dst_p.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(tmp), "w") as out:
                ost = out.add_stream(encoder, rate=rate, options=options)
                ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
                ost.codec_context.gop_size = gop
                ost.codec_context.time_base = 1 / rate
                n = 0
                for frame in inp.decode(st):
                    f = frame.reformat(width=w, height=h, format="yuv420p",
                                       interpolation="AREA" if h < frame.height else "BILINEAR")
                    f.pts, f.time_base = n, ost.codec_context.time_base
                    f.pict_type = 0     # unset: the encoder would otherwise copy the source's I/P/B types
                    for pkt in ost.encode(f):
                        out.mux(pkt)
                    n += 1
                for pkt in ost.encode():
                    out.mux(pkt)
        if n == 0:
            raise ValueError("no decodable frames")
        os.replace(tmp, dst_p)
        res.update(ok=True, frames=n)
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as e:
        res["reason"] = f"{type(e).__name__}: {e}"
    finally:
        tmp.unlink(missing_ok=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def transcode_dataset(src: str | os.PathLike, dst: str | os.PathLike, short_side: int, gop: int,
                      workers: int = 0, codec: str = "h264", encoding: str = "sparse") -> dict:
    """Transcode every video below ``src`` into ``dst`` (see the module docstring); returns the report."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (transcode takes a dataset folder)")
    if dst == src or src in dst.parents:
        raise UserError(f"{dst}: the output folder must not be the source or lie inside it")
    if short_side < 16:
        raise UserError(f"--short-side {short_side}: need >= 16 pixels")
    if gop < 1:
        raise UserError(f"--gop {gop}: need a keyframe interval >= 1")
    if codec not in _ENCODERS:
        raise UserError(f"--codec {codec}: choose one of {', '.join(_ENCODERS)}")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding {encoding}: choose one of {', '.join(ENCODINGS)}")
    workers = workers or os.cpu_count() or 1
    suffix = _ENCODERS[codec][1]
    report = {"src": str(src), "dst": str(dst), "short_side": short_side, "gop": gop, "codec": codec,
              "encoding": encoding,
              "transcoded": [], "existing": [], "failed": [], "skipped": []}
    jobs = _plan_jobs(src, dst, suffix, report)
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run_jobs(jobs, workers, report, short_side=short_side, gop=gop, codec=codec, encoding=encoding)
    report["seconds"] = time.perf_counter() - t0
    _write_report(report, dst / "transcode.report.json")
    ok, old, bad = len(report["transcoded"]), len(report["existing"]), report["failed"]
    print(f"{dst}: {ok} transcoded, {old} already there, {len(bad)} failed, {len(report['skipped'])} other "
          f"files skipped; short side {short_side}, GOP {gop}, {codec} ({encoding}); {report['seconds']:.1f} s")
    for f in bad[:10]:
        print(f"failed: {f['path']}: {f['reason']}", file=sys.stderr)
    if len(bad) > 10:
        print(f"... {len(bad) - 10} more failures in {dst / 'transcode.report.json'}", file=sys.stderr)
    if bad and not ok and not old:
        raise UserError(f"transcode: all {len(bad)} videos failed (e.g. {bad[0]['path']}: {bad[0]['reason']}); "
                        f"see {dst / 'transcode.report.json'}")
    if not bad and not ok and not old:
        raise UserError(f"{src}: no video files found (suffixes {', '.join(sorted(VIDEO_SUFFIXES))})")
    return report


def _plan_jobs(src: Path, dst: Path, suffix: str, report: dict) -> list[tuple[str, str]]:
    """(source, output) pairs still to transcode; other files go into the report as skipped, existing
    or failed (two sources with one output name)."""
    jobs, targets = [], {}
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in VIDEO_SUFFIXES:
                report["skipped"].append({"path": str(p), "reason": "not a video file name"})
                continue
            out = dst / p.relative_to(src).with_suffix(suffix)
            if out in targets:
                report["failed"].append({"path": str(p), "reason": f"same output name as {targets[out]}"})
                continue
            targets[out] = p
            if out.is_file():
                report["existing"].append(str(out))
            else:
                jobs.append((str(p), str(out)))
    return jobs


def _run_jobs(jobs: list[tuple[str, str]], workers: int, report: dict, *, short_side: int, gop: int, codec: str,
              encoding: str) -> None:
    """Transcode ``jobs`` in worker processes into the report; a file whose worker died is tried once more."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    progress = Progress(len(jobs), "transcode", unit="file")
    done, tries = 0, {}
    try:
        while jobs:
            retry = []
            with ProcessPoolExecutor(min(workers, len(jobs)),
                                     mp_context=multiprocessing.get_context("forkserver")) as pool:
                futs = [(j, pool.submit(transcode_file, *j, short_side, gop, codec, threads, encoding)) for j in jobs]
                for job, fut in futs:
                    try:
                        r = fut.result()
                    except BrokenProcessPool:
                        tries[job] = tries.get(job, 0) + 1
                        if tries[job] < 2:
                            retry.append(job)
                            continue
                        r = {"path": job[0], "ok": False, "reason": "the worker process died twice on this file"}
                    done += 1
                    progress.update(done)
                    if r["ok"]:
                        report["transcoded"].append({"path": r["path"], "frames": r["frames"], "size": r["size"]})
                    else:
                        report["failed"].append({"path": r["path"], "reason": r["reason"]})
            jobs = retry
    finally:
        progress.close()


def _write_report(report: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
