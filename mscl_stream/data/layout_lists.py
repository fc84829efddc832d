"""The annotation lists of UCF101 and HMDB51, unlabelled folders, and what every layout reader shares.

:class:`Layout` is what a reader returns (``mscl_stream.data.layouts`` picks the reader); listed entries
that cannot be probed are returned with a reason (``missing``, ``unknown_class``, ``duplicate``,
``malformed``, ``unused``) instead of being dropped.

- UCF101: ``ucfTrainTestlist/classInd.txt`` + ``trainlist0N.txt``/``testlist0N.txt``; ids follow classInd
  (its 1-based numbers minus one); a testlist line has no id, its folder names the class.
- HMDB51: ``testTrainMulti_7030_splits/<class>_test_splitN.txt`` (1 train, 2 test, 0 unused); ids number
  the sorted class names; videos in ``<class>/<file>``.
- unlabelled: every file below the folder, label -1 (top-level train/val/test folders give the split).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mscl_stream.data.discover import SPLIT_NAMES, Entry, entry_kind, files_under
from mscl_stream.errors import UserError

_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d+)\.txt$")
_UCF_LIST = re.compile(r"^(?P<kind>train|test)list(?P<n>\d+)\.txt$")


@dataclass
class Layout:
    """What a source lists: ``sets`` maps a numbered split (None: the only manifest) to
    (entries to probe, entries excluded before probing as ``{"path", "reason", "detail"}``)."""

    format: str
    sets: dict[int | None, tuple[list[Entry], list[dict]]] = field(default_factory=dict)
    classes: list[str] | None = None     # label id -> class name where the dataset fixes the ids


def read_text(path: Path) -> str:
    """The text of an annotation file, or a one-line UserError when it cannot be read as text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); is this the dataset's annotation file?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def skip(path: str | Path, reason: str, detail: str) -> dict:
    return {"path": str(path), "reason": reason, "detail": detail}


def unlabelled(src: Path) -> tuple[list[Entry], list[dict]]:
    """Every file below ``src`` (recursively), label absent; top-level split folders name the split (a
    file beside them belongs to none: counted as ``no_split``)."""
    dirs = [p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    by_split = dirs and all(d.name in SPLIT_NAMES for d in dirs)
    entries: list[Entry] = []
    skipped = [skip(f, "no_split", f"file directly in {src}, beside its split folders")
               for f in sorted(src.iterdir()) if by_split and not f.is_dir() and not f.name.startswith(".")]
    for root, split in ([(d, split_name(d.name)) for d in dirs] if by_split else [(src, "train")]):
        files, skips = files_under(root)
        entries += [Entry(str(f), "", split, label=-1) for f in files]
        skipped += skips
    return entries, skipped


def split_name(name: str) -> str:
    return {"valid": "val", "validation": "val", "validate": "val"}.get(name, name)


def _pick_splits(found: list[int], splits: list[int] | None, src: Path, fmt: str) -> list[int]:
    if not found:
        raise UserError(f"{src}: no {fmt} split lists found")
    if splits == [0]:
        return found[:1]
    missing = [n for n in splits or [] if n not in found]
    if missing:
        raise UserError(f"--split {','.join(map(str, missing))}: {src} has splits {', '.join(map(str, found))}")
    return sorted(splits) if splits else found


def _video_root(src: Path, names: tuple[str, ...], probe_rel: str | None) -> Path:
    """The folder the lists' relative paths start from: the first candidate holding ``probe_rel``."""
    for name in names:
        if probe_rel is not None and (src / name / probe_rel).exists():
            return src / name
    return next((src / n for n in names if (src / n).is_dir()), src)


def ucf101(src: Path, splits: list[int] | None) -> Layout:
    """UCF101: ids from classInd.txt (1-based there, 0-based here); split N = trainlist0N + testlist0N."""
    lists = src / "ucfTrainTestlist" if (src / "ucfTrainTestlist").is_dir() else src
    if not (lists / "classInd.txt").is_file() and (src.parent / "ucfTrainTestlist" / "classInd.txt").is_file():
        raise UserError(f"{src}: no classInd.txt here, but {src.parent / 'ucfTrainTestlist'} is beside it: "
                        f"index {src.parent}, the folder that holds the videos and ucfTrainTestlist/")
    classes = _class_ind(lists / "classInd.txt")
    found = sorted({int(m["n"]) for f in lists.iterdir() if (m := _UCF_LIST.match(f.name))})
    chosen = _pick_splits(found, splits, src, "ucf101")
    texts = {(k, n): read_text(lists / f"{k}list{n:02d}.txt") for n in chosen for k in ("train", "test")
             if (lists / f"{k}list{n:02d}.txt").is_file()}
    first = next((t.split()[0] for t in texts.values() if t.split()), None)
    root = _video_root(src, ("UCF-101", "UCF101", "videos", "."), first)
    layout = Layout("ucf101", classes=classes)
    for n in chosen:
        entries: list[Entry] = []
        skipped: list[dict] = []
        seen: set[str] = set()
        for kind in ("train", "test"):
            if (kind, n) not in texts:
                raise UserError(f"{lists}: {kind}list{n:02d}.txt is missing")
            where = lists / f"{kind}list{n:02d}.txt"
            for i, line in enumerate(texts[(kind, n)].splitlines(), 1):
                if line.strip():
                    _ucf_line(line, f"{where}:{i}", kind, root, classes, seen, entries, skipped)
        layout.sets[n] = (entries, skipped)
    return layout


def _class_ind(path: Path) -> list[str]:
    """classInd.txt lines ``<1-based id> <class>``: the class names in id order (0-based)."""
    if not path.is_file():
        raise UserError(f"{path}: missing (UCF101's class list, lines '<id> <class>')")
    ids = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) in ids:
            raise UserError(f"{path}:{i}: expected '<id> <class>' with a new integer id, got {line.strip()!r}")
        ids[int(parts[0])] = parts[1]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise UserError(f"{path}: ids must run 1..N without gaps, got {len(ids)} ids up to {max(ids, default=0)}")
    return [ids[k] for k in sorted(ids)]


