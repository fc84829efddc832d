"""Build a manifest (`mscl-stream index`): read the source's layout (``layouts.py``), probe every listed file
once in parallel (resumable through ``index_progress.py``), keep every video that decodes, optionally score
MDS starts with an injected scorer, write the manifest(s) and a report.
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
from mscl_stream.data.discover import Entry
from mscl_stream.data.index_progress import ProbeLog, entry_key, progress_path
from mscl_stream.data.layouts import Layout, read_layout
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
    """Worker: probe one file; with a scorer, the MDS starts of a video long enough for pretraining."""
    p = probe_video(entry.path, cuda=cuda)
    if p.reason is None and scorer is not None:
        end = p.num_frames if entry.end < 0 else min(entry.end, p.num_frames)
        usable = end - entry.start
        if usable < need:
            p.notes.append(f"{usable} frames: shorter than one pretraining sample ({need}), no mds_starts")
            return entry, p
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


def _probe_all(entries: list[Entry], log: ProbeLog, workers: int, cuda: bool, need: int,
               scorer: VideoScorer | None) -> dict[str, Probe]:
    """Probe the entries the log lacks (in this process for workers == 1, else a process pool); every
    result is appended to the log as it arrives. Returns key -> probe for all entries."""
    todo = [e for e in entries if entry_key(e) not in log.done]
    if len(todo) < len(entries):
        print(f"index: resuming, {len(entries) - len(todo)} of {len(entries)} files probed before "
              f"({log.path})")
    with Progress(len(todo), "index" if scorer is None else "index+mds", unit="file") as progress:
        _probe_with(progress, todo, log, workers, cuda, need, scorer)
    return log.done


def _probe_with(progress: Progress, entries: list[Entry], log: ProbeLog, workers: int, cuda: bool, need: int,
                scorer: VideoScorer | None) -> None:
    if workers == 1 or len(entries) <= 1:     # in this process: its thread settings stay untouched
        for i, e in enumerate(entries, 1):
            log.add(entry_key(e), _probe_entry(e, cuda, need, scorer)[1])
            progress.update(i)
        return
    # spawn: fresh workers whatever the parent has started (torch/OpenCV thread pools, CUDA)
    with ProcessPoolExecutor(max_workers=min(workers, len(entries)), initializer=_init_worker,
                             initargs=(scorer is not None,), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_probe_entry, e, cuda, need, scorer) for e in entries]
        for done, fut in enumerate(as_completed(futures), 1):
            e, p = fut.result()
            log.add(entry_key(e), p)
            progress.update(done)


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def build_manifest(src: str | os.PathLike, output: str | os.PathLike, *, data: DataConfig, workers: int = 0,
                   mds_scorer: VideoScorer | None = None, fmt: str = "auto",
                   splits: list[int] | None = None) -> dict:
    """Index a video collection: probe every listed file once, write the manifest(s) and their reports.

    Every file found or listed is either a manifest row or an excluded entry with a reason in the report
    (before probing: missing, unknown_class, duplicate, malformed, unused, no_class, bad_range, hidden,
    symlink_loop, dangling_link, not_a_file; probing: empty, unreadable, no_video_stream,
    unsupported_codec, no_decodable_frame); nothing is dropped silently. A video that decodes is kept
    however short it is: the report counts the rows long enough for one pretraining sample apart from
    all rows (evaluation uses every row; the pretraining loader skips the short ones).
    Label ids: the dataset's own (:mod:`mscl_stream.data.layouts`), else the sorted class names of the
    usable videos, numbered 0..C-1; unlabelled videos get -1.

    Args:
        src: a dataset folder or annotation file in format ``fmt`` (``auto`` detects it; docs/data.md).
        output: manifest path (JSONL); the report goes next to it. With several numbered splits it must
            hold ``{split}``, replaced by each split's number.
        data: sampling settings that decide one pretraining sample's length (:func:`min_raw_frames`).
        workers: probe processes; 0 = ``os.cpu_count()``; 1 probes in this process.
        mds_scorer: also compute the MDS allowed starts of every video long enough for pretraining.
        fmt, splits: the layout and the numbered splits to write (ucf101/hmdb51).

    Returns:
        The report dict (also written as JSON); with several manifests ``{"splits": {n: report}}``.

    Raises:
        UserError: bad options or annotations (before probing), or no decodable video.
    """
    t0 = time.monotonic()
    output = Path(output)
    layout = read_layout(src, fmt, splits, all_splits="{split}" in output.name)
    outputs = _outputs(output, layout)
    for out in outputs.values():
        check_output(out)                     # before probing: a bad -o must not cost the probe
    if all(not e and not x for e, x in layout.sets.values()):
        raise UserError(f"{src}: no video files found (expected <class>/<video> or train/<class>/<video>, "
                        "a flat folder of videos, or a dataset's annotation files)")
    if mds_scorer is not None:
        mds_scorer.prepare()                  # fail fast (unknown name, missing OpenCV) before probing
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    cuda = _cuda_available()
    need = min_raw_frames(data)
    unique = list({entry_key(e): e for entries, _ in layout.sets.values() for e in entries}.values())
    settings = {"src": str(Path(src).resolve()), "format": layout.format, "cuda": cuda, "need": need,
                "mds": mds_scorer.name if mds_scorer else None}
    with ProbeLog(progress_path(output), settings) as log:
        probes = _probe_all(unique, log, workers, cuda, need, mds_scorer)
    reports = {}
    for n, (entries, excluded) in layout.sets.items():
        results = [(e, probes[entry_key(e)]) for e in entries]
        usable, (notes, excluded_all) = _sort_results(results, list(excluded))
        records = _records(usable, layout.classes)
        report = _report(src, outputs[n], t0=t0, need=need, n_files=len(entries) + len(excluded),
                         entries=entries, usable=usable, records=records, excluded=excluded_all,
                         notes=notes, cuda=cuda, mds_scorer=mds_scorer)
        report.update(format=layout.format, split_number=n)
        _write_outputs(src, outputs[n], records, report)
        reports[n] = report
    log.remove()
    return next(iter(reports.values())) if len(reports) == 1 else {"splits": reports}


def _outputs(output: Path, layout: Layout) -> dict[int | None, Path]:
    """The manifest path of every set: ``{split}`` replaced by the split's number."""
    keys = list(layout.sets)
    if len(keys) > 1 and "{split}" not in output.name:
        raise UserError(f"index -o {output}: {len(keys)} splits ({', '.join(map(str, keys))}) need the "
                        "placeholder {split} in the file name, e.g. -o ucf101_split{split}.jsonl")
    if "{split}" in str(output.parent):
        raise UserError(f"index -o {output}: put {{split}} in the file name, not the folder")
    return {k: output.with_name(output.name.replace("{split}", str(k) if k is not None else "")) for k in keys}


