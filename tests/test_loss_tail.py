"""benchmarks/loss_tail.py: a run's loss terms over its last steps and their chance values, by hand and
against the losses themselves on collapsed features; the study-wide cross-term margin against R@1."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import load_benchmark

lt = load_benchmark("loss_tail")


def test_loss_tail_means_the_last_steps_against_chance_by_hand(tmp_path):
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "config.yaml").write_text("model:\n  queue_size: 16\ndata:\n  frames_per_clip: 8\n")
    rng = np.random.default_rng(0)
    steps = np.arange(50, 1001, 50)
    rgb, lmcl = rng.uniform(2, 4, len(steps)), rng.uniform(1, 3, len(steps))
    lines = [json.dumps({"step": int(s), "loss/rgb_rgb": float(a), "loss/lmcl": float(b), "loss/loss": 99.0,
                         "grad_norm": 1.0}) for s, a, b in zip(steps, rgb, lmcl)]
    lines.insert(3, json.dumps({"event": "resumed", "time": 1.0}))        # a line without a step is skipped
    (run / "pretrain" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    tail = lt.loss_tail(run, last=500)
    keep = steps > 500                                                       # 550 .. 1000: ten logs
    assert tail["steps"] == [550, 1000] and tail["logs"] == 10
    assert set(tail["terms"]) == {"rgb_rgb", "lmcl"}                          # the total is not a term
    assert tail["terms"]["rgb_rgb"]["mean"] == pytest.approx(rgb[keep].mean(), rel=1e-12)
    assert tail["terms"]["lmcl"]["mean"] == pytest.approx(lmcl[keep].mean(), rel=1e-12)
    # uniform logits over 1 positive + 16 queued keys; over 2 x 4 frame candidates (8 frames -> 4 at level 0)
    assert tail["terms"]["rgb_rgb"]["chance"] == pytest.approx(math.log(17))
    assert tail["terms"]["lmcl"]["chance"] == pytest.approx(math.log(8))
    table = lt.loss_tail_markdown({1: tail}, {1: 0.125})
    assert f"| 1 | 0.125 | {lmcl[keep].mean():.2f} | {rgb[keep].mean():.2f} |" in table
    assert table.rstrip().endswith(f"| chance | | {math.log(8):.2f} | {math.log(17):.2f} |")


def test_lmcl_chance_is_the_loss_of_uniform_logits():
    """The chance values loss_tail reports are what the losses give when nothing is learned."""
    import torch

    from mscl_stream.losses import infonce, lmcl
    feats = torch.ones(3, 5, 4, dtype=torch.float64)                           # every frame alike: uniform logits
    assert float(lmcl(feats, feats, feats)) == pytest.approx(math.log(8))
    q = torch.nn.functional.normalize(torch.ones(8, 6, dtype=torch.float64), dim=1)   # a collapsed encoder
    assert float(infonce(q, q, q[:1].expand(32, 6))) == pytest.approx(math.log(33))


def test_cross_margin_pairs_each_runs_margin_with_its_r1(tmp_path):
    from scipy.stats import spearmanr

    study = tmp_path / "study"
    cfg = "model:\n  queue_size: 32\ndata:\n  frames_per_clip: 8\n"
    margins = {("full", 0): 0.6, ("full", 1): 0.0, ("no_lmcl", 0): 0.3, ("farneback", 0): 0.1}
    r1 = {("full", 0): 0.33, ("full", 1): 0.13, ("no_lmcl", 0): 0.31, ("farneback", 0): 0.16}
    for (variant, seed), m in margins.items():
        run = study / "runs" / variant / f"seed{seed}"
        (run / "pretrain").mkdir(parents=True)
        (run / "pretrain" / "config.yaml").write_text(cfg)
        # the four cross terms at chance - m on average (spread around it), one more term, over 20 logs
        offsets = {"rgb_flow": -0.1, "flow_rgb": 0.1, "rgb_rot": 0.05, "rot_rgb": -0.05}
        lines = [json.dumps({"step": 50 * (i + 1), "loss/rgb_rgb": 1.0,
                             **{f"loss/{t}": math.log(33) - m + o for t, o in offsets.items()}}) for i in range(20)]
        (run / "pretrain" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "row.json").write_text(json.dumps({"variant": variant, "seed": seed, "R@1": r1[variant, seed]}))
    rgb_only = study / "runs" / "rgb_only" / "seed0"                           # no cross terms: left out
    (rgb_only / "pretrain").mkdir(parents=True)
    (rgb_only / "pretrain" / "config.yaml").write_text(cfg)
    (rgb_only / "pretrain" / "metrics.jsonl").write_text(json.dumps({"step": 50, "loss/rgb_rgb": 3.0}) + "\n")
    (rgb_only / "row.json").write_text(json.dumps({"variant": "rgb_only", "seed": 0, "R@1": 0.1}))
    out = lt.cross_margin(study)
    got = {(r["variant"], r["seed"]): (r["margin"], r["R@1"]) for r in out["runs"]}
    assert set(got) == set(margins)
    for key, m in margins.items():
        assert got[key][0] == pytest.approx(m, abs=1e-12) and got[key][1] == r1[key]
    keys = sorted(margins)
    want = spearmanr([margins[k] for k in keys], [r1[k] for k in keys]).statistic
    assert out["spearman"]["rho"] == pytest.approx(want)
