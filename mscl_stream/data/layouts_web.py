"""The layouts of the two web-scale datasets for `mscl-stream index`: Kinetics and Something-Something v2.

- Kinetics: CSVs with the header ``label,youtube_id,time_start,time_end,split`` (times in seconds; extra
  columns such as ``is_cc`` are ignored). The files as distributed are already cut to their span: a row
  names ``<youtube_id>_<start:06d>_<end:06d>.mp4`` in the flat folder of its split (``train/``, ``val/``
  for split ``validate``, ``test/``); the times are not bounds inside the file. Ids number the sorted class
  names of every Kinetics CSV read together (train, val and test share them).
- SSv2: ``labels.json`` (template without brackets -> id), ``train.json`` and ``validation.json``
  (``{"id", "template", ...}`` per video), the videos ``<id>.webm`` in one flat folder. The test set's
  list carries no labels and is not indexed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mscl_stream.data.discover import Entry
from mscl_stream.data.layout_lists import Layout, add_entry, read_text, skip, split_name
from mscl_stream.errors import UserError

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
_SSV2_LISTS = (("train.json", "train"), ("validation.json", "val"))


def is_kinetics_csv(path: Path) -> bool:
    """True when the file's first line is a header holding Kinetics' columns."""
    if path.suffix.lower() != ".csv":
        return False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            head = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return set(KINETICS_COLUMNS) <= {c.strip().lower() for c in head}


def kinetics_csvs(root: Path) -> list[Path]:
    """The Kinetics CSVs of a dataset folder: in ``annotations/`` or directly in it."""
    out = []
    for folder in (root / "annotations", root):
        if folder.is_dir():
            out += [p for p in sorted(folder.iterdir()) if p.is_file() and is_kinetics_csv(p)]
    return out


def _kinetics_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of one Kinetics CSV; a header without Kinetics' columns is a UserError."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    head = [c.strip().lower() for c in rows[0]] if rows else []
    if not set(KINETICS_COLUMNS) <= set(head):
        raise UserError(f"{path}: not a Kinetics CSV (header must hold {','.join(KINETICS_COLUMNS)}, got "
                        f"{','.join(head)[:80] or 'nothing'})")
    return [(n, dict(zip(head, (c.strip() for c in r))))
            for n, r in enumerate(rows[1:], 2) if any(c.strip() for c in r)]


def _seconds(text: str) -> int | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if v.is_integer() and v >= 0 else None


def kinetics(src: Path) -> Layout:
    """Kinetics from a dataset folder (``annotations/*.csv`` + split folders) or one of its CSVs."""
    if src.is_file():
        if not is_kinetics_csv(src):
            _kinetics_rows(src)              # raises the one-line error naming the header
        csvs = [src]
        root = src.parent.parent if src.parent.name == "annotations" else src.parent
        siblings = kinetics_csvs(src.parent)       # the ids come from every CSV of the dataset
    else:
        csvs = siblings = kinetics_csvs(src)
        root = src
        if not csvs:
            raise UserError(f"{src}: no Kinetics CSV (header {','.join(KINETICS_COLUMNS)}) here or in annotations/")
    rows = {p: _kinetics_rows(p) for p in {*csvs, *siblings}}
    classes = sorted({d["label"] for rs in rows.values() for _, d in rs if d.get("label")})
    label_of = {c: i for i, c in enumerate(classes)}
    folders: dict[tuple[str, Path], Path] = {}            # (split, CSV) -> its folder, looked up once
    entries: list[Entry] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for path in csvs:
        for n, d in rows[path]:
            where = f"{path}:{n}"
            start, end = _seconds(d.get("time_start", "")), _seconds(d.get("time_end", ""))
            if (not d.get("label") or not d.get("youtube_id") or start is None
                    or end is None or not d.get("split")):
                skipped.append(skip(where, "malformed", f"{where}: expected "
                                    f"label,youtube_id,time_start,time_end,split with whole seconds"))
                continue
            name = f"{d['youtube_id']}_{start:06d}_{end:06d}.mp4"
            if (d["split"], path) not in folders:
                folders[(d["split"], path)] = _kinetics_folder(root, d["split"], path)
            folder = folders[(d["split"], path)]
            add_entry(folder / name, d["label"], split_name(d["split"]), label_of[d["label"]], where, seen,
                      entries, skipped)
    return Layout("kinetics", {None: (entries, skipped)}, classes=classes)


def _kinetics_folder(root: Path, split: str, csv_path: Path) -> Path:
    """The flat folder of a split: ``<root>/<split>`` (``validate`` also as ``val``), else ``<root>/<csv stem>``."""
    for name in (split, split_name(split), csv_path.stem):
        if (root / name).is_dir():
            return root / name
    return root / split


def _load_json(path: Path) -> object:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def ssv2(src: Path) -> Layout:
    """SSv2: ids from labels.json; train.json -> "train", validation.json -> "val"; ``<id>.webm`` files."""
    labels = _load_json(src / "labels.json")
    if not isinstance(labels, dict) or not all(isinstance(v, (str, int)) and str(v).isdigit()
                                               for v in labels.values()):
        raise UserError(f"{src / 'labels.json'}: expected an object template -> numeric id")
    ids = {k: int(v) for k, v in labels.items()}
    classes = [""] * len(ids)
    for name, i in ids.items():
        if not 0 <= i < len(ids) or classes[i]:
            raise UserError(f"{src / 'labels.json'}: ids must be 0..{len(ids) - 1}, each once (got {i} for {name!r})")
        classes[i] = name
    root = next((src / d for d in ("20bn-something-something-v2", "videos") if (src / d).is_dir()), src)
    entries: list[Entry] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for fname, split in _SSV2_LISTS:
        if not (src / fname).is_file():
            continue
        items = _load_json(src / fname)
        if not isinstance(items, list):
            raise UserError(f"{src / fname}: expected a list of videos, got {type(items).__name__}")
        for n, item in enumerate(items):
            where = f"{src / fname}[{n}]"
            if not isinstance(item, dict) or not str(item.get("id", "")).isdigit() \
                    or not isinstance(item.get("template"), str):
                skipped.append(skip(where, "malformed", f"{where}: expected {{\"id\": digits, \"template\": text}}"))
                continue
            name = item["template"].replace("[", "").replace("]", "")
            path = root / f"{item['id']}.webm"
            if name not in ids:
                skipped.append(skip(path, "unknown_class", f"{where}: template {name!r} is not in labels.json"))
                continue
            add_entry(path, name, split, ids[name], where, seen, entries, skipped)
    return Layout("ssv2", {None: (entries, skipped)}, classes=classes)
