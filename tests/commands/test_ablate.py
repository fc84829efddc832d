"""`mscl-stream ablate`: every shipped variant's overrides reach the loss term / estimator / sampler
they name (tiny shapes), the summary's statistics against an independent computation, and a study
that skips finished rows and refuses a variant whose overrides changed."""

import json
import math
import statistics

import pytest
import torch

from mscl_stream.commands import ablate
from mscl_stream.commands.ablate import (RANDOM_INIT, Variant, confusion_by_variant, load_variants, markdown_table,
                                         run_ablation, summarize)
from mscl_stream.config import load_config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.demo import DEMO_CONFIG
from mscl_stream.errors import UserError
from mscl_stream.flow import estimator_from_config
from mscl_stream.models.mscl import MSCL, MSCLInputs

ALL = {"rgb_rgb", "flow_flow", "rot_rot", "rgb_flow", "flow_rgb", "rgb_rot", "rot_rgb", "lmcl"}
# What each shipped variant must train, written out here (not read from the code under test).
EXPECTED_TERMS = {
    "full": ALL, "farneback": ALL, "tvl1": ALL, "zero_flow": ALL, "mds_online": ALL,
    "dis_ultrafast": ALL, "dis_medium": ALL,
    "rgb_only": {"rgb_rgb"},
    "no_lmcl": ALL - {"lmcl"},
    "no_fra": ALL - {"rot_rot", "rgb_rot", "rot_rgb"},
    "no_cross": ALL - {"rgb_flow", "flow_rgb", "rgb_rot", "rot_rgb"},
}
EXPECTED_ESTIMATOR = {"farneback": "farneback", "tvl1": "tvl1", "zero_flow": "zero",
                      "dis_ultrafast": "dis_ultrafast", "dis_medium": "dis_medium"}


def variant_cfg(v: Variant):
    return load_config(DEMO_CONFIG, [*v.overrides, "data.manifest=unused", "model.queue_size=8",
                                     "model.rgb_width=8"], check=False)


