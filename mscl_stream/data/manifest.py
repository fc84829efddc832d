"""Manifest: one JSON line per usable video, written by `mscl-stream index`, read by the loader."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import multiprocessing as mp
import os
import stat
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import av

from mscl_stream.config import DataConfig
from mscl_stream.data.probe import Probe, mds_starts_for_video, probe_video
from mscl_stream.data.probe import mds_estimator as mds_estimator_for
from mscl_stream.errors import UserError
from mscl_stream.progress import Progress


@dataclass
class VideoRecord:
    """One usable video. Paths are absolute once read; frame bounds are [start, end) in raw frames."""

    path: str
    label: int
    label_name: str
    split: str
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    duration: float
    start: int = 0
    end: int = -1                       # exclusive; -1 = num_frames
    mds_starts: list[int] | None = None  # allowed raw start frames (even), from `index --mds`

    @property
    def frame_end(self) -> int:
        return self.num_frames if self.end < 0 else min(self.end, self.num_frames)


def write_manifest(records: list[VideoRecord], path: str | os.PathLike) -> None:
    """Write records as JSONL atomically; paths are stored relative to the manifest's folder."""
    path = Path(path)
    base = path.parent.resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            for r in records:
                d = dataclasses.asdict(r)
                d["path"] = os.path.relpath(Path(r.path).resolve(), base)
                f.write(json.dumps(d) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write the manifest ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


# Field -> accepted types of a manifest row (bool is excluded from int explicitly).
_ROW_TYPES = {"path": (str,), "label": (int,), "label_name": (str,), "split": (str,), "num_frames": (int,),
              "fps": (int, float), "width": (int,), "height": (int,), "codec": (str,),
              "duration": (int, float), "start": (int,), "end": (int,)}
_ROW_REQUIRED = ("path", "label", "label_name", "split", "num_frames", "fps", "width", "height", "codec",
                 "duration")


def _row_problem(d: object) -> str:
    """'' for a well-formed manifest row, else what is wrong with it (one phrase)."""
    if not isinstance(d, dict):
        return f"expected a JSON object, got {json.dumps(d)[:60]}"
    missing = [k for k in _ROW_REQUIRED if k not in d]
    if missing:
        return f"missing {', '.join(missing)}"
    for k, types_ in _ROW_TYPES.items():
        if k in d and (isinstance(d[k], bool) or not isinstance(d[k], types_)):
            want = "an integer" if types_ == (int,) else "a number" if float in types_ else "a string"
            return f"{k} must be {want}, got {json.dumps(d[k])[:60]}"
    if d["num_frames"] < 1:
        return f"num_frames must be >= 1, got {d['num_frames']}"
    if d["label"] < -1:
        return f"label must be >= 0 (or -1 for unlabelled), got {d['label']}"
    starts = d.get("mds_starts")
    if starts is not None and not (isinstance(starts, list)
                                   and all(isinstance(x, int) and not isinstance(x, bool) for x in starts)):
        return "mds_starts must be a list of integers or null"
    return ""


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[VideoRecord]:
    """Read a manifest; ``split`` keeps only rows of that split (None or "" keeps all)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such manifest (run `mscl-stream index`)")
    base = path.parent.resolve()
    names = {f.name for f in dataclasses.fields(VideoRecord)}
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); is this a manifest?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a manifest row (not JSON: {e})") from None
        problem = _row_problem(d)
        if problem:
            raise UserError(f"{path}:{n}: not a manifest row ({problem})")
        rec = VideoRecord(**{k: v for k, v in d.items() if k in names})
        rec.path = str((base / rec.path).resolve())
        if not split or rec.split == split:
            out.append(rec)
    if not out:
        raise UserError(f"{path}: no videos" + (f" in split {split!r}" if split else ""))
    return out


# ---------------------------------------------------------------------------------------------------
# `mscl-stream index`: discover videos, probe them in parallel, write the manifest and a report.

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


@dataclass
class _Entry:
    """One file to probe: where it came from and what the source says about it."""

    path: str
    label_name: str
    split: str
    start: int = 0
    end: int = -1


def min_raw_frames(data: DataConfig) -> int:
    """Raw frames one training sample needs: one window (T sampled frames ``frame_stride`` apart and
    the flow partners of the frames that get flow, i.e. the sampler's ``clip_span``); without
    wrap-around, window B may also start ``max_shift`` later."""
    from mscl_stream.data.sampler import clip_span     # lazy: the sampler imports this module

    need = clip_span(data)
    return need if data.wrap else need + data.max_shift


def _entry_kind(p: Path) -> tuple[str, str] | None:
    """None for a regular file (followed through symlinks), else (reason, detail) why it is skipped."""
    try:
        st = p.stat()                       # follows symlinks
    except OSError as e:
        if p.is_symlink():
            if e.errno == errno.ELOOP:
                return "symlink_loop", f"symbolic link loop ({os.readlink(p)})"
            return "dangling_link", f"symbolic link to a missing target ({os.readlink(p)})"
        return "unreadable", f"cannot stat ({e.strerror or e})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    kind = ("fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "character device" if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode) else
            "folder" if stat.S_ISDIR(mode) else "special file")
    return "not_a_file", f"a {kind}" + (" (through a symbolic link)" if p.is_symlink() else "")


def _files_under(folder: Path) -> tuple[list[Path], list[dict]]:
    """Regular files below ``folder`` (symlinks followed, folders not entered twice) and skipped entries.

    Hidden names (starting with ".") are skipped; every other entry that is not a usable file
    (symlink loop, dangling link, FIFO, socket, device) is returned with a reason.
    """
    files, skipped, seen = [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            key = os.stat(root).st_ino, os.stat(root).st_dev
        except OSError:
            key = None
        if key in seen:                     # a symlinked folder pointing back up the tree
            skipped.append({"path": root, "reason": "symlink_loop", "detail": "folder visited before"})
            dirs[:] = []
            continue
        seen.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if name.startswith("."):
                skipped.append({"path": str(p), "reason": "hidden", "detail": "name starts with '.'"})
                continue
            why = _entry_kind(p)
            if why is None:
                files.append(p)
            else:
                skipped.append({"path": str(p), "reason": why[0], "detail": why[1]})
    return sorted(files), skipped


def discover(src: str | os.PathLike) -> tuple[list[_Entry], list[dict]]:
    """List the videos of a source: class folders, split/class folders, or a CSV.

    Returns:
        (entries to probe, files excluded before probing as ``{"path", "reason", "detail"}``).
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.is_file():
        return _discover_csv(src)
    dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in dirs if d.name in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(dirs):
        others = [d.name for d in dirs if d.name not in SPLIT_NAMES]
        raise UserError(f"{src}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                        f"folders ({', '.join(others[:5])}); use train/val/test/<class>/ or <class>/ only")
    roots = [(d, d.name) for d in split_dirs] if split_dirs else [(src, "train")]
    entries, skipped = [], []
    for root, split in roots:
        for f in sorted(root.iterdir()):
            if f.is_dir() and not f.name.startswith("."):
                continue
            why = _entry_kind(f)
            reason, detail = ("no_class", f"file directly in {root}") if why is None else why
            skipped.append({"path": str(f), "reason": "hidden" if f.name.startswith(".") else reason,
                            "detail": detail})
        for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files, skips = _files_under(cls)
            entries += [_Entry(str(f), cls.name, split) for f in files]
            skipped += skips
    return entries, skipped


def _discover_csv(csv_path: Path) -> tuple[list[_Entry], list[dict]]:
    """CSV rows ``path,label[,start,end]`` (optional header; a header may also name a ``split`` column)."""
    base = csv_path.parent
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{csv_path}: empty CSV (expected rows path,label[,start,end])")
    cols = ["path", "label", "start", "end"]
    header = rows[0][0].strip().lower() == "path"
    if header:
        cols = [c.strip().lower() for c in rows[0]]
        if "label" not in cols:
            raise UserError(f"{csv_path}: header {cols} has no 'label' column")
    entries, skipped = [], []
    for n, row in enumerate(rows[1:] if header else rows, 2 if header else 1):
        d = dict(zip(cols, (c.strip() for c in row)))
        where = f"{csv_path} row {n}"
        if len(row) < 2 or not d.get("path") or not d.get("label"):
            raise UserError(f"{where}: need path,label[,start,end], got {row}")
        try:
            start = int(d.get("start") or 0)
            end = int(d.get("end") or -1)
        except ValueError:
            raise UserError(f"{where}: start/end must be integers (raw frames), got {row}") from None
        path = (base / d["path"]).resolve()
        if start < 0 or (end >= 0 and end <= start):
            skipped.append({"path": str(path), "reason": "bad_range", "detail": f"{where}: [{start}, {end})"})
        elif not path.is_file():
            skipped.append({"path": str(path), "reason": "missing", "detail": f"{where}: no such file"})
        else:
            entries.append(_Entry(str(path), d["label"], d.get("split") or "train", start, end))
    return entries, skipped


def _probe_entry(entry: _Entry, cuda: bool, need: int, mds_estimator: str | None,
                 flow_gap: int = 8) -> tuple[_Entry, Probe]:
    """Worker: probe one file, apply the length rule, optionally compute MDS starts."""
    p = probe_video(entry.path, cuda=cuda)
    if p.reason is None:
        end = p.num_frames if entry.end < 0 else min(entry.end, p.num_frames)
        usable = end - entry.start
        if usable < need:
            p.reason = "too_short"
            p.detail = f"{usable} frames in [{entry.start}, {end}), one sample needs {need}"
        elif mds_estimator:
            try:
                p.mds_starts = mds_starts_for_video(entry.path, mds_estimator, entry.start, end, flow_gap)
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


def _probe_all(entries: list[_Entry], workers: int, cuda: bool, need: int,
               mds_estimator: str | None, flow_gap: int) -> list[tuple[_Entry, Probe]]:
    """Probe entries (in this process for workers == 1, else a process pool), in input order."""
    with Progress(len(entries), "index" if not mds_estimator else "index+mds", unit="file") as progress:
        return _probe_with(progress, entries, workers, cuda, need, mds_estimator, flow_gap)


def _probe_with(progress: Progress, entries: list[_Entry], workers: int, cuda: bool, need: int,
                mds_estimator: str | None, flow_gap: int) -> list[tuple[_Entry, Probe]]:
    if workers == 1 or len(entries) <= 1:     # in this process: its thread settings stay untouched
        results = []
        for i, e in enumerate(entries, 1):
            results.append(_probe_entry(e, cuda, need, mds_estimator, flow_gap))
            progress.update(i)
        return results
    results: list[tuple[_Entry, Probe] | None] = [None] * len(entries)
    # spawn: fresh workers whatever the parent has started (torch/OpenCV thread pools, CUDA)
    with ProcessPoolExecutor(max_workers=min(workers, len(entries)), initializer=_init_worker,
                             initargs=(bool(mds_estimator),), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_probe_entry, e, cuda, need, mds_estimator, flow_gap): i
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
                   mds: bool = False, mds_estimator: str = "dis_fast") -> dict:
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
        mds: also compute MDS allowed starts per video with ``mds_estimator`` (a flow estimator name).

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
    if mds:
        mds_estimator_for(mds_estimator)      # fail fast (unknown name, missing OpenCV) before probing
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    cuda = _cuda_available()
    need = min_raw_frames(data)
    results = _probe_all(entries, workers, cuda, need, mds_estimator if mds else None, data.flow_gap)

    n_files = len(entries) + len(excluded)          # pre-probe exclusions are files too
    usable: list[tuple[_Entry, Probe]] = []
    notes = []
    for e, p in results:
        if p.notes:
            notes.append({"path": e.path, "notes": p.notes})
        if p.reason is None:
            usable.append((e, p))
        else:
            excluded.append({"path": e.path, "reason": p.reason, "detail": p.detail})
    all_classes = sorted({e.label_name for e in entries})
    classes = sorted({e.label_name for e, _ in usable})
    label_of = {c: i for i, c in enumerate(classes)}
    records = [VideoRecord(path=e.path, label=label_of[e.label_name], label_name=e.label_name, split=e.split,
                           num_frames=p.num_frames, fps=p.fps, width=p.width, height=p.height, codec=p.codec,
                           duration=p.duration, start=e.start, end=e.end, mds_starts=p.mds_starts)
               for e, p in usable]
    records.sort(key=lambda r: (r.split, r.label, r.path))

    by_reason = dict(sorted(Counter(x["reason"] for x in excluded).items()))
    report = {
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
        "excluded_by_reason": by_reason,
        "excluded": sorted(excluded, key=lambda x: (x["reason"], x["path"])),
        "notes": notes,
        "mds": {"estimator": mds_estimator, "videos": sum(r.mds_starts is not None for r in records),
                "without_starts": [r.path for r in records if r.mds_starts is None]} if mds else None,
        "seconds": round(time.monotonic() - t0, 3),
    }
    if not records:
        _write_json_atomic(report, _report_path(output))
        why = ", ".join(f"{k}: {v}" for k, v in by_reason.items()) or "no files"
        raise UserError(f"{src}: no usable videos ({why}); see {_report_path(output)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(records, output)
    _write_json_atomic(report, _report_path(output))
    _print_summary(report, output)
    return report


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
