"""Manifest: one JSON line per usable video, written by `mscl-stream index`, read by the loader."""

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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            d = dataclasses.asdict(r)
            d["path"] = os.path.relpath(Path(r.path).resolve(), base)
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[VideoRecord]:
    """Read a manifest; ``split`` keeps only rows of that split (None or "" keeps all)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such manifest (run `mscl-stream index`)")
    base = path.parent.resolve()
    names = {f.name for f in dataclasses.fields(VideoRecord)}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rec = VideoRecord(**{k: v for k, v in d.items() if k in names})
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path}:{n}: not a manifest row ({e})") from None
        rec.path = str((base / rec.path).resolve())
        if not split or rec.split == split:
            out.append(rec)
    if not out:
        raise UserError(f"{path}: no videos" + (f" in split {split!r}" if split else ""))
    return out
