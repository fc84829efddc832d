"""Build a manifest (`mscl-stream index`): probe every discovered file in parallel, keep the long enough ones,
optionally score their MDS starts with an injected scorer, write the manifest and a report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import av

from mscl_stream.config import DataConfig
from mscl_stream.data.discover import Entry, discover
from mscl_stream.data.manifest import VideoRecord, write_manifest
from mscl_stream.data.probe import Probe, probe_video
from mscl_stream.data.sampler import min_raw_frames
from mscl_stream.errors import UserError
from mscl_stream.progress import Progress


class VideoScorer(Protocol):
    """Per-video MDS scoring injected by the `index` command (``mscl_stream.motion.mds.MDSScorer``).

    It must pickle: probe workers are spawned processes that call it on their own files.
    """

    @property
    def name(self) -> str:
        """What the report records as the MDS estimator."""

    def prepare(self) -> None:
        """Fail fast (unknown estimator, missing backend) before any file is probed."""

    def __call__(self, path: str, start: int, end: int) -> list[int] | None:
        """Sorted allowed raw starts in [start, end), or None when the video is not scored."""


def _probe_entry(entry: Entry, cuda: bool, need: int, scorer: VideoScorer | None) -> tuple[Entry, Probe]:
    """Worker: probe one file, apply the length rule, optionally compute MDS starts."""
    p = probe_video(entry.path, cuda=cuda)
    if p.reason is None:
        end = p.num_frames if entry.end < 0 else min(entry.end, p.num_frames)
        usable = end - entry.start
        if usable < need:
            p.reason = "too_short"
            p.detail = f"{usable} frames in [{entry.start}, {end}), one sample needs {need}"
        elif scorer is not None:
            try:
                p.mds_starts = scorer(entry.path, entry.start, end)
                if p.mds_starts is None:
                    p.notes.append(f"{usable} frames: too long for index-time MDS, no mds_starts")
            except (av.FFmpegError, UserError, RuntimeError, ValueError) as e:
                p.notes.append(f"MDS failed ({type(e).__name__}: {e}): no mds_starts")
    return entry, p


def _init_worker(mds: bool) -> None:
    # one file per process at a time: keep each process single-threaded so N workers use N cores
    os.environ["OMP_NUM_THREADS"] = "1"
    if mds:
        import torch
        torch.set_num_threads(1)


def _probe_all(entries: list[Entry], workers: int, cuda: bool, need: int,
               scorer: VideoScorer | None) -> list[tuple[Entry, Probe]]:
    """Probe entries (in this process for workers == 1, else a process pool), in input order."""
    with Progress(len(entries), "index" if scorer is None else "index+mds", unit="file") as progress:
        return _probe_with(progress, entries, workers, cuda, need, scorer)


def _probe_with(progress: Progress, entries: list[Entry], workers: int, cuda: bool, need: int,
                scorer: VideoScorer | None) -> list[tuple[Entry, Probe]]:
    if workers == 1 or len(entries) <= 1:     # in this process: its thread settings stay untouched
        results = []
        for i, e in enumerate(entries, 1):
            results.append(_probe_entry(e, cuda, need, scorer))
            progress.update(i)
        return results
    results: list[tuple[Entry, Probe] | None] = [None] * len(entries)
    # spawn: fresh workers whatever the parent has started (torch/OpenCV thread pools, CUDA)
    with ProcessPoolExecutor(max_workers=min(workers, len(entries)), initializer=_init_worker,
                             initargs=(scorer is not None,), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_probe_entry, e, cuda, need, scorer): i
                   for i, e in enumerate(entries)}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            progress.update(done)
    return results  # type: ignore[return-value]


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def build_manifest(src: str | os.PathLike, output: str | os.PathLike, *, data: DataConfig, workers: int = 0,
                   mds_scorer: VideoScorer | None = None) -> dict:
    """Index a video collection: probe every file, write the manifest and ``<stem>.report.json``.

    Every file found is either a manifest row or an excluded entry with a reason in the report
    (empty, unreadable, no_video_stream, unsupported_codec, no_decodable_frame, too_short, no_class,
    missing, bad_range, hidden, symlink_loop, dangling_link, not_a_file); nothing is dropped silently.
    Labels are the sorted class names of the usable videos over all splits, numbered 0..C-1.

    Args:
        src: folder of class folders (split "train"), folder of split folders (train/val/test) of class
            folders, or a CSV ``path,label[,start,end]`` with paths relative to the CSV's folder.
        output: manifest path (JSONL); the report goes next to it.
        data: sampling settings that decide the minimum usable length (see :func:`min_raw_frames`).
        workers: probe processes; 0 = ``os.cpu_count()``; 1 probes in this process.
        mds_scorer: also compute the MDS allowed starts of every usable video with it (the `index`
            command passes ``mscl_stream.motion.mds.MDSScorer``; None: no MDS).

    Returns:
        The report dict (also written as JSON).

    Raises:
        UserError: ``src`` does not exist, holds no files, or nothing usable remains.
    """
    t0 = time.monotonic()
    output = Path(output)
    check_output(output)                      # before probing: a bad -o must not cost the probe
    entries, excluded = discover(src)
    if not entries and not excluded:
        raise UserError(f"{src}: no video files found (expected <class>/<video> or train/<class>/<video>)")
    if mds_scorer is not None:
        mds_scorer.prepare()                  # fail fast (unknown name, missing OpenCV) before probing
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    cuda = _cuda_available()
    need = min_raw_frames(data)
    results = _probe_all(entries, workers, cuda, need, mds_scorer)
    n_files = len(entries) + len(excluded)          # pre-probe exclusions are files too
    usable, notes = _sort_results(results, excluded)
    records = _records(usable)
    report = _report(src, output, t0=t0, need=need, n_files=n_files, entries=entries, usable=usable,
                     records=records, excluded=excluded, notes=notes, cuda=cuda, mds_scorer=mds_scorer)
    _write_outputs(src, output, records, report)
    return report


def _sort_results(results: list[tuple[Entry, Probe]],
                  excluded: list[dict]) -> tuple[list[tuple[Entry, Probe]], list[dict]]:
    """The usable (entry, probe) pairs and the probes' notes; exclusions are appended to ``excluded``."""
    usable: list[tuple[Entry, Probe]] = []
    notes = []
    for e, p in results:
        if p.notes:
            notes.append({"path": e.path, "notes": p.notes})
        if p.reason is None:
            usable.append((e, p))
        else:
            excluded.append({"path": e.path, "reason": p.reason, "detail": p.detail})
    return usable, notes


