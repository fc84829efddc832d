"""Linear probe on toy features; `run_eval` end to end on tiny real videos (random-init baseline)."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mscl_stream.config import load_config
from mscl_stream.data.manifest import VideoRecord, write_manifest
from mscl_stream.data.synthetic import moving_texture_frames, write_video
from mscl_stream.errors import UserError
from mscl_stream.eval import run_eval, run_evals
from mscl_stream.eval.linear import linear_probe


def _blobs(n_per, k, dim, sep, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_per * k, dim, generator=g)
    y = torch.arange(k).repeat_interleave(n_per)
    x[torch.arange(len(y)), y] += sep          # class c is shifted along axis c
    return x, y


def test_separable_features_are_separated():
    xtr, ytr = _blobs(30, 3, 6, sep=8.0, seed=0)
    xte, yte = _blobs(30, 3, 6, sep=8.0, seed=1)
    r = linear_probe(xtr, ytr, xte, yte)
    assert r["top1"] == 1.0 and r["train_top1"] == 1.0


def test_shuffled_labels_give_chance():
    xtr, ytr = _blobs(100, 4, 20, sep=8.0, seed=0)
    xte, yte = _blobs(100, 4, 20, sep=8.0, seed=1)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(3))
    r = linear_probe(xtr, ytr[perm], xte, yte)
    # predictions then carry no information about the true test labels: 25 % +- 2.2 % (1 sd)
    assert 0.15 < r["top1"] < 0.36
    assert linear_probe(xtr, ytr, xte, yte)["top1"] > 0.95


def test_objective_minimum_matches_scipy_and_is_scale_free():
    x, y = _blobs(20, 3, 5, sep=1.0, seed=4)            # overlapping classes: a non-trivial optimum
    wd = 1e-2
    r = linear_probe(x, y, x, y, weight_decay=wd)
    # independent reference: scipy L-BFGS-B on the same objective written in numpy (float64)
    xs = x.double().numpy()
    xs = (xs - xs.mean(0)) / xs.std(0)
    yn = y.numpy()

    def f(theta):
        w, b = theta[:15].reshape(5, 3), theta[15:]
        z = xs @ w + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(yn)), yn]).mean() + 0.5 * wd * (w ** 2).sum()
        p[np.arange(len(yn)), yn] -= 1
        gw = xs.T @ p / len(yn) + wd * w
        return loss, np.concatenate([gw.ravel(), p.mean(0)])

    ref = minimize(f, np.zeros(18), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    assert r["train_loss"] == pytest.approx(ref.fun, rel=1e-6)
    # standardisation: rescaling a feature changes nothing
    x2 = x.clone()
    x2[:, 2] *= 1e4
    r2 = linear_probe(x2, y, x2, y, weight_decay=wd)
    assert r2["top1"] == r["top1"] and r2["train_loss"] == pytest.approx(r["train_loss"], rel=1e-6)
    assert linear_probe(x, y, x, y, weight_decay=wd) == r                 # deterministic


# ----------------------------------------------------------------------------- run_eval end to end


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """8 train + 4 test VP9 videos, 24 frames at 64x96; class 0 moves right, class 1 moves left."""
    root = tmp_path_factory.mktemp("evalset")
    recs = []
    for i in range(12):
        label = i % 2
        split = "train" if i < 8 else "test"
        frames = moving_texture_frames(24, 64, 96, (2.0 if label == 0 else -2.0, 0.0), seed=i)
        path = write_video(root / f"v{i:02d}.webm", frames, "vp9")
        recs.append(VideoRecord(path=str(path), label=label, label_name=f"c{label}", split=split, num_frames=24,
                                fps=25.0, width=96, height=64, codec="vp9", duration=24 / 25))
    recs.append(VideoRecord(path=str(path), label=-1, label_name="", split="train", num_frames=24, fps=25.0,
                            width=96, height=64, codec="vp9", duration=24 / 25))
    write_manifest(recs, root / "manifest.jsonl")
    return root


def _cfg(root, *extra):
    return load_config(None, [f"data.manifest={root / 'manifest.jsonl'}", "data.frame_size=[64, 96]",
                              "data.frames_per_clip=4", "data.frame_stride=4", "augment.out_size=32",
                              "flow.estimator=dis_fast", "data.batch_size=4", "train.device=cpu", *extra])


def test_run_eval_retrieval_and_linear_random_init(tiny_dataset, tmp_path, capsys):
    cfg = _cfg(tiny_dataset)
    out = tmp_path / "ret.json"
    r = run_eval("retrieval", checkpoint=None, cfg=cfg, out=str(out))
    assert r["encoder"] == "random-init(seed=0)"
    vals = [r[f"R@{k}"] for k in (1, 5, 10, 20, 50)]
    assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals)
    assert r["R@10"] == 1.0          # k >= 8 covers the whole gallery, which holds both classes
    assert r["info"]["train"] == 8 and r["info"]["test"] == 4 and r["info"]["unlabelled_left_out"] == 1
    assert r["info"]["skipped_undecodable"] == 0
    saved = json.loads(out.read_text())
    assert saved["R@1"] == r["R@1"] and saved["config"]["data"]["frames_per_clip"] == 4
    assert "eval retrieval [random-init(seed=0)]: R@1" in capsys.readouterr().out

    lin = run_eval("linear", checkpoint=None, cfg=cfg)
    assert lin["train_top1"] == 1.0          # 8 points in 512 dimensions are always separable
    assert 0.0 <= lin["top1"] <= 1.0


def test_run_evals_extracts_features_once_with_the_same_results(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset)
    alone = {k: run_eval(k, checkpoint=None, cfg=cfg) for k in ("retrieval", "linear")}
    from mscl_stream import eval as ev
    calls = []
    real = ev.extract_features
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = run_evals(("retrieval", "linear"), checkpoint=None, cfg=cfg, outs={"linear": str(tmp_path / "l.json")})
    assert len(calls) == 2                      # gallery + queries, once for both kinds
    for k in ("R@1", "R@5", "top1_confusion", "classes"):
        assert both["retrieval"][k] == alone["retrieval"][k]
    assert both["linear"]["top1"] == alone["linear"]["top1"]
    assert json.loads((tmp_path / "l.json").read_text())["top1"] == alone["linear"]["top1"]
    assert sum(map(sum, both["retrieval"]["top1_confusion"])) == both["retrieval"]["info"]["test"]


def test_run_eval_finetune_smoke(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, "eval.epochs=2", "eval.max_steps=3", "eval.lr=0.01", "eval.batch_size=4",
               "eval.base_batch=4", "eval.milestones=[1, 2]", f"eval.out_dir={tmp_path / 'ft'}")
    r = run_eval("finetune", checkpoint=None, cfg=cfg)
    # 8 videos / batch 4 = 2 steps per epoch; max_steps stops in epoch 2 after one more step
    assert r["info"]["steps"] == 3 and r["info"]["epochs"] == 2
    assert 0.0 <= r["top1"] <= 1.0 and np.isfinite(r["train_loss"])


def test_run_eval_errors(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="unknown kind"):
        run_eval("knn", cfg=_cfg(tiny_dataset))
    with pytest.raises(UserError, match="no such file"):
        run_eval("linear", checkpoint=str(tmp_path / "nope.pt"), cfg=_cfg(tiny_dataset))
    cfg = _cfg(tiny_dataset)
    cfg.data.manifest = ""
    with pytest.raises(UserError, match="data.manifest"):
        run_eval("linear", cfg=cfg)
    only_train = tmp_path / "m.jsonl"
    only_train.write_text("".join(line + "\n" for line in (tiny_dataset / "manifest.jsonl").read_text().splitlines()
                                  if '"split": "train"' in line))
    cfg.data.manifest = str(only_train)
    with pytest.raises(UserError, match="found \\['train'\\]"):
        run_eval("retrieval", cfg=cfg)
