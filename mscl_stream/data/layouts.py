"""Official dataset layouts for `mscl-stream index`: which files a source lists, with which label and split.

``read_layout(src, fmt, splits)`` returns a :class:`Layout`: per manifest to write (one per numbered
split, or one), the entries to probe and the listed entries excluded before probing, each with a reason
(``missing``, ``unknown_class``, ``duplicate``, ``malformed``, ``unused``, plus the folder walk's reasons).
Formats (docs/data.md, "Dataset layouts"):

- ``folders``: class folders or split/class folders, or a CSV ``path,label[,start,end][,split]``
  (``discover.py``); labels number the sorted class names of the usable videos.
- ``unlabelled``: every file below the folder, label -1 (split folders train/val/test give the split).
- ``ucf101``: ``ucfTrainTestlist/classInd.txt`` + ``trainlist0N.txt``/``testlist0N.txt``; ids follow
  classInd (its 1-based numbers minus one).
- ``hmdb51``: ``testTrainMulti_7030_splits/<class>_test_splitN.txt`` (1 train, 2 test, 0 unused); ids
  number the sorted class names.
- ``kinetics``, ``ssv2``: :mod:`mscl_stream.data.layouts_web`.

The readers of the lists live in :mod:`mscl_stream.data.layout_lists` and ``layouts_web``; this module
detects the format and dispatches.

An annotation file that cannot be read as its format at all is a one-line UserError, raised before
anything is probed; a bad line inside a readable file is counted as ``malformed``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mscl_stream.data.discover import SPLIT_NAMES, discover
from mscl_stream.data.layout_lists import Layout, hmdb51, ucf101, unlabelled
from mscl_stream.data.layouts_web import is_kinetics_csv, kinetics, kinetics_csvs, ssv2
from mscl_stream.errors import UserError

FORMATS = ("auto", "folders", "unlabelled", "csv", "ucf101", "hmdb51", "kinetics", "ssv2")
NUMBERED = ("ucf101", "hmdb51")          # formats with numbered splits (--split N)


def detect(src: Path) -> str:
    """The format of ``src`` when its files say it unambiguously (docs/data.md lists the signs)."""
    if src.is_file():
        return "kinetics" if is_kinetics_csv(src) else "csv"
    if (src / "ucfTrainTestlist" / "classInd.txt").is_file() or (src / "classInd.txt").is_file():
        return "ucf101"
    if (src / "testTrainMulti_7030_splits").is_dir():
        return "hmdb51"
    if (src / "labels.json").is_file() and any((src / f).is_file() for f in ("train.json", "validation.json")):
        return "ssv2"
    if kinetics_csvs(src):
        return "kinetics"
    dirs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not dirs:
        return "unlabelled"                  # videos directly in the folder: no class structure
    if all(d.name in SPLIT_NAMES for d in dirs) and not any(p.is_dir() for d in dirs for p in d.iterdir()):
        return "unlabelled"                  # train/ val/ holding the videos themselves
    return "folders"                         # subfolders name the classes (a stray file: no_class)


def read_layout(src: str | os.PathLike, fmt: str = "auto", splits: list[int] | None = None,
                all_splits: bool = False) -> Layout:
    """Read the annotation files of ``src`` in format ``fmt`` (``auto``: :func:`detect`).

    Args:
        splits: numbered splits to write (ucf101/hmdb51); None: every split found when ``all_splits``
            (the output names a ``{split}`` placeholder), else the first (split 1).
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    fmt = detect(src) if fmt == "auto" else fmt
    if splits and fmt not in NUMBERED:
        raise UserError(f"--split: {fmt} has no numbered splits (only {', '.join(NUMBERED)} do)")
    if fmt in ("folders", "csv"):
        return Layout(fmt, {None: discover(src)})
    if not src.is_dir() and fmt not in ("kinetics",):
        raise UserError(f"{src}: --format {fmt} expects the dataset's folder")
    if fmt == "unlabelled":
        return Layout(fmt, {None: unlabelled(src)})
    if fmt in NUMBERED and splits is None:
        splits = [] if all_splits else [0]       # [] all found, [0] the first found
    if fmt == "ucf101":
        return ucf101(src, splits)
    if fmt == "hmdb51":
        return hmdb51(src, splits)
    return kinetics(src) if fmt == "kinetics" else ssv2(src)
