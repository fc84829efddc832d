"""The docs and the configuration tree agree: every key is documented, no doc names a key that is gone,
and every reference to a section of a Markdown file names a heading that exists.

Keys come from walking the dataclasses of ``mscl_stream.config.Config`` (and the loss-term names of
``loss.weights``); docs are README.md and docs/*.md, where a key is written in backticks as
``section.key`` (``section.key=value``, ``section.key: value`` and ``loss.weights.<term>`` included).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mscl_stream.config import Config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
# Mappings whose entries are free-form (any sub-key may be named after them).
FREE_MAPPINGS = {"flow.options"}
FILE_SUFFIXES = {"md", "py", "yaml", "yml", "json", "jsonl", "pt", "pth", "png", "txt"}


def config_keys() -> dict[str, set[str] | None]:
    """``section.key`` -> the allowed sub-keys (a set for loss terms, None for free or no mapping)."""
    cfg = Config()
    keys: dict[str, set[str] | None] = {}
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            value = getattr(getattr(cfg, sec.name), f.name)
            name = f"{sec.name}.{f.name}"
            keys[name] = set(value) if isinstance(value, dict) and name not in FREE_MAPPINGS else None
    return keys


def documented_names(text: str, sections: set[str]) -> list[str]:
    """Dotted names in backtick spans of ``text`` that start with a section name."""
    pat = re.compile(r"(?<![\w./-])((?:%s)\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?![\w(])" % "|".join(sorted(sections)))
    names = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for m in pat.finditer(span):
            name = m.group(1)
            if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue                      # `data.md`, `train.py`: files, not keys
            names.append(name)
    return names


def is_code_name(section: str, name: str) -> bool:
    """True when ``section.name`` is the package's code (``augment.upload.upload_views``, ``train.trainer``):
    a submodule, or a def / class / assignment in the module of that name (read as text, not imported)."""
    pkg = ROOT / "mscl_stream"
    if (pkg / section / f"{name}.py").is_file() or (pkg / section / name).is_dir():
        return True
    sources = [pkg / f"{section}.py", pkg / section / "__init__.py"]
    pat = re.compile(rf"^(?:def|class)\s+{name}\b|^{name}\s*[:=]", re.M)
    return any(p.is_file() and pat.search(p.read_text(encoding="utf-8")) for p in sources)


def stale_names(text: str, keys: dict[str, set[str] | None]) -> list[str]:
    """Names in ``text`` that are not config keys (or not sub-keys of a mapping key)."""
    sections = {k.split(".")[0] for k in keys}
    bad = []
    for name in documented_names(text, sections):
        parts = name.split(".")
        key = ".".join(parts[:2])
        if key not in keys and is_code_name(*parts[:2]):
            continue
        if key not in keys:
            bad.append(name)
        elif len(parts) == 3 and key not in FREE_MAPPINGS and parts[2] not in (keys[key] or set()):
            bad.append(name)
    return bad


def missing_keys(reference: str, keys: dict[str, set[str] | None]) -> list[str]:
    """Config keys (and loss terms) that ``reference`` never writes as `section.key`."""
    want = list(keys) + [f"{k}.{sub}" for k, subs in keys.items() if subs for sub in sorted(subs)]
    return [k for k in want if f"`{k}`" not in reference]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_config_key_is_in_the_reference():
    keys = config_keys()
    assert len(keys) > 60 and "loss.weights" in keys and keys["loss.weights"] >= {"rgb_rgb", "lmcl"}
    missing = missing_keys(REFERENCE.read_text(encoding="utf-8"), keys)
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def test_docs_name_only_existing_keys():
    keys = config_keys()
    found = {}
    for path in doc_files():
        bad = stale_names(path.read_text(encoding="utf-8"), keys)
        if bad:
            found[str(path.relative_to(ROOT))] = sorted(set(bad))
    assert not found, f"keys that no longer exist: {found}"


def test_the_checks_catch_what_they_should():
    # The checkers themselves, on text made to fail (so the two tests above can fail).
    keys = config_keys()
    text = ("Set `data.batch_size=4`, `loss.weights.lmcl=0`, `flow.options.corr` and `model.compat: released`; "
            "see `docs/data.md`, `data.md`, `mscl_stream.train.trainer`, `train.trainer`, `data.loader` and "
            "`augment.upload.upload_views`. Gone: `data.num_workers`, "
            "`loss.weights.rgb_depth`, `train.batch_size=2`, `optim.lr.x`.")
    assert stale_names(text, keys) == ["data.num_workers", "loss.weights.rgb_depth", "train.batch_size",
                                       "optim.lr.x"]
    reference = REFERENCE.read_text(encoding="utf-8").replace("`train.keep_checkpoints`", "keep_checkpoints")
    assert missing_keys(reference, keys) == ["train.keep_checkpoints"]


# ----------------------------------------------------------------------------- section references

SECTION_REF = re.compile(r'((?:[\w.-]+/)*[\w.-]+\.md)\)?,? \(?"([^"]+)"')


def section_refs(text: str) -> list[tuple[str, str]]:
    """(file, section) pairs of references such as ``benchmarks/README.md ("Decode variants")`` or
    ``data.md, "Choosing the decoder"``, line breaks inside a reference allowed."""
    return SECTION_REF.findall(re.sub(r"\s+", " ", text))


def headings(path: Path) -> list[str]:
    return [ln.lstrip("#").strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]


def broken_refs(source: Path) -> list[str]:
    """References in ``source`` to a Markdown file or section that does not exist (a section may be named
    by the start of its heading)."""
    bad = []
    for name, section in section_refs(source.read_text(encoding="utf-8")):
        candidates = [ROOT / name, source.parent / name, ROOT / "docs" / name]
        target = next((p for p in candidates if p.is_file()), None)
        if target is None:
            bad.append(f"{name} (no such file)")
        elif not any(h.startswith(section) for h in headings(target)):
            bad.append(f'{name}, "{section}"')
    return bad


def test_section_references_point_at_existing_headings():
    sources = [*doc_files(), ROOT / "benchmarks" / "README.md", *sorted((ROOT / "mscl_stream").rglob("*.py")),
               *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "configs").glob("*.yaml"))]
    refs = sum(len(section_refs(p.read_text(encoding="utf-8"))) for p in sources)
    assert refs >= 10
    found = {str(p.relative_to(ROOT)): b for p in sources if (b := broken_refs(p))}
    assert not found, f"references to sections that do not exist: {found}"


def test_the_reference_check_catches_a_missing_section(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text('# Top\n## Choosing things\nSee a.md, "Choosing things" and\nbenchmarks/README.md\n("No such '
                   'heading"), a.md ("Top").\n')
    assert section_refs(doc.read_text()) == [("a.md", "Choosing things"), ("benchmarks/README.md", "No such heading"),
                                              ("a.md", "Top")]
    assert broken_refs(doc) == ['benchmarks/README.md, "No such heading"']


# ----------------------------------------------------------------------------- work-tracking references

# User-facing text names targets and results by what they measure ("k400 CPU-ms per sample"), never by
# the number of the issue or item that asked for them ("issue 12 item 4", "the targets").
WORK_TRACKING = re.compile(r"\bissue\s*#?\d+|\bissues\s*#\d+|\bthe issue's\b|\bissue (?:targets?|notes|items?)\b"
                           r"|\bitems? \d+(?:\s*-\s*\d+)?\b", re.I)


def work_tracking_refs(text: str) -> list[str]:
    """``line: match`` for every work-tracking reference in ``text``."""
    return [f"{n}: {m.group(0)}" for n, line in enumerate(text.splitlines(), 1) for m in WORK_TRACKING.finditer(line)]


def test_user_facing_text_names_no_work_tracking_numbers():
    sources = [*doc_files(), ROOT / "benchmarks" / "README.md", *sorted((ROOT / "benchmarks").glob("*.py")),
               *sorted((ROOT / "configs").glob("*.yaml"))]
    found = {str(p.relative_to(ROOT)): b for p in sources if (b := work_tracking_refs(p.read_text(encoding="utf-8")))}
    assert not found, f"name targets and results by what they measure, not by issue/item numbers: {found}"


def test_the_work_tracking_check_catches_references():
    text = ("## Flow (issue targets: 1.3x)\nas in issue 12 item 4; issue #7 and Issue 11's CPU target;\n"
            "the issue's shape, reported in their issue notes; items 4-5; issues #3 and #4.\n"
            "Fine: departure 3 of docs/method.md, a step issues 100 kernels, the issue is speed.\n")
    assert work_tracking_refs(text) == ["1: issue targets", "2: issue 12", "2: item 4", "2: issue #7", "2: Issue 11",
                                        "3: the issue's", "3: issue notes", "3: items 4-5", "3: issues #3"]
