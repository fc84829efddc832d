"""`mscl-stream report RUN_OR_JSON... -o OUT`: evaluation results beside the paper's numbers (OUT.md, OUT.png).

Inputs are results JSONs written by ``mscl-stream eval --out`` and folders searched recursively for
``*.json``. A JSON is an evaluation result when it is an object with ``"kind"`` (finetune, retrieval or
linear) and at least one metric at the top level (``top1``, ``top5``, ``R@1`` .. ``R@50``, fractions);
anything else found in a folder (configs, a per-split summary, a benchmark's JSON) is skipped and
counted by reason, as is a second file holding the same result (``eval --out`` beside the copy a
fine-tune writes into its run folder). Results are grouped by (dataset, kind, views, encoder): the ``"dataset"``,
``"split"`` and ``"views"`` keys of the results contract; results written before those keys existed
are read all the same and shown with "?" (a split of null, a dataset without numbered splits, is
"-"). The encoder (the checkpoint, or the random-init baseline)
is part of the group so that a baseline never averages into a pretrained result.

Each group's metric is the mean over its results (normally one per split) +- the sample standard
deviation over them (shown only with two or more). The paper's numbers (:data:`PAPER`) stand in their
own column; a cell the paper does not report says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mscl_stream.errors import UserError

KINDS = ("finetune", "retrieval", "linear")
METRICS = ("top1", "top5", "R@1", "R@5", "R@10", "R@20", "R@50")

# MSCL (Ni et al., "Motion Sensitive Contrastive Learning for Self-supervised Video Representation",
# ECCV 2022, arXiv 2208.06105), R3D-18 pretrained on Kinetics-400. (dataset, kind, metric) -> fraction.
PAPER_SOURCE = "MSCL, Ni et al., ECCV 2022 (arXiv 2208.06105): R3D-18 pretrained on Kinetics-400"
PAPER: dict[tuple[str, str, str], float] = {
    ("ucf101", "finetune", "top1"): 0.915,
    ("ssv2", "finetune", "top1"): 0.503,
    ("ucf101", "retrieval", "R@1"): 0.656,
}
NOT_REPORTED = "not reported"
# Other spellings of the paper's dataset names (compared lower-case, letters and digits only).
ALIASES = {"somethingsomethingv2": "ssv2", "sthsthv2": "ssv2", "somethingsomething": "ssv2"}


def dataset_key(name: str) -> str:
    """The name a dataset is matched to the paper by: "UCF-101" -> "ucf101", "Something-Something-v2" -> "ssv2"."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return ALIASES.get(key, key)


@dataclass
class Result:
    """One evaluation result read from a JSON file."""
    path: Path
    kind: str
    dataset: str
    split: str
    views: str
    encoder: str
    metrics: dict[str, float]


@dataclass
class Collected:
    """Every result found, and what was skipped: reason -> count."""
    results: list[Result] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _shown(value) -> str:
    return "?" if value is None or value == "" else str(value)