def _records(usable: list[tuple[Entry, Probe]]) -> list[VideoRecord]:
    """Manifest rows sorted by (split, label, path); labels number the sorted class names."""
    classes = sorted({e.label_name for e, _ in usable})
    label_of = {c: i for i, c in enumerate(classes)}
    records = [VideoRecord(path=e.path, label=label_of[e.label_name], label_name=e.label_name, split=e.split,
                           num_frames=p.num_frames, fps=p.fps, width=p.width, height=p.height, codec=p.codec,
                           duration=p.duration, start=e.start, end=e.end, mds_starts=p.mds_starts)
               for e, p in usable]
    records.sort(key=lambda r: (r.split, r.label, r.path))
    return records


def _report(src: str | os.PathLike, output: Path, *, t0: float, need: int, n_files: int, entries: list[Entry],
            usable: list[tuple[Entry, Probe]], records: list[VideoRecord], excluded: list[dict],
            notes: list[dict], cuda: bool, mds_scorer: VideoScorer | None) -> dict:
    """The index report: counts, classes, codecs, every exclusion with its reason, notes, MDS coverage."""
    all_classes = sorted({e.label_name for e in entries})
    classes = sorted({r.label_name for r in records})
    return {
        "src": str(Path(src).resolve()),
        "manifest": str(output.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "min_frames": need,
        "files": n_files,
        "usable": len(records),
        "per_split": dict(sorted(Counter(r.split for r in records).items())),
        "classes": classes,
        "classes_without_usable_video": sorted(set(all_classes) - set(classes)),
        "per_class": {c: sum(1 for r in records if r.label_name == c) for c in classes},
        "codecs": dict(sorted(Counter(r.codec for r in records).items())),
        "decoders": {p.codec: p.decoders for _, p in usable},
        "cuda": cuda,
        "excluded_by_reason": dict(sorted(Counter(x["reason"] for x in excluded).items())),
        "excluded": sorted(excluded, key=lambda x: (x["reason"], x["path"])),
        "notes": notes,
        "mds": {"estimator": mds_scorer.name, "videos": sum(r.mds_starts is not None for r in records),
                "without_starts": [r.path for r in records if r.mds_starts is None]} if mds_scorer else None,
        "seconds": round(time.monotonic() - t0, 3),
    }


def _write_outputs(src: str | os.PathLike, output: Path, records: list[VideoRecord], report: dict) -> None:
    """Write the manifest and the report and print a summary; with no usable video, only the report
    (then a UserError naming the exclusion reasons)."""
    if not records:
        _write_json_atomic(report, _report_path(output))
        why = ", ".join(f"{k}: {v}" for k, v in report["excluded_by_reason"].items()) or "no files"
        raise UserError(f"{src}: no usable videos ({why}); see {_report_path(output)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(records, output)
    _write_json_atomic(report, _report_path(output))
    _print_summary(report, output)


def check_output(output: Path) -> None:
    """Raise a one-line UserError unless the manifest and its report can be written at ``output``."""
    for target in (output, _report_path(output)):
        if target.is_dir():
            raise UserError(f"index -o {output}: {target} is a folder; give a file name such as "
                            f"{target / 'manifest.jsonl' if target == output else output.with_suffix('.jsonl')}")
    for parent in (output.parent, *output.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"index -o {output}: {parent} is a file, not a folder")
            break
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.with_name(f".{output.name}.write-test-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"index -o {output}: cannot write in {output.parent} ({e.strerror or e})") from None


def _report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".report.json")


def _write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write the report ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _print_summary(report: dict, output: Path) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in report["per_split"].items())
    print(f"{output}: {report['usable']} usable videos of {report['files']} files ({splits}); "
          f"{len(report['classes'])} classes; min length {report['min_frames']} frames; "
          f"{report['seconds']:.1f} s")
    if report["excluded_by_reason"]:
        why = ", ".join(f"{k} {v}" for k, v in report["excluded_by_reason"].items())
        print(f"excluded {sum(report['excluded_by_reason'].values())}: {why} "
              f"(details in {_report_path(output)})")
    if report["mds"] and report["mds"]["without_starts"]:
        print(f"MDS: {len(report['mds']['without_starts'])} usable videos have no mds_starts "
              "(too long or failed; see the report's notes)")
    if report["notes"]:
        print(f"{len(report['notes'])} files with notes (truncated tails, unverified decode): see the report")
