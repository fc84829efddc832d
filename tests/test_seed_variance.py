"""benchmarks/seed_variance.py: the query bootstrap against its closed form and hand counts, the summary
statistics against hand computations on made-up rows, which checkpoints an option averages, and the
cache (a second call evaluates nothing; a changed checkpoint file only itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]


sv = load_benchmark("seed_variance")


def test_hits_are_the_diagonal_of_the_confusion_matrix():
    conf = [[2, 1, 0], [0, 3, 1], [1, 0, 2]]          # 7 of 10 queries have a same-class nearest video
    hits = sv.hits_from_confusion(conf)
    assert len(hits) == 10 and hits.sum() == 7


def test_bootstrap_se_matches_the_binomial_closed_form():
    # 70 queries, 42 hits: the ideal bootstrap's SD of the hit rate is sqrt(0.6 * 0.4 / 70) = 0.05855
    hits = np.array([1.0] * 42 + [0.0] * 28)
    want = math.sqrt(0.6 * 0.4 / 70)
    assert sv.binomial_se(0.6, 70) == pytest.approx(want, rel=1e-12)
    got = sv.bootstrap_se(hits, n_boot=1000)
    # 1000 resamples estimate an SD to about 1 / sqrt(2 * 1000) = 2.2 % (relative)
    assert got == pytest.approx(want, rel=0.08)
    assert sv.bootstrap_se(hits, n_boot=1000) == got               # seeded: reruns give the same number
    assert sv.bootstrap_se(np.ones(40), n_boot=200) == 0.0          # every query a hit: nothing to resample
    # two queries, one hit: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> SD sqrt(1/8)
    assert sv.bootstrap_se([1, 0], n_boot=20000) == pytest.approx(math.sqrt(1 / 8), rel=0.03)


def test_spread_by_hand():
    st = sv.spread([0.5, 0.6, 0.7])
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.6)
    assert st["sd"] == pytest.approx(0.1)                             # sqrt((0.01 + 0 + 0.01) / 2)
    assert st["se"] == pytest.approx(0.1 / math.sqrt(3))
    # 2 degrees of freedom: chi-square is exponential with mean 2, quantile p at -2 ln(1 - p)
    lo, hi = 0.1 * math.sqrt(2 / (-2 * math.log(0.05))), 0.1 * math.sqrt(2 / (-2 * math.log(0.95)))
    assert st["sd_ci90"] == pytest.approx([lo, hi], rel=1e-9)
    assert sv.spread([0.4]) == {"n": 1, "mean": 0.4, "sd": None, "se": None, "sd_ci90": None}


def test_summarize_by_hand():
    per_seed = {
        0: {"a": {"R@1": 0.65, "linear_top1": 0.70, "query_se": 0.05, "linear_query_se": 0.04},
            "b": {"R@1": 0.60, "linear_top1": 0.60, "query_se": 0.06, "linear_query_se": 0.06}},
        1: {"a": {"R@1": 0.45, "linear_top1": 0.50, "query_se": 0.07, "linear_query_se": 0.06}},
    }
    out = sv.summarize(per_seed)
    a, b = out["a"], out["b"]
    assert a["seeds"] == [0, 1] and b["seeds"] == [0]
    r = a["R@1"]
    assert r["per_seed"] == [0.65, 0.45] and r["mean"] == pytest.approx(0.55)
    sd = math.sqrt(2 * 0.1 ** 2)                                      # two values 0.2 apart: SD = 0.2 / sqrt(2)
    assert r["sd"] == pytest.approx(sd) and r["se"] == pytest.approx(0.1)
    assert r["query_se"] == pytest.approx(0.06) and r["sd_over_query_se"] == pytest.approx(sd / 0.06)
    assert a["linear_top1"]["query_se"] == pytest.approx(0.05)
    assert b["R@1"]["sd"] is None and b["R@1"]["sd_over_query_se"] is None


def _study(tmp_path: Path, steps_files=(500, 1000, 1500)) -> Path:
    run = tmp_path / "study" / "runs" / "full" / "seed0"
    ck = run / "pretrain" / "checkpoints"
    ck.mkdir(parents=True)
    for s in steps_files:
        (ck / f"step_{s:08d}.pt").write_bytes(b"x" * s)
    (ck / "last.pt").write_bytes(b"last")
    (run / "row.json").write_text(json.dumps({"variant": "full", "seed": 0, "steps": 1995, "R@1": 0.5}))
    (tmp_path / "study" / "runs" / "full" / "seed1").mkdir()            # started, not finished
    return run


class FakeEval:
    """R@1 = hits / 10 from a 2-class confusion: last.pt 6 hits, step 1500 5, step 1000 4 (+1 with 4 clips)."""

    HITS = {"last.pt": 6, "step_00001500.pt": 5, "step_00001000.pt": 4, "step_00001995.pt": 6,
            "step_00000500.pt": 3}

    def __init__(self):
        self.calls = []

    def __call__(self, row, run_dir, ckpt, prefix, clips):
        self.calls.append((ckpt.name, prefix, clips))
        h = self.HITS[ckpt.name] + (clips == 4)
        conf = [[h // 2, 5 - h // 2], [5 - (h - h // 2), h - h // 2]]
        return {"R@1": h / 10, "R@5": 1.0, "linear_top1": h / 10, "classes": ["a", "b"],
                "top1_confusion": conf, "test_queries": 10}


def test_options_average_the_newest_checkpoints(tmp_path):
    run = _study(tmp_path, steps_files=(500, 1000, 1500, 1995))     # 1995 = the last step: last.pt's twin
    fake = FakeEval()
    opts = sv.run_options(run, json.loads((run / "row.json").read_text()), n_boot=100, evaluate_fn=fake)
    assert sorted({c[0] for c in fake.calls}) == ["last.pt", "step_00001000.pt", "step_00001500.pt"]
    assert len(opts) == 2 * 2 * 3
    assert opts["query_c1_last"]["R@1"] == pytest.approx(0.6)
    assert opts["key_c1_last2"]["R@1"] == pytest.approx((0.6 + 0.5) / 2)
    assert opts["query_c4_last3"]["R@1"] == pytest.approx((0.7 + 0.6 + 0.5) / 3)
    assert opts["query_c1_last3"]["checkpoints"] == ["last.pt", "step_00001500.pt", "step_00001000.pt"]
    # a mean over checkpoints carries the mean of its members' query SEs (binomial for the probe)
    want = np.mean([sv.binomial_se(p, 10) for p in (0.6, 0.5)])
    assert opts["query_c1_last2"]["linear_query_se"] == pytest.approx(want)
    assert {c[1] for c in fake.calls} == {"rgb_encoder.", "rgb_encoder_k."}


def test_a_second_call_evaluates_nothing_and_a_changed_checkpoint_only_itself(tmp_path):
    run = _study(tmp_path)
    row = json.loads((run / "row.json").read_text())
    fake = FakeEval()
    first = sv.run_options(run, row, n_boot=100, evaluate_fn=fake)
    assert len(fake.calls) == 2 * 2 * 3                                 # encoders x clips x checkpoints
    assert len(list(run.glob("variance_*.json"))) == 12
    fake.calls.clear()
    assert sv.run_options(run, row, n_boot=100, evaluate_fn=fake) == first
    assert fake.calls == []
    (run / "pretrain" / "checkpoints" / "last.pt").write_bytes(b"a run that was trained again")
    sv.run_options(run, row, n_boot=100, evaluate_fn=fake)
    assert sorted(fake.calls) == sorted((("last.pt", p, c) for p in ("rgb_encoder.", "rgb_encoder_k.")
                                         for c in (1, 4)))
    assert not list(run.glob(".*tmp*"))                                  # atomic writes leave no temp file


def test_curve_is_every_checkpoint_oldest_first_with_the_last_steps_twin_left_out(tmp_path):
    run = _study(tmp_path, steps_files=(500, 1000, 1500, 1995))
    row = json.loads((run / "row.json").read_text())
    fake = FakeEval()
    got = sv.curve(run, row, evaluate_fn=fake)
    assert [(c["step"], c["checkpoint"]) for c in got] == [
        (500, "step_00000500.pt"), (1000, "step_00001000.pt"), (1500, "step_00001500.pt"), (1995, "last.pt")]
    assert [c["R@1"] for c in got] == pytest.approx([0.3, 0.4, 0.5, 0.6])
    assert set(fake.calls) == {(c["checkpoint"], "rgb_encoder.", 1) for c in got}     # query encoder, one clip
    # the options share the curve's cache: their query_c1 evaluations are not repeated
    fake.calls.clear()
    sv.run_options(run, row, n_boot=100, evaluate_fn=fake)
    assert ("last.pt", "rgb_encoder.", 1) not in fake.calls and len(fake.calls) == 2 * 2 * 3 - 3
    table = sv.curve_markdown({0: got})
    assert "| 0 | 0.300 / 0.300 | 0.400 / 0.400 | 0.500 / 0.500 | 0.600 / 0.600 |" in table


def test_find_runs_names_the_missing_seeds(tmp_path):
    _study(tmp_path)
    runs, missing = sv.find_runs(tmp_path / "study", "full", None)
    assert list(runs) == [0] and missing == [1]
    runs, missing = sv.find_runs(tmp_path / "study", "full", [0, 1, 2, 3])
    assert missing == [1, 2, 3]
    with pytest.raises(SystemExit, match="no finished run"):
        sv.find_runs(tmp_path / "study", "no_lmcl", None)


def test_study_config_is_the_rows_config(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    row = {"variant": "farneback", "seed": 3, "overrides": ["flow.estimator=farneback"], "extra_overrides": [],
           "config": str(REPO / "configs" / "demo.yaml"), "manifest": str(manifest)}
    cfg = sv.study_config(row, tmp_path / "run", ["data.decode_workers=1"])
    assert (cfg.train.seed, cfg.flow.estimator, cfg.data.decode_workers) == (3, "farneback", 1)
    assert cfg.data.manifest == str(manifest) and cfg.train.out_dir == str(tmp_path / "run" / "pretrain")



def test_rows_only_reads_the_rows_option_off_the_row(tmp_path):
    run = _study(tmp_path, steps_files=(500, 1000, 1500, 1995))
    row = json.loads((run / "row.json").read_text())
    fake = FakeEval()
    evaluated = sv.run_options(run, row, n_boot=200, evaluate_fn=fake)[sv.TODAY]   # last.pt: 6 hits of 10
    row.update({"R@1": 0.6, "linear_top1": 0.6, "test_queries": 10,
                "top1_confusion": fake(row, run, Path("last.pt"), "rgb_encoder.", 1)["top1_confusion"]})
    got = sv.row_option(row, n_boot=200)
    assert list(got) == [sv.TODAY]
    for key in ("R@1", "linear_top1", "query_se", "linear_query_se"):
        assert got[sv.TODAY][key] == pytest.approx(evaluated[key])