def parse_result(obj, path: Path) -> Result | str:
    """The :class:`Result` in a loaded JSON, or the reason it is not one."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if obj.get("kind") not in KINDS:
        return "no evaluation kind"
    if obj.get("summary") is True:
        return "per-split summary (its split results are read instead)"
    metrics = {m: float(obj[m]) for m in METRICS
               if isinstance(obj.get(m), (int, float)) and not isinstance(obj.get(m), bool)}
    if not metrics:
        return "no metrics at the top level (a summary?)"
    # a null split is a dataset without numbered splits (SSv2, Kinetics): "-"; an absent key is an old file: "?"
    split = "-" if "split" in obj and obj["split"] is None else _shown(obj.get("split"))
    return Result(path, obj["kind"], _shown(obj.get("dataset")), split,
                  _shown(obj.get("views")), _shown(obj.get("encoder") or obj.get("checkpoint")), metrics)


def collect(inputs: list[str | os.PathLike]) -> Collected:
    """Read the results under ``inputs`` (files, and folders searched recursively for ``*.json``).

    Raises:
        UserError: an input that does not exist, or a file named directly that is not readable JSON.
    """
    found = Collected()
    seen: set[Path] = set()
    keys: set[tuple] = set()
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            if f.resolve() in seen or not f.is_file():
                continue
            seen.add(f.resolve())
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                if not p.is_dir():
                    raise UserError(f"{f}: not a readable JSON file ({type(e).__name__})") from None
                found.skip("not readable JSON")
                continue
            res = parse_result(obj, f)
            if isinstance(res, str):
                found.skip(res)
                continue
            key = (res.kind, res.dataset, res.split, res.views, res.encoder, tuple(sorted(res.metrics.items())))
            if key in keys:        # `eval --out` and the fine-tune run folder's copy of the same result
                found.skip("same result as another file")
                continue
            keys.add(key)
            found.results.append(res)
    return found


def _sort_split(s: str) -> tuple[int, str]:
    return (0, f"{int(s):09d}") if s.isdigit() else (1, s)


def summarize(results: list[Result]) -> list[dict]:
    """One row per (dataset, kind, views, encoder, metric), then one per paper number no result matched.

    Row keys: dataset, kind, views, encoder, splits (e.g. "1,2,3"), metric, values (fractions), mean,
    sd (sample standard deviation; NaN for one value), paper (fraction or None).
    """
    groups: dict[tuple[str, str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.kind, r.views, r.encoder), []).append(r)
    rows, matched = [], set()
    for (dataset, kind, views, encoder), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: _sort_split(r.split))
        for m in METRICS:
            xs = [r.metrics[m] for r in rs if m in r.metrics]
            if not xs:
                continue
            n, mean = len(xs), sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
            key = (dataset_key(dataset), kind, m)
            matched.add(key)
            rows.append({"dataset": dataset, "kind": kind, "views": views, "encoder": encoder,
                         "splits": ",".join(r.split for r in rs if m in r.metrics), "metric": m,
                         "values": xs, "mean": mean, "sd": sd, "paper": PAPER.get(key)})
    for (dataset, kind, m), value in PAPER.items():
        if (dataset, kind, m) not in matched:
            rows.append({"dataset": dataset, "kind": kind, "views": "", "encoder": "", "splits": "",
                         "metric": m, "values": [], "mean": math.nan, "sd": math.nan, "paper": value})
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(rows: list[dict], skipped: dict[str, int]) -> str:
    """The table as Markdown (percent), with the paper's source and what was skipped."""
    lines = ["| dataset | protocol | views | encoder | splits | metric | ours (%) | paper (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["values"]:
            ours = "no result"
        else:
            ours = _pct(r["mean"]) + ("" if math.isnan(r["sd"]) else f" +- {_pct(r['sd'])}")
        paper = NOT_REPORTED if r["paper"] is None else _pct(r["paper"])
        lines.append(f"| {r['dataset']} | {r['kind']} | {r['views'] or '-'} | {r['encoder'] or '-'} | "
                     f"{r['splits'] or '-'} | {r['metric']} | {ours} | {paper} |")
    notes = ["", f"ours: mean over the listed splits +- their sample standard deviation (two or more). "
             f"paper: {PAPER_SOURCE}."]
    if skipped:
        notes.append("skipped JSON files: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) + ".")
    return "\n".join(lines + notes) + "\n"


def _labels(rows: list[dict]) -> list[str]:
    """Row names for the plot; the encoder (a checkpoint's last two path parts) only where several appear."""
    def short(enc: str) -> str:
        return "/".join(Path(enc.split(":", 1)[1]).parts[-2:]) if enc.startswith("checkpoint:") else enc
    several = len({r["encoder"] for r in rows if r["encoder"]}) > 1
    return [" ".join(x for x in (r["dataset"], r["kind"], r["views"], r["metric"]) if x)
            + (f" [{short(r['encoder'])}]" if several and r["encoder"] else "") for r in rows]


def figure(rows: list[dict]):
    """A matplotlib Figure: one bar per row (ours, +- sd, each split a dot) and the paper's number as a
    black diamond; rows without a result of ours show the paper's number alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.42 * len(rows) + 1.6))
    ax = fig.add_subplot()
    ys = range(len(rows))
    means = [0.0 if math.isnan(r["mean"]) else 100 * r["mean"] for r in rows]
    sds = [0.0 if math.isnan(r["sd"]) else 100 * r["sd"] for r in rows]
    ax.barh(ys, means, xerr=sds, color="#c8cde8", ecolor="#555", capsize=3, label="ours (mean +- sd)")
    for i, r in enumerate(rows):
        ax.plot([100 * v for v in r["values"]], [i] * len(r["values"]), "o", color="#c33", ms=4, zorder=3)
    paper = [(i, 100 * r["paper"]) for i, r in enumerate(rows) if r["paper"] is not None]
    if paper:
        ax.plot([p for _, p in paper], [i for i, _ in paper], "D", color="black", ms=6, zorder=4,
                label="paper")
    ax.set_yticks(list(ys), _labels(rows), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"%  (dots: one split each)\npaper: {PAPER_SOURCE}", fontsize=8)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or type(e).__name__})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_report(inputs: list[str | os.PathLike], out: str | os.PathLike) -> tuple[Path, Path, Collected]:
    """Collect the results under ``inputs`` and write ``OUT.md`` and ``OUT.png`` (a .md/.png suffix on
    ``out`` is dropped); returns the two paths and what was read.

    Raises:
        UserError: an input missing, no evaluation result found, matplotlib missing, an output unwritable.
    """
    base = Path(out)
    if base.suffix.lower() in (".md", ".png"):
        base = base.with_suffix("")
    if base.is_dir():
        raise UserError(f"-o {out}: is a folder; give a name such as {base / 'results'} (writes .md and .png)")
    found = collect(inputs)
    if not found.results:
        why = ", ".join(f"{n} {r}" for r, n in sorted(found.skipped.items())) or "no JSON files"
        raise UserError(f"report: no evaluation results in {', '.join(map(str, inputs))} ({why})")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("report: matplotlib is not installed (pip install matplotlib)") from None
    rows = summarize(found.results)
    md, png = base.with_name(base.name + ".md"), base.with_name(base.name + ".png")
    text = markdown(rows, found.skipped)
    _write_atomic(md, lambda p: p.write_text(text, encoding="utf-8"))
    fig = figure(rows)
    _write_atomic(png, lambda p: fig.savefig(p, format="png", dpi=100))
    return md, png, found