def _sort_results(results: list[tuple[Entry, Probe]],
                  excluded: list[dict]) -> tuple[list[tuple[Entry, Probe]], tuple[list[dict], list[dict]]]:
    """The usable (entry, probe) pairs, and (the probes' notes, ``excluded`` plus the probe exclusions)."""
    usable: list[tuple[Entry, Probe]] = []
    notes = []
    for e, p in results:
        if p.notes:
            notes.append({"path": e.path, "notes": p.notes})
        if p.reason is None:
            usable.append((e, p))
        else:
            excluded.append({"path": e.path, "reason": p.reason, "detail": p.detail})
    return usable, (notes, excluded)


def _records(usable: list[tuple[Entry, Probe]], classes: list[str] | None) -> list[VideoRecord]:
    """Manifest rows sorted by (split, label, path). Ids: the entry's own (a dataset's list), else the
    sorted class names of the usable videos; -1 marks an unlabelled video."""
    names = sorted({e.label_name for e, _ in usable if e.label is None})
    label_of = {c: i for i, c in enumerate(names)}
    records = [VideoRecord(path=e.path, label=label_of[e.label_name] if e.label is None else e.label,
                           label_name=e.label_name, split=e.split, num_frames=p.num_frames, fps=p.fps,
                           width=p.width, height=p.height, codec=p.codec, duration=p.duration, start=e.start,
                           end=e.end, mds_starts=p.mds_starts)
               for e, p in usable]
    records.sort(key=lambda r: (r.split, r.label, r.path))
    return records


def _report(src: str | os.PathLike, output: Path, *, t0: float, need: int, n_files: int, entries: list[Entry],
            usable: list[tuple[Entry, Probe]], records: list[VideoRecord], excluded: list[dict],
            notes: list[dict], cuda: bool, mds_scorer: VideoScorer | None) -> dict:
    """The index report: counts, classes, codecs, every exclusion with its reason, notes, MDS coverage."""
    all_classes = sorted({e.label_name for e in entries if e.label != -1})
    classes = sorted({r.label_name for r in records if r.label != -1})
    short = [r for r in records if r.frame_end - r.start < need]
    return {
        "src": str(Path(src).resolve()),
        "manifest": str(output.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "min_frames": need,
        "files": n_files,
        "usable": len(records),
        "usable_for_evaluation": len(records),
        "usable_for_pretraining": len(records) - len(short),
        "shorter_than_one_sample": {"count": len(short), "per_split": dict(sorted(Counter(
            r.split for r in short).items()))},
        "per_split": dict(sorted(Counter(r.split for r in records).items())),
        "labelled": sum(r.label != -1 for r in records),
        "classes": classes,
        "classes_without_usable_video": sorted(set(all_classes) - set(classes)),
        "per_class": dict(Counter(r.label_name for r in records if r.label != -1)),
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
    labels = (f"{len(report['classes'])} classes" if report["labelled"] == report["usable"] else
              f"{report['usable'] - report['labelled']} unlabelled" + (f", {len(report['classes'])} classes"
                                                                      if report["labelled"] else ""))
    print(f"{output}: {report['usable']} usable videos of {report['files']} files ({splits}); {labels}; "
          f"{report['seconds']:.1f} s")
    print(f"usable for evaluation {report['usable_for_evaluation']}, for pretraining "
          f"{report['usable_for_pretraining']} (one sample needs {report['min_frames']} frames; "
          f"{report['shorter_than_one_sample']['count']} shorter, kept for evaluation only)")
    if report["excluded_by_reason"]:
        why = ", ".join(f"{k} {v}" for k, v in report["excluded_by_reason"].items())
        print(f"excluded {sum(report['excluded_by_reason'].values())}: {why} "
              f"(details in {_report_path(output)})")
    if report["mds"] and report["mds"]["without_starts"]:
        print(f"MDS: {len(report['mds']['without_starts'])} usable videos have no mds_starts "
              "(short, too long or failed; see the report's notes)")
    if report["notes"]:
        print(f"{len(report['notes'])} files with notes (truncated tails, unverified decode): see the report")
