"""`mscl-stream bench` on CPU: every run happens, the efficiency is the ratio it claims, files are written."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TRAIN
from mscl_stream.config import load_config
from mscl_stream.train.bench import ResidentLoader, run_bench, steady_rate


def test_steady_rate_uses_the_second_half():
    # 6 steps of 4 clips: the first three slow (warm-up), the last three at 0.5 s/step
    res = {"step_end_seconds": [5.0, 9.0, 10.0, 10.5, 11.0, 11.5], "clips_per_s": 0.0}
    assert steady_rate(res, 4) == pytest.approx(3 * 4 / 1.5)


def test_resident_loader_replays_one_batch():
    loader = ResidentLoader(batch="b", steps=3)
    assert len(loader) == 3 and list(loader) == ["b", "b", "b"] and loader.state_dict() == {}


@pytest.mark.slow
def test_bench_runs_end_to_end_resident_and_baseline(tiny_manifest, tmp_path, capsys):
    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split=", "log.every=2"])
    res = run_bench(cfg, out=tmp_path, steps=4, baselines=True, estimators=("farneback",))
    assert set(res["runs"]) == {"end_to_end", "resident", "pyav_dataloader", "flow=farneback"}
    for run in res["runs"].values():
        assert run["clips_per_s"] > 0 and run["stage_share"]
        assert abs(sum(run["stage_share"].values()) - 1.0) < 1e-6
    a, b = res["runs"]["end_to_end"]["clips_per_s"], res["runs"]["resident"]["clips_per_s"]
    assert res["stream_efficiency"] == pytest.approx(a / b)
    assert res["speedup_vs_pyav"] == pytest.approx(a / res["runs"]["pyav_dataloader"]["clips_per_s"])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".png"]
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["machine"]["cpu_count"] and saved["machine"]["torch"]
    assert "stream efficiency" in capsys.readouterr().out
