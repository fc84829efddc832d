"""`eval --splits`: one evaluation per split manifest and the summary's mean and spread; the eval configs
under configs/ load and name the setting they follow."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from conftest import TINY_TRAIN
from mscl_stream.cli import main
from mscl_stream.config import load_config
from mscl_stream.config.loading import validate
from mscl_stream.data.manifest import read_manifest, write_manifest
from mscl_stream.errors import UserError
from mscl_stream.eval.splits import parse_splits, split_path, summarise, summary_path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_summary_mean_std_min_max_by_hand():
    per_split = {1: {"views": "10x3", "by_views": {"10x3": {"top1": 0.50, "top5": 0.90}, "1x1": {"top1": 0.40}}},
                 2: {"views": "10x3", "by_views": {"10x3": {"top1": 0.60, "top5": 0.80}, "1x1": {"top1": 0.45}}},
                 3: {"views": "10x3", "by_views": {"10x3": {"top1": 0.70, "top5": 0.85}, "1x1": {"top1": 0.50}}}}
    s = summarise("finetune", per_split)
    top1 = s["views"]["10x3"]["top1"]
    # mean (0.5 + 0.6 + 0.7) / 3 = 0.6; sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert top1["mean"] == pytest.approx(0.6) and top1["std"] == pytest.approx(0.1)
    assert (top1["min"], top1["max"], top1["values"]) == (0.5, 0.7, [0.5, 0.6, 0.7])
    top5 = s["views"]["10x3"]["top5"]            # mean 0.85, std sqrt((0.0025 + 0.0025 + 0) / 2) = 0.05
    assert top5["mean"] == pytest.approx(0.85) and top5["std"] == pytest.approx(0.05)
    assert s["views"]["1x1"]["top1"]["std"] == pytest.approx(0.05) and s["splits"] == [1, 2, 3]
    one = summarise("retrieval", {2: {"views": "1x1", "R@1": 0.25}})
    assert one["views"]["1x1"]["R@1"] == {"values": [0.25], "mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25}


def test_split_names():
    assert parse_splits("1,2,3") == [1, 2, 3]
    for bad in ("1,x", "", "1,1"):
        with pytest.raises(UserError, match="--splits"):
            parse_splits(bad)
    assert split_path("r/ucf_split{split}.json", 2) == "r/ucf_split2.json"
    assert split_path("r/ucf.json", 2) == "r/ucf_split2.json"
    assert summary_path("r/ucf_split{split}.json") == "r/ucf_split_summary.json"
    assert summary_path("r/ucf.json") == "r/ucf_summary.json"


def test_retrieval_over_two_split_manifests(tiny_manifest, tmp_path, capsys):
    rows = sorted(read_manifest(tiny_manifest), key=lambda r: r.path)
    for n in (1, 2):      # split n tests on a different pair of videos
        test_rows = {rows[n - 1].path, rows[n + 2].path}
        write_manifest([dataclasses.replace(r, split="test" if r.path in test_rows else "train") for r in rows],
                       tmp_path / f"m_split{n}.jsonl")
    code = main(["eval", "retrieval", "--splits", "1,2", "--out", str(tmp_path / "res_split{split}.json"),
                 *TINY_TRAIN, f"data.manifest={tmp_path / 'm_split{split}.jsonl'}", "eval.dataset=tiny"])
    assert code == 0
    docs = [json.loads((tmp_path / f"res_split{n}.json").read_text()) for n in (1, 2)]
    assert [d["split"] for d in docs] == [1, 2] and all(d["dataset"] == "tiny" and d["views"] == "1x1" for d in docs)
    summary = json.loads((tmp_path / "res_split_summary.json").read_text())
    r1 = [d["R@1"] for d in docs]
    got = summary["views"]["1x1"]["R@1"]
    assert got["values"] == r1 and got["mean"] == pytest.approx(sum(r1) / 2)
    assert got["std"] == pytest.approx(abs(r1[0] - r1[1]) / math.sqrt(2))
    assert "over splits 1,2" in capsys.readouterr().out
    assert main(["eval", "retrieval", "--splits", "1,2", f"data.manifest={tmp_path / 'm_split1.jsonl'}"]) == 2
    assert main(["eval", "retrieval", "--splits", "1,3", f"data.manifest={tmp_path / 'm_split{split}.jsonl'}"]) == 2


@pytest.mark.parametrize("name, follows", [("ucf101_finetune", "UCF101"), ("hmdb51_finetune", "HMDB51"),
                                           ("ssv2_finetune", "Something-Something v2"),
                                           ("ucf101_retrieval", "UCF101 video retrieval")])
def test_eval_configs_load_and_name_their_setting(name, follows):
    path = CONFIGS / f"{name}.yaml"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert follows in header and "Follows" in header
    cfg = load_config(path, check=False)
    assert cfg.data.manifest and cfg.eval.dataset
    validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest="")))   # the rest is valid
    if name == "ssv2_finetune":      # the authors' released SSv2 recipe
        e = cfg.eval
        assert (e.segments, e.train_size, e.test_short_side, e.test_crop) == (16, 112, 128, 128)
        assert (e.lr, e.base_batch, e.weight_decay, e.clip_grad, e.milestones, e.epochs) == \
            (0.12, 32, 1e-6, 40.0, (14, 18), 22)
        assert e.test_views in ("", "1x1") and e.crops == 1


def test_demo_keeps_its_own_eval_budget():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.eval.clips == 1 and cfg.eval.crops == 1