def _ucf_line(line: str, where: str, kind: str, root: Path, classes: list[str], seen: set[str],
              entries: list[Entry], skipped: list[dict]) -> None:
    """One list line: ``<Class>/<file>.avi [<1-based id>]`` (testlists carry no id: the folder names it)."""
    parts = line.split()
    rel = parts[0]
    cls = rel.split("/")[0] if "/" in rel else ""
    if len(parts) > 2 or not cls or (len(parts) == 2 and not parts[1].isdigit()):
        skipped.append(skip(root / rel, "malformed", f"{where}: expected '<Class>/<file> [<id>]', got {line!r}"))
        return
    if cls not in classes:
        skipped.append(skip(root / rel, "unknown_class", f"{where}: {cls!r} is not in classInd.txt"))
        return
    label = classes.index(cls)
    if len(parts) == 2 and int(parts[1]) - 1 != label:
        skipped.append(skip(root / rel, "malformed", f"{where}: id {parts[1]} is not {cls}'s ({label + 1})"))
        return
    add_entry(root / rel, cls, kind, label, where, seen, entries, skipped)


def add_entry(path: Path, cls: str, split: str, label: int, where: str, seen: set[str], entries: list[Entry],
         skipped: list[dict]) -> None:
    """Append an entry unless it is listed twice or missing on disk (each counted with its reason)."""
    key = str(path)
    if key in seen:
        skipped.append(skip(path, "duplicate", f"{where}: listed before"))
        return
    seen.add(key)
    why = entry_kind(path)
    if why is not None:
        reason = "missing" if why[0] == "unreadable" and not path.exists() and not path.is_symlink() else why[0]
        skipped.append(skip(path, reason, f"{where}: {'no such file' if reason == 'missing' else why[1]}"))
        return
    entries.append(Entry(str(path), cls, split, label=label))


def hmdb51(src: Path, splits: list[int] | None) -> Layout:
    """HMDB51: ``<class>_test_splitN.txt`` lines ``<file> <0|1|2>`` (1 train, 2 test, 0 unused);
    ids number the sorted class names; videos in ``<class>/<file>``."""
    lists = src / "testTrainMulti_7030_splits"
    if not lists.is_dir():
        raise UserError(f"{lists}: missing (HMDB51's split lists, <class>_test_splitN.txt)")
    files = {(m["cls"], int(m["n"])): f for f in sorted(lists.iterdir()) if (m := _HMDB_FILE.match(f.name))}
    classes = sorted({c for c, _ in files})
    chosen = _pick_splits(sorted({n for _, n in files}), splits, src, "hmdb51")
    first = next(iter(files.items()), None)
    probe = None
    if first is not None:
        words = read_text(first[1]).split()
        probe = f"{first[0][0]}/{words[0]}" if words else None
    root = _video_root(src, ("hmdb51_org", "videos", "."), probe)
    layout = Layout("hmdb51", classes=classes)
    for n in chosen:
        entries: list[Entry] = []
        skipped: list[dict] = []
        seen: set[str] = set()
        for cls in classes:
            path = files.get((cls, n))
            if path is None:
                raise UserError(f"{lists}: {cls}_test_split{n}.txt is missing")
            for i, line in enumerate(read_text(path).splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                where = f"{path}:{i}"
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    skipped.append(skip(root / cls / parts[0], "malformed", f"{where}: expected '<file> 0|1|2', "
                                        f"got {line.strip()!r}"))
                elif parts[1] == "0":
                    skipped.append(skip(root / cls / parts[0], "unused", f"{where}: not in split {n}'s train/test"))
                else:
                    split = "train" if parts[1] == "1" else "test"
                    add_entry(root / cls / parts[0], cls, split, classes.index(cls), where, seen, entries, skipped)
        layout.sets[n] = (entries, skipped)
    return layout
