"""benchmarks/estimator_swap.py: the join of a study's rows with the flow measurements (mean and
standard error recomputed by hand here), arms without rows reported as not run, and a tiny run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from mscl_stream.errors import UserError

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("cv2")


def _load():
    spec = importlib.util.spec_from_file_location("_bench_estimator_swap", REPO / "benchmarks" / "estimator_swap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(variant: str, seed: int, r1: float, lin: float, overrides: tuple[str, ...] = ()) -> dict:
    return {"variant": variant, "seed": seed, "overrides": list(overrides), "R@1": r1, "linear_top1": lin,
            "extra_overrides": [], "config": str(REPO / "configs" / "demo.yaml"), "test_queries": 70}


ROWS = [_row("full", 0, 0.5, 0.4), _row("full", 1, 0.6, 0.7), _row("full", 2, 0.7, 0.4),
        _row("farneback", 0, 0.3, 0.2, ("flow.estimator=farneback",)),
        _row("zero_flow", 3, 0.2, 0.1, ("flow.estimator=zero",)),
        _row("zero_flow", 1, 0.1, 0.3, ("flow.estimator=zero",)),
        _row("random_init", 0, 0.14, 0.12), _row("no_lmcl", 0, 0.9, 0.9, ("loss.weights.lmcl=0",))]


def test_join_means_and_standard_errors_by_hand():
    mod = _load()
    entries, notes = mod.join(ROWS, mod.VARIANT_ESTIMATOR)
    by = {e["variant"]: e for e in entries}
    assert set(by) == {"full", "dis_ultrafast", "dis_medium", "farneback", "zero_flow"} and notes == []
    full = by["full"]
    assert full["estimator"] == "dis_fast" and full["n"] == 3 and full["seeds"] == [0, 1, 2]
    # R@1 0.5, 0.6, 0.7: mean 0.6, sample sd 0.1, SE 0.1 / sqrt(3)
    assert full["R@1"]["mean"] == pytest.approx(0.6) and full["R@1"]["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert full["R@1"]["values"] == [0.5, 0.6, 0.7]
    # probe 0.4, 0.7, 0.4: mean 0.5, deviations -0.1, 0.2, -0.1, variance 0.06 / 2, SE sqrt(0.03 / 3) = 0.1
    assert full["linear_top1"]["mean"] == pytest.approx(0.5) and full["linear_top1"]["se"] == pytest.approx(0.1)
    # zero flow, seeds 3 and 1: R@1 mean 0.15, sd sqrt(2 * 0.05^2), SE 0.05; seeds sorted
    zero = by["zero_flow"]
    assert zero["estimator"] == "zero" and zero["seeds"] == [1, 3]
    assert zero["R@1"]["mean"] == pytest.approx(0.15) and zero["R@1"]["se"] == pytest.approx(0.05)
    # one seed: a mean, no standard error
    assert by["farneback"]["R@1"]["mean"] == pytest.approx(0.3) and math.isnan(by["farneback"]["R@1"]["se"])
    for name in ("dis_ultrafast", "dis_medium"):
        assert by[name]["status"] == "not run yet" and "R@1" not in by[name] and "n" not in by[name]
    floor = mod.floor(ROWS)
    assert floor["R@1"]["mean"] == pytest.approx(0.14) and floor["n"] == 1


def test_a_row_that_trained_another_estimator_is_left_out_and_said():
    mod = _load()
    renamed = _row("dis_medium", 0, 0.8, 0.8, ("flow.estimator=farneback",))
    extra = {**_row("full", 4, 0.9, 0.9), "extra_overrides": ["flow.estimator=dis_medium"]}
    entries, notes = mod.join([renamed, extra], mod.VARIANT_ESTIMATOR)
    by = {e["variant"]: e for e in entries}
    assert by["dis_medium"]["status"] == "not run yet" and by["full"]["status"] == "not run yet"
    assert sorted(notes) == ["dis_medium seed 0: trained with farneback, not dis_medium; left out",
                             "full seed 4: trained with dis_medium, not dis_fast; left out"]
    # the variant's own override comes after the study's extra ones, as in `ablate`
    both = {**_row("farneback", 0, 0.4, 0.4, ("flow.estimator=farneback",)), "extra_overrides": ["flow.estimator=zero"]}
    assert mod.row_estimator(both) == "farneback" and mod.row_estimator(_row("full", 0, 0, 0)) == "dis_fast"


def test_rows_come_from_the_summary_and_the_run_folders(tmp_path):
    mod = _load()
    (tmp_path / "ablation.json").write_text(json.dumps([_row("full", 0, 0.1, 0.1), _row("farneback", 0, 0.3, 0.3)]))
    for variant, seed, r1 in (("full", 0, 0.5), ("dis_medium", 1, 0.4)):
        d = tmp_path / "runs" / variant / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "row.json").write_text(json.dumps(_row(variant, seed, r1, r1)))
    rows = {(r["variant"], r["seed"]): r["R@1"] for r in mod.read_rows(tmp_path)}
    assert rows == {("full", 0): 0.5, ("farneback", 0): 0.3, ("dis_medium", 1): 0.4}   # row.json wins
    assert mod.read_rows(tmp_path / "runs" / "nothing") == []


def test_markdown_says_not_run_yet_and_never_invents_values():
    mod = _load()
    entries, _ = mod.join(ROWS, mod.VARIANT_ESTIMATOR)
    names = [e["estimator"] for e in entries]
    ms = {"1 thread": {"median": 1.0}, "default threads": {"median": 2.0}}
    result = {"sizes": {"48x64": [48, 64]}, "sources": ["synthetic"], "estimators": entries,
              "epe": {n: {"48x64": {"synthetic": {"mean": 0.5}}} for n in names},
              "ms_per_pair": {n: {"48x64": ms} for n in names}, "random_init": mod.floor(ROWS)}
    lines = {line.split(" | ")[0].lstrip("| "): line for line in mod.markdown(result).splitlines()}
    assert lines["dis_medium (dis_medium)"].count("not run yet") == 2
    assert "| 0 | not run yet" in lines["dis_ultrafast (dis_ultrafast)"]
    assert "0.600 +- 0.058 (0.5, 0.6, 0.7)" in lines["dis_fast (full)"]
    assert "0.300 (0.3)" in lines["farneback (farneback)"]


def test_bad_input_is_one_line_before_any_work(tmp_path):
    mod = _load()
    with pytest.raises(UserError, match="--study .*not a folder"):
        mod.main(["--study", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="--sizes"):
        mod.main(["--sizes", "48by64"])
    with pytest.raises(UserError, match="VARIANT=ESTIMATOR"):
        mod.main(["--variant-estimator", "tvl1"])
    with pytest.raises(UserError, match="unknown flow estimator 'nope'"):
        mod.main(["--variant-estimator", "x=nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_tiny_measurement_end_to_end(tmp_path):
    """48x64 known-flow pairs (synthetic and one small video), one timed round: DIS recovers the known
    motion far better than zero flow, the occluder that does not fit is listed, files land atomically."""
    from mscl_stream.data.synthetic import moving_texture_frames, write_video

    mod = _load()
    video = write_video(tmp_path / "clip.webm", moving_texture_frames(24, 96, 128, seed=1))
    study = tmp_path / "study"
    (study / "runs" / "full" / "seed0").mkdir(parents=True)
    (study / "runs" / "full" / "seed0" / "row.json").write_text(json.dumps(_row("full", 0, 0.5, 0.6)))
    out = tmp_path / "out"
    res = mod.main(["--study", str(study), "--sizes", "48x64", "--pairs", "2", "--rounds", "1", "--batch", "2",
                    "--video", str(video), "--estimators", "dis_fast", "zero", "--out", str(out)])
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]          # no temporary files left
    written = json.loads(next(out.glob("*.json")).read_text())["estimators"][0]
    assert written["R@1"] == {"mean": 0.5, "se": None, "values": [0.5]}       # one seed: no SE (null, not NaN)
    sets = res["sets"]["48x64"]
    assert sets["left_out"] == ["occluding_object"] and "occluding_object" not in sets["motions"]
    for src in ("synthetic", "real"):
        zero = res["epe"]["zero"]["48x64"][src]
        assert zero["mean"] == pytest.approx(sum(sets["zero_flow_epe"][src].values()) / len(sets["motions"]))
        assert res["epe"]["dis_fast"]["48x64"][src]["mean"] < 0.5 * zero["mean"]
    for n in ("dis_fast", "zero"):
        assert all(res["ms_per_pair"][n]["48x64"][t]["median"] > 0 for t in ("1 thread", "default threads"))
    scales = res["dis_scales"]["dis_fast"]["48x64"]      # the fast preset's finest scale, 2; never a coarser one
    assert scales["preset_finest_scale"] == 2 and 0 <= scales["finest_scale_used"] <= 2
    assert "zero" not in res["dis_scales"]
    by = {e["variant"]: e for e in res["estimators"]}
    assert by["full"]["R@1"]["values"] == [0.5] and by["zero_flow"]["status"] == "not run yet"
    assert set(by) == {"full", "zero_flow"} and res["machine"]["cpu_count"] >= 1
