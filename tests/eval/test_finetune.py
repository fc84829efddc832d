"""Fine-tuning as a run: stopped by SIGTERM and resumed it ends where an uninterrupted run ends; weights and
results files; the training crop; unlabelled manifests refused."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch

from mscl_stream.cli import main
from mscl_stream.config import load_config
from mscl_stream.data.manifest import read_manifest, write_manifest
from mscl_stream.errors import Interrupted
from mscl_stream.eval import run_eval
from mscl_stream.eval import finetune as FT
from mscl_stream.eval.features import build_r3d
from mscl_stream.eval.views import score_views
from tests.conftest import TINY_TRAIN

RESULT_KEYS = {"kind", "dataset", "split", "views", "top1", "top5", "info", "checkpoint", "config", "machine", "date"}


@pytest.fixture(scope="module")
def split_manifest(tiny_manifest, tmp_path_factory):
    """The six tiny videos: two of each class for training, one of each for testing."""
    rows = sorted(read_manifest(tiny_manifest), key=lambda r: r.path)
    seen: dict[int, int] = {}
    out = []
    for r in rows:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(dataclasses.replace(r, split="test" if seen[r.label] == 3 else "train"))
    path = tmp_path_factory.mktemp("ft") / "manifest.jsonl"
    write_manifest(out, path)
    return path


def _cfg(manifest, out_dir, *extra):
    return load_config(None, [*TINY_TRAIN, f"data.manifest={manifest}", f"eval.out_dir={out_dir}", "eval.epochs=2",
                              "eval.batch_size=2", "eval.base_batch=2", "eval.lr=0.05", "eval.milestones=[1, 2]",
                              "eval.test_views=1x1,2x3", "eval.dataset=tiny", "train.keep_checkpoints=0", *extra])


def test_finetune_stopped_and_resumed_ends_like_an_uninterrupted_run(split_manifest, tmp_path, monkeypatch):
    ref = run_eval("finetune", cfg=_cfg(split_manifest, tmp_path / "ref"), out=str(tmp_path / "ref.json"))
    sgd_step = FT.FinetuneLoop._sgd_step

    def stop_at_3(self, clips, labels):           # a real SIGTERM after the 3rd of 4 steps (inside epoch 2)
        sgd_step(self, clips, labels)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FT.FinetuneLoop, "_sgd_step", stop_at_3)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 3"):
        run_eval("finetune", cfg=_cfg(split_manifest, tmp_path / "run"))
    monkeypatch.setattr(FT.FinetuneLoop, "_sgd_step", sgd_step)
    got = run_eval("finetune", cfg=_cfg(split_manifest, tmp_path / "run", "train.resume=auto"))

    want_w = torch.load(tmp_path / "ref" / "weights_last.pt", weights_only=True)
    got_w = torch.load(tmp_path / "run" / "weights_last.pt", weights_only=True)
    assert set(want_w) == set(got_w) and all(torch.equal(want_w[k], got_w[k]) for k in want_w)
    assert got["info"]["history"] == ref["info"]["history"] and got["info"]["steps"] == 4
    assert [h["epoch"] for h in got["info"]["history"]] == [1, 2]
    assert [h["lr"] for h in got["info"]["history"]] == pytest.approx([0.05, 0.005])     # x0.1 at epoch 1
    assert got["by_views"] == ref["by_views"] and set(got["by_views"]) == {"1x1", "2x3"}
    # best weights: the epoch with the best validation top-1, a plain state dict of the encoder + head
    hist = ref["info"]["history"]
    best_epoch = max(range(len(hist)), key=lambda i: (hist[i]["val_top1"], -i)) + 1
    assert ref["info"]["best_val"]["epoch"] == best_epoch
    best = torch.load(tmp_path / "ref" / "weights_best.pt", weights_only=True)
    assert "fc.1.weight" in best and set(best) == set(want_w)


def test_results_files_per_view_count_score_the_last_weights(split_manifest, tmp_path, caplog):
    cfg = _cfg(split_manifest, tmp_path / "ft", "eval.epochs=1")
    with caplog.at_level("INFO", logger="mscl_stream.eval"):
        res = run_eval("finetune", cfg=cfg, out=str(tmp_path / "out.json"))
    # the device is logged once it is known (init_distributed picks it), never as "None"
    assert "eval finetune: 4 train / 2 test videos, random init, device cpu" in caplog.text
    assert "device None" not in caplog.text
    main_json = json.loads((tmp_path / "out.json").read_text())
    assert main_json["info"]["device"] == "cpu"
    assert RESULT_KEYS <= set(main_json) and main_json["views"] == "1x1" and main_json["kind"] == "finetune"
    assert main_json["dataset"] == "tiny" and main_json["split"] is None
    model, _ = build_r3d(None, num_classes=2, width=cfg.model.rgb_width)
    model.load_state_dict(torch.load(tmp_path / "ft" / "weights_last.pt", weights_only=True))
    test = [r for r in read_manifest(split_manifest) if r.split == "test"]
    for label, (clips, crops) in {"1x1": (1, 1), "2x3": (2, 3)}.items():
        doc = json.loads((tmp_path / "ft" / f"results_{label}.json").read_text())
        assert RESULT_KEYS <= set(doc) and doc["views"] == label
        probs, labels, _ = score_views(model, test, cfg, "cpu", clips=clips, crops=crops)
        top1 = float((probs.argmax(1) == labels).double().mean())
        assert doc["top1"] == pytest.approx(top1) and doc["top5"] == 1.0       # 2 classes: top-5 holds both
        assert res["by_views"][label]["top1"] == doc["top1"]


def test_resized_crop_box_follows_the_area_and_ratio_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y, x, ch, cw = FT.resized_crop_box(rng, 128, 171, (0.08, 1.0), (0.75, 4 / 3))
        assert 0 <= y and y + ch <= 128 and 0 <= x and x + cw <= 171
        # rounding each side moves the area by at most about one row and one column
        assert 0.08 * 128 * 171 - ch - cw - 1 <= ch * cw <= 128 * 171
    # no try fits (an area above the frame's): the whole frame clamped to the ratio range, centred
    assert FT.resized_crop_box(rng, 100, 400, (2.0, 2.0), (0.75, 4 / 3)) == (0, 133, 100, 133)


def test_train_view_mirrors_the_resized_box():
    frames = np.random.default_rng(1).integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    plain = FT.train_view(frames, (2, 4, 8, 8), 8, flip=False)      # same size: the box's own pixels
    want = torch.from_numpy(frames[:, 2:10, 4:12].astype(np.float64) / 255).permute(3, 0, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1, 1)
    assert torch.allclose(plain.double(), (want - mean) / std, atol=1e-5)
    assert torch.equal(FT.train_view(frames, (2, 4, 8, 8), 8, flip=True), plain.flip(3))


def test_eval_refuses_an_unlabelled_manifest(split_manifest, tmp_path, capsys):
    rows = [dataclasses.replace(r, label=-1, label_name="") for r in read_manifest(split_manifest)]
    write_manifest(rows, tmp_path / "unlabelled.jsonl")
    code = main(["eval", "finetune", f"data.manifest={tmp_path / 'unlabelled.jsonl'}",
                 f"eval.out_dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "every row is unlabelled" in err[0]
    assert not (tmp_path / "ft").exists()          # refused before any run folder or model


def test_segment_sampling_finetune_names_its_views(split_manifest, tmp_path):
    cfg = _cfg(split_manifest, tmp_path / "seg", "eval.segments=4", "eval.max_steps=1", "eval.test_views=1x1",
               "eval.train_size=24", "eval.val_every=0")
    plan = FT.epoch_plan(read_manifest(split_manifest), cfg, 0)
    assert all(len(p.indices) == 1 and len(p.indices[0]) == 4 for p in plan)      # 4 segments, one frame each
    res = run_eval("finetune", cfg=cfg)
    assert res["views"] == "4seg x1" and res["info"]["steps"] == 1
    assert (tmp_path / "seg" / "results_4segx1.json").is_file() and not (tmp_path / "seg" / "weights_best.pt").exists()


def test_training_decode_takes_the_evaluation_decode_path(split_manifest, tmp_path, monkeypatch):
    # the training clips go through eval/decode.py like validation and test: worker processes, or threads
    # with data.pyav_workers=threads; either way the same frames, so one SGD step gives the same weights
    from mscl_stream.distributed import DistInfo
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, backend=None)
    train = [r for r in read_manifest(split_manifest) if r.split == "train"]
    real, seen = FT.iter_decoded, []

    def spy(*args, **kw):
        seen.append(kw["processes"])
        return real(*args, **kw)
    monkeypatch.setattr(FT, "iter_decoded", spy)
    weights = {}
    for mode in ("threads", "processes"):
        torch.manual_seed(0)                       # dropout
        loop = FT.FinetuneLoop(_cfg(split_manifest, tmp_path / mode, f"data.pyav_workers={mode}"), dist, None,
                               train, 2, 0.05, "")
        assert next(loop.train_batches()) == 1
        weights[mode] = loop.core.state_dict()
    assert seen == [False, True]
    assert all(torch.equal(weights["threads"][k], weights["processes"][k]) for k in weights["threads"])
