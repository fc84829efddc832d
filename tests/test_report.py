"""`mscl-stream report`: hand-written results JSONs -> the Markdown table worked out by hand, and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mscl_stream.cli import main

CKPT = "checkpoint:runs/k400/checkpoints/last.pt"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture
def runs(tmp_path) -> Path:
    """Results in nested run folders, as `eval --out` writes them, plus JSON files that are no results."""
    root = tmp_path / "runs"
    for split, top1, top5 in [(1, 0.90, 0.98), (2, 0.92, 0.99), (3, 0.94, 1.00)]:
        _write(root / "ucf" / f"split{split}" / "finetune_10x3.json",
               {"kind": "finetune", "dataset": "ucf101", "split": split, "views": "10x3", "top1": top1,
                "top5": top5, "encoder": CKPT, "info": {"test": 3783}})
    _write(root / "ucf" / "random" / "finetune.json",
           {"kind": "finetune", "dataset": "UCF-101", "split": 1, "views": "10x3", "top1": 0.30,
            "encoder": "random-init(seed=0)"})
    _write(root / "ucf" / "retrieval.json",
           {"kind": "retrieval", "dataset": "ucf101", "split": 1, "views": "10x1", "R@1": 0.6, "R@5": 0.7,
            "R@10": 0.75, "R@20": 0.8, "R@50": 0.9, "classes": ["a"], "encoder": CKPT})
    _write(root / "hmdb" / "a" / "b" / "ft.json",
           {"kind": "finetune", "dataset": "hmdb51", "split": 2, "views": "10x3", "top1": 0.6, "encoder": CKPT})
    _write(root / "ssv2.json", {"kind": "finetune", "dataset": "ssv2", "split": None, "views": "16seg x1",
                                "top1": 0.25, "top5": 0.5, "encoder": CKPT})
    # written before results carried dataset / split / views
    _write(root / "old" / "linear.json", {"kind": "linear", "top1": 0.5, "train_top1": 0.9, "encoder": CKPT})
    _write(root / "ucf" / "config.json", {"model": {"rgb_width": 64}})
    _write(root / "ucf" / "broken.json", '{"kind": "finetune", "top1": 0.')
    _write(root / "ucf" / "summary.json", {"kind": "finetune", "dataset": "ucf101", "splits": [1, 2, 3],
                                           "summary": True, "views": {"10x3": {"top1": {"mean": 0.92}}}})
    _write(root / "ucf" / "split2" / "run" / "results_10x3.json",       # the run folder's copy of split 2
           json.loads((root / "ucf" / "split2" / "finetune_10x3.json").read_text()) | {"date": "later"})
    _write(root / "ucf" / "notes.txt", "not json, not read")
    return root


EXPECTED = """\
| dataset | protocol | views | encoder | splits | metric | ours (%) | paper (%) |
| --- | --- | --- | --- | --- | --- | --- | --- |
| ? | linear | ? | {ckpt} | ? | top1 | 50.0 | not reported |
| UCF-101 | finetune | 10x3 | random-init(seed=0) | 1 | top1 | 30.0 | 91.5 |
| hmdb51 | finetune | 10x3 | {ckpt} | 2 | top1 | 60.0 | not reported |
| ssv2 | finetune | 16seg x1 | {ckpt} | - | top1 | 25.0 | 50.3 |
| ssv2 | finetune | 16seg x1 | {ckpt} | - | top5 | 50.0 | not reported |
| ucf101 | finetune | 10x3 | {ckpt} | 1,2,3 | top1 | 92.0 +- 2.0 | 91.5 |
| ucf101 | finetune | 10x3 | {ckpt} | 1,2,3 | top5 | 99.0 +- 1.0 | not reported |
| ucf101 | retrieval | 10x1 | {ckpt} | 1 | R@1 | 60.0 | 65.6 |
| ucf101 | retrieval | 10x1 | {ckpt} | 1 | R@5 | 70.0 | not reported |
| ucf101 | retrieval | 10x1 | {ckpt} | 1 | R@10 | 75.0 | not reported |
| ucf101 | retrieval | 10x1 | {ckpt} | 1 | R@20 | 80.0 | not reported |
| ucf101 | retrieval | 10x1 | {ckpt} | 1 | R@50 | 90.0 | not reported |
""".format(ckpt=CKPT)


def test_report_table_matches_the_hand_computed_one(runs, tmp_path, capsys):
    out = tmp_path / "report" / "table"
    assert main(["report", str(runs), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "8 results" in said and "4 other JSON files skipped" in said
    text = (tmp_path / "report" / "table.md").read_text()
    table, notes = text.split("\n\n", 1)
    assert table + "\n" == EXPECTED
    assert "sample standard deviation" in notes and "arXiv 2208.06105" in notes
    assert ("skipped JSON files: 1 no evaluation kind, 1 not readable JSON, "
            "1 per-split summary (its split results are read instead), 1 same result as another file.") in notes
    png = (tmp_path / "report" / "table.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["table.md", "table.png"]


def test_report_takes_files_and_folders_once_each_and_drops_an_output_suffix(runs, tmp_path, capsys):
    one = runs / "ucf" / "split1" / "finetune_10x3.json"
    assert main(["report", str(one), str(runs / "ucf" / "split1"), "-o", str(tmp_path / "r.md")]) == 0
    assert "1 results" in capsys.readouterr().out
    rows = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| ucf101")]
    assert rows == [f"| ucf101 | finetune | 10x3 | {CKPT} | 1 | top1 | 90.0 | 91.5 |",
                    f"| ucf101 | finetune | 10x3 | {CKPT} | 1 | top5 | 98.0 | not reported |",
                    "| ucf101 | retrieval | - | - | - | R@1 | no result | 65.6 |"]
    assert "| ssv2 | finetune | - | - | - | top1 | no result | 50.3 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").is_file()


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_report_refuses_in_one_line(runs, tmp_path, capsys):
    out = str(tmp_path / "r")
    err = _error(capsys, ["report", str(runs / "ucf" / "config.json"), "-o", out])
    assert "no evaluation results" in err and "1 no evaluation kind" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no JSON files" in _error(capsys, ["report", str(empty), "-o", out])
    assert "no such file or folder" in _error(capsys, ["report", str(tmp_path / "nope"), "-o", out])
    assert "not a readable JSON" in _error(capsys, ["report", str(runs / "ucf" / "broken.json"), "-o", out])
    assert "is a folder" in _error(capsys, ["report", str(runs), "-o", str(empty)])
    assert not list(tmp_path.glob("r.*"))
