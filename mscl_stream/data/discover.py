"""Find the videos of a source for `mscl-stream index`: class folders, split/class folders, or a CSV.

Every entry that cannot be a video (hidden, symlink loop, dangling link, FIFO, device, a file outside a
class folder, a bad CSV row) is returned with a reason instead of being dropped.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mscl_stream.errors import UserError

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


@dataclass
class Entry:
    """One file to probe: where it came from and what the source says about it."""

    path: str
    label_name: str
    split: str
    start: int = 0
    end: int = -1
    label: int | None = None    # the dataset's own id (layouts.py); None: numbered by sorted class names


def entry_kind(p: Path) -> tuple[str, str] | None:
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


def files_under(folder: Path) -> tuple[list[Path], list[dict]]:
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
            why = entry_kind(p)
            if why is None:
                files.append(p)
            else:
                skipped.append({"path": str(p), "reason": why[0], "detail": why[1]})
    return sorted(files), skipped


def discover(src: str | os.PathLike) -> tuple[list[Entry], list[dict]]:
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
            why = entry_kind(f)
            reason, detail = ("no_class", f"file directly in {root}") if why is None else why
            skipped.append({"path": str(f), "reason": "hidden" if f.name.startswith(".") else reason,
                            "detail": detail})
        for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files, skips = files_under(cls)
            entries += [Entry(str(f), cls.name, split) for f in files]
            skipped += skips
    return entries, skipped


def _discover_csv(csv_path: Path) -> tuple[list[Entry], list[dict]]:
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
            entries.append(Entry(str(path), d["label"], d.get("split") or "train", start, end))
    return entries, skipped
