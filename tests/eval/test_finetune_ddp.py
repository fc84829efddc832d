"""Fine-tuning under torchrun (two gloo processes on CPU): each rank trains on its own videos of every batch,
the ranks end with equal weights, and the test scores gathered from both ranks cover every test video;
`--splits 1,2` fine-tunes both splits in one launch and one process group."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, run_ranks
from mscl_stream.config import dump_config, load_config
from mscl_stream.data.manifest import read_manifest, write_manifest
from mscl_stream.eval.finetune import epoch_plan

RANK_SCRIPT = """
import sys, torch
from mscl_stream.config import load_config
import mscl_stream.eval.finetune_run as R
from mscl_stream.eval import run_eval
holder = {}
class Loop(R.FinetuneLoop):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        holder["loop"] = self
if __name__ == "__main__":      # decode worker processes import this file too
    R.FinetuneLoop = Loop
    run_eval("finetune", cfg=load_config(sys.argv[1]), out=sys.argv[3])
    params = torch.cat([p.detach().flatten() for p in holder["loop"].core.parameters()])
    torch.save({"params": params, "steps": holder["loop"].step}, sys.argv[2])
"""


def _split_manifests(tiny_manifest, tmp_path):
    """m_split1.jsonl, m_split2.jsonl: each split tests on a different pair of videos (one per class)."""
    rows = sorted(read_manifest(tiny_manifest), key=lambda r: r.path)
    for n in (1, 2):
        test_rows = {rows[n - 1].path, rows[n + 2].path}
        write_manifest([dataclasses.replace(r, split="test" if r.path in test_rows else "train") for r in rows],
                       tmp_path / f"m_split{n}.jsonl")
    return str(tmp_path / "m_split{split}.jsonl")


def _manifest(tiny_manifest, path):
    rows = sorted(read_manifest(tiny_manifest), key=lambda r: r.path)
    write_manifest([dataclasses.replace(r, split="test" if i >= 4 else "train") for i, r in enumerate(rows)], path)
    return path


def test_epoch_plan_gives_each_rank_its_own_share(tiny_manifest, tmp_path):
    rows = read_manifest(_manifest(tiny_manifest, tmp_path / "m.jsonl"))
    cfg = load_config(None, TINY_TRAIN)
    one = [p.record.path for p in epoch_plan(rows, cfg, 3)]
    ranks = [[p.record.path for p in epoch_plan(rows, cfg, 3, r, 4)] for r in range(4)]
    assert sorted(one) == sorted(r.path for r in rows)
    # one shared order dealt out rank by rank, padded by wrapping to 8 = 2 per rank
    assert [ranks[r][i] for i in range(2) for r in range(4)] == one + one[:2]
    assert [p.record.path for p in epoch_plan(rows, cfg, 4)] != one          # a new order each epoch


@pytest.mark.slow
def test_two_process_finetune_equal_weights_and_gathered_test(tiny_manifest, tmp_path):
    manifest = _manifest(tiny_manifest, tmp_path / "m.jsonl")
    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={manifest}", f"eval.out_dir={tmp_path / 'ft'}",
                             "eval.epochs=1", "eval.batch_size=2", "eval.base_batch=2", "eval.lr=0.05",
                             "eval.test_views=1x3", "data.pyav_workers=threads"])
    dump_config(cfg, tmp_path / "ddp.yaml")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    run_ranks(tmp_path / "rank.py", lambda r: [str(tmp_path / "ddp.yaml"), str(tmp_path / f"rank{r}.pt"),
                                                str(tmp_path / "out.json")], timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["steps"] == r1["steps"] == 2          # 4 videos, 2 per step: one on each rank
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["views"] == "1x3" and doc["info"]["test"] == 2 and doc["info"]["skipped_undecodable"] == 0
    saved = torch.load(tmp_path / "ft" / "weights_last.pt", weights_only=True)
    torch.testing.assert_close(torch.cat([v.flatten() for k, v in saved.items() if "running" not in k
                                          and "num_batches" not in k]), r0["params"], rtol=0, atol=0)


RETRIEVAL_SCRIPT = """
import json, sys
import mscl_stream.eval as E
from mscl_stream.cli import main
if __name__ == "__main__":      # decode worker processes import this file too
    wrote, extracted = [], []
    write, extract = E.write_json, E.extract_features
    E.write_json = lambda path, obj: (wrote.append(path), write(path, obj))[1]
    E.extract_features = lambda *a, **k: (extracted.append(len(a[1])), extract(*a, **k))[1]
    code = main(["eval", "retrieval", *sys.argv[2:]])
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "wrote": wrote, "extracted": extracted}, f)
"""


@pytest.mark.slow
def test_retrieval_over_splits_under_torchrun_runs_on_rank_zero_only(tiny_manifest, tmp_path):
    # retrieval is not sharded: rank 0 extracts every feature and writes every file, rank 1 does neither
    manifest = _split_manifests(tiny_manifest, tmp_path)
    (tmp_path / "rank.py").write_text(RETRIEVAL_SCRIPT)
    out = str(tmp_path / "res_split{split}.json")
    run_ranks(tmp_path / "rank.py", lambda r: [str(tmp_path / f"rank{r}.json"), "--splits", "1,2", "--out", out,
                                                *TINY_TRAIN, f"data.manifest={manifest}",
                                                "data.pyav_workers=threads"], timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    assert r0["extracted"] == [4, 2, 4, 2] and r1["extracted"] == []        # gallery, queries per split
    assert r0["wrote"] == [out.format(split=1), out.format(split=2), str(tmp_path / "res_split_summary.json")]
    assert r1["wrote"] == []
    summary = json.loads((tmp_path / "res_split_summary.json").read_text())
    assert summary["splits"] == [1, 2] and len(summary["views"]["1x1"]["R@1"]["values"]) == 2


SPLITS_SCRIPT = """
import json, sys
import torch.distributed as tdist
from mscl_stream.cli import main
if __name__ == "__main__":      # decode worker processes import this file too
    joins, init = [], tdist.init_process_group
    tdist.init_process_group = lambda *a, **k: (joins.append(1), init(*a, **k))[1]
    code = main(["eval", "finetune", *sys.argv[2:]])
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "joins": len(joins), "left": not tdist.is_initialized()}, f)
"""


@pytest.mark.slow
def test_finetune_over_two_splits_in_one_launch(tiny_manifest, tmp_path):
    # both splits' fine-tunes run in one process group, joined once per rank and left at the end; a group
    # left and re-joined between splits fails or hangs a rank (run_ranks' timeout catches a hang)
    manifest = _split_manifests(tiny_manifest, tmp_path)
    (tmp_path / "rank.py").write_text(SPLITS_SCRIPT)
    out = str(tmp_path / "res_split{split}.json")
    run_ranks(tmp_path / "rank.py", lambda r: [
        str(tmp_path / f"rank{r}.json"), "--splits", "1,2", "--out", out, *TINY_TRAIN, f"data.manifest={manifest}",
        f"eval.out_dir={tmp_path / 'ft'}", "eval.epochs=1", "eval.batch_size=2", "eval.base_batch=2",
        "eval.lr=0.05", "eval.val_every=0", "eval.test_views=2x1,1x1", "data.pyav_workers=threads"], timeout=300)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"code": 0, "joins": 1, "left": True}
    docs = [json.loads(Path(out.format(split=n)).read_text()) for n in (1, 2)]
    assert [d["split"] for d in docs] == [1, 2] and all(d["views"] == "2x1" for d in docs)
    assert [d["info"]["run_dir"] for d in docs] == [str(tmp_path / "ft" / f"split{n}") for n in (1, 2)]
    assert all(d["info"]["steps"] == 2 and d["info"]["test"] == 2 for d in docs)   # 4 videos, 2 per step
    summary = json.loads((tmp_path / "res_split_summary.json").read_text())
    assert summary["splits"] == [1, 2] and set(summary["views"]) == {"2x1", "1x1"}
    for label in ("2x1", "1x1"):      # each split's run folder holds one results file per view count
        per = [json.loads((tmp_path / "ft" / f"split{n}" / f"results_{label}.json").read_text()) for n in (1, 2)]
        assert [p["split"] for p in per] == [1, 2]
        for key in ("top1", "top5"):
            values = [p[key] for p in per]
            got = summary["views"][label][key]
            assert got["values"] == values and got["mean"] == pytest.approx((values[0] + values[1]) / 2)
            assert got["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert [d["top1"] for d in docs] == summary["views"]["2x1"]["top1"]["values"]