def test_shipped_variants_are_the_study_the_method_needs():
    assert set(load_variants()) == set(EXPECTED_TERMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_variant_overrides_reach_the_model(name):
    cfg = variant_cfg(load_variants()[name])
    torch.manual_seed(0)
    model = MSCL(cfg)
    g = torch.Generator().manual_seed(0)
    b, t, s = 2, cfg.data.frames_per_clip, 16
    inp = MSCLInputs(*[torch.randn(b, 3, t, s, s, generator=g) for _ in range(2)],
                     *[torch.rand(b, 3, t // 2, s, s, generator=g) for _ in range(4)])
    with torch.no_grad():
        out = model(inp)
    assert set(out) & ALL == EXPECTED_TERMS[name]
    # the total is the sum of exactly those terms (weights 1)
    assert float(out["loss"]) == pytest.approx(sum(float(out[k]) for k in EXPECTED_TERMS[name]), rel=1e-5)


@pytest.mark.parametrize("name", sorted(EXPECTED_ESTIMATOR))
def test_variant_overrides_reach_the_estimator(name):
    cfg = variant_cfg(load_variants()[name])
    est = estimator_from_config(cfg.flow, "cpu")
    assert est.name.startswith(EXPECTED_ESTIMATOR[name])


def test_zero_flow_control_says_nothing_about_motion():
    cfg = variant_cfg(load_variants()["zero_flow"])
    est = estimator_from_config(cfg.flow, "cpu")
    a = torch.randint(0, 255, (3, 3, 24, 32), dtype=torch.uint8)
    flow = est(a, torch.roll(a, 2, dims=-1))           # a real 2-pixel shift: still zero
    assert flow.shape == (3, 2, 24, 32) and flow.dtype == torch.float32 and not flow.any()


def test_mds_variant_reaches_the_sampler():
    cfg = variant_cfg(load_variants()["mds_online"])
    recs = [VideoRecord(path=f"/d/v{i}.webm", label=0, label_name="c", split="train", num_frames=300, fps=25.0,
                        width=64, height=48, codec="vp9", duration=12.0) for i in range(4)]
    sampler = ClipSampler(recs, cfg.data, seed=0)
    sampler.set_epoch(0)
    cands = sampler.specs(0)
    # two candidate windows A of one video, at different starts
    assert len(cands) == 2 and cands[0].video_idx == cands[1].video_idx
    assert cands[0].frame_idx_a[0] != cands[1].frame_idx_a[0]


def test_summary_statistics_against_statistics_module():
    rows = [{"variant": "a", "seed": s, "R@1": x, "R@5": 1.0, "linear_top1": y}
            for s, (x, y) in enumerate([(0.5, 0.2), (0.7, 0.4), (0.6, 0.9)])]
    rows.append({"variant": "b", "seed": 0, "R@1": 0.25, "R@5": 0.5, "linear_top1": 0.3})
    table = {e["variant"]: e for e in summarize(rows)}
    xs = [0.5, 0.7, 0.6]
    assert table["a"]["R@1"]["mean"] == pytest.approx(statistics.mean(xs))
    assert table["a"]["R@1"]["se"] == pytest.approx(statistics.stdev(xs) / 3 ** 0.5)
    assert table["a"]["n"] == 3 and table["b"]["n"] == 1
    md = markdown_table(list(table.values()))
    assert "| a | 3 | 0.600 +- 0.058 (0.5, 0.7, 0.6) |" in md and "| b | 1 | 0.250 |" in md


def test_study_skips_finished_rows_and_refuses_changed_overrides(tmp_path, monkeypatch):
    calls = []

    def fake_run(variant, seed, config, manifest, run_dir, extra):
        calls.append((variant.name, seed))
        return {"variant": variant.name, "seed": seed, "overrides": list(variant.overrides),
                "R@1": 0.25 + 0.1 * seed, "R@5": 0.5, "linear_top1": 0.3}

    monkeypatch.setattr(ablate, "_run_one", fake_run)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    arms = [Variant("full", "", ()), Variant("no_lmcl", "", ("loss.weights.lmcl=0",))]
    run_ablation(tmp_path / "s", arms, [0, 1], manifest=str(manifest))
    assert calls == [(RANDOM_INIT, 0), (RANDOM_INIT, 1), ("full", 0), ("full", 1), ("no_lmcl", 0), ("no_lmcl", 1)]
    rows = json.loads((tmp_path / "s" / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == calls
    assert all({"variant", "seed", "overrides", "R@1"} <= set(r) for r in rows)
    assert (tmp_path / "s" / "ablation.png").stat().st_size > 0
    assert "no_lmcl" in (tmp_path / "s" / "ablation.md").read_text()

    calls.clear()    # an interrupted study: one row lost, the rest is skipped
    (tmp_path / "s" / "runs" / "full" / "seed1" / "row.json").unlink()
    run_ablation(tmp_path / "s", arms, [0, 1], manifest=str(manifest))
    assert calls == [("full", 1)]

    calls.clear()    # a report between sittings: nothing runs, the table covers the finished rows
    (tmp_path / "s" / "runs" / "no_lmcl" / "seed1" / "row.json").unlink()
    rows = run_ablation(tmp_path / "s", arms, [0, 1], report_only=True)     # no data needed for a report
    assert calls == [] and len(rows) == 5
    assert "| no_lmcl | 1 |" in (tmp_path / "s" / "ablation.md").read_text()

    calls.clear()    # a later sitting runs another variant: the summary keeps every finished row
    other = [Variant("no_cross", "", ("loss.weights.rgb_flow=0",))]
    rows = run_ablation(tmp_path / "s", other, [0], manifest=str(manifest), random_init=False)
    assert calls == [("no_cross", 0)]
    saved = json.loads((tmp_path / "s" / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in saved] == [(r["variant"], r["seed"]) for r in rows] == [
        ("no_cross", 0), ("full", 0), ("full", 1), ("no_lmcl", 0), (RANDOM_INIT, 0), (RANDOM_INIT, 1)]
    assert "| full | 2 |" in (tmp_path / "s" / "ablation.md").read_text()

    changed = [Variant("full", "", ("loss.weights.lmcl=2",))]
    with pytest.raises(UserError, match="overrides"):
        run_ablation(tmp_path / "s", changed, [0], manifest=str(manifest), random_init=False)


def test_rescore_evaluates_finished_runs_again_without_pretraining(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "_run_one", lambda v, seed, *a: {
        "variant": v.name, "seed": seed, "overrides": list(v.overrides), "R@1": 0.5, "R@5": 0.9,
        "linear_top1": 0.4, "final_loss": 3.0, "steps": 100})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    arms = [Variant("full", "", ())]
    run_ablation(tmp_path / "s", arms, [0, 1], manifest=str(manifest), random_init=False)
    assert not (tmp_path / "s" / "ablation_confusion.png").exists()      # no row has a confusion yet

    evaluated = []

    def fake_eval(v, seed, config, mpath, run_dir, extra):
        evaluated.append((v.name, seed))
        return {"R@1": 0.75, "classes": ["up", "down"], "top1_confusion": [[3, 1], [seed, 4 - seed]]}

    monkeypatch.setattr(ablate, "_run_one", lambda *a: pytest.fail("rescore pretrained again"))
    monkeypatch.setattr(ablate, "_evaluate", fake_eval)
    rows = run_ablation(tmp_path / "s", arms, [0, 1], manifest=str(manifest), random_init=False, rescore=True)
    assert evaluated == [("full", 0), ("full", 1)]
    saved = json.loads((tmp_path / "s" / "runs" / "full" / "seed1" / "row.json").read_text())
    # the new evaluation replaces the old, the training fields stay
    assert saved["R@1"] == 0.75 and saved["final_loss"] == 3.0 and saved["steps"] == 100 and "rescored" in saved
    assert [r["R@1"] for r in rows] == [0.75, 0.75]
    assert (tmp_path / "s" / "ablation_confusion.png").stat().st_size > 0
    # summed over seeds: [[3, 1], [0, 4]] + [[3, 1], [1, 3]]
    by = confusion_by_variant(rows)
    assert by["full"]["counts"] == [[6, 2], [1, 7]] and by["full"]["seeds"] == [0, 1]


def test_bad_variant_override_fails_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "_run_one", lambda *a: pytest.fail("ran a study with a bad variant"))
    with pytest.raises(UserError, match="nosuch"):
        run_ablation(tmp_path, [Variant("x", "", ("loss.weights.nosuch=1",))], [0], manifest="m.jsonl")


def test_group_confusions_and_gap_against_hand_counts():
    from mscl_stream.commands.ablate_summary import CONFUSION_GROUPS, gap_in_se, group_confusion_table, group_confusions

    classes = ["down", "horizontal", "still", "up"]                  # sorted, as the manifest numbers them
    counts = [[6, 1, 2, 1],     # down queries: 1 -> horizontal, 2 -> still, 1 -> up
              [2, 5, 0, 3],     # horizontal: 2 -> down, 3 -> up
              [0, 1, 9, 0],     # still: 1 -> horizontal
              [4, 0, 1, 5]]     # up: 4 -> down, 1 -> still
    got = group_confusions(counts, classes, CONFUSION_GROUPS[frozenset(classes)])
    # horizontal <-> up/down: 1 + 2 + 3 + 0 = 6; chance: 10 horizontal queries x 2/4 + 20 up/down x 1/4 = 10
    # up <-> down: 1 + 4 = 5, chance 10 x 1/4 + 10 x 1/4 = 5; moving <-> still: 2 + 0 + 1 (to still) + 1 (from still) = 4,
    # chance 30 x 1/4 + 10 x 3/4 = 15
    assert got == [("horizontal <-> up/down", 6, 10.0), ("up <-> down", 5, 5.0), ("moving <-> still", 4, 15.0)]
    motion = sorted(["still", "pan", "steady", "oscillate", "stop_go", "pair_same", "pair_opposite"])
    eye = [[10 if i == j else 0 for j in range(7)] for i in range(7)]
    eye[motion.index("pair_same")] = [4 if c == "pair_opposite" else 6 if c == "pair_same" else 0 for c in motion]
    eye[motion.index("steady")] = [3 if c == "stop_go" else 7 if c == "steady" else 0 for c in motion]
    rows = dict((n, (g, ch)) for n, g, ch in group_confusions(eye, motion, CONFUSION_GROUPS[frozenset(motion)]))
    assert rows["same <-> opposite"] == (4, 20 / 7) and rows["among one-part speed profiles"] == (3, 60 / 7)
    assert rows["one part <-> two parts"][0] == 0 and rows["moving <-> still"][0] == 0
    by = {"full": {"classes": motion, "counts": eye, "seeds": [0, 1]}}
    assert "| full | 2 | 0 (chance 17) |" in group_confusion_table(by)
    table = [{"variant": "full", "R@1": {"mean": 0.5, "se": 0.03}}, {"variant": "x", "R@1": {"mean": 0.4, "se": 0.04}}]
    assert gap_in_se(table, "x") == pytest.approx(-0.1 / 0.05) and math.isnan(gap_in_se(table, "full"))


@pytest.mark.parametrize("argv, want", [
    ([], ["full", "rgb_only", "no_lmcl"]),                               # every file variant
    (["--variant", "long=train.epochs=2"], ["long"]),                    # an extra one alone: just it
    (["--variants", "full", "--variant", "long=train.epochs=2"], ["full", "long"]),
    (["--variants", "no_lmcl"], ["no_lmcl"]),
])
def test_cli_chooses_the_variants_asked_for(tmp_path, monkeypatch, argv, want):
    from mscl_stream import cli
    vfile = tmp_path / "v.yaml"
    vfile.write_text("full: {about: a, overrides: []}\nrgb_only: {about: b, overrides: []}\n"
                     "no_lmcl: {about: c, overrides: ['loss.weights.lmcl=0']}\n")
    got = []
    monkeypatch.setattr(ablate, "run_ablation", lambda out, chosen, seeds, **kw: got.extend(v.name for v in chosen))
    assert cli.main(["ablate", "--variants-file", str(vfile), "--out", str(tmp_path / "s"), *argv]) == 0
    assert got == want
