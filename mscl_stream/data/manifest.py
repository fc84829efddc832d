"""Manifest: one JSON line per usable video, written by `mscl-stream index`, read by the loader.

:class:`VideoRecord` and its JSONL form; building a manifest from a video collection is
``mscl_stream.data.indexing.build_manifest``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mscl_stream.errors import UserError


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
