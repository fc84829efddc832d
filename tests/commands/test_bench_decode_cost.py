"""bench (f): PyAV decode cost per sample and the cores per GPU it implies."""

from __future__ import annotations

import pytest

from conftest import TINY_TRAIN
from mscl_stream.config import load_config
from mscl_stream.commands.bench import DECODE_COST_SAMPLES, bench_profile, decode_cost


def test_bench_profile_default():
    assert bench_profile(None, "cuda") == "k400" and bench_profile(None, "cpu") == "toy"
    assert bench_profile("ucf101", "cuda") == "ucf101"


def test_decode_cost_and_cores_per_gpu(tiny_manifest):
    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split="])
    stats = {"pyav_samples": 4, "pyav_frames_wanted": 80, "pyav_frames_decoded": 200, "pyav_cpu_seconds": 0.2}
    out = decode_cost(cfg, 50.0, stats)
    one = out["pyav_one_core"]
    assert one["samples"] == DECODE_COST_SAMPLES and one["median_cpu_ms"] > 0
    # every wanted frame decoded at least once; requested = 2 windows x (8 frames + 4 even flow partners)
    assert one["median_decoded"] >= one["median_wanted"] > 0 and one["median_requested"] == 2 * 8 + 2 * 4
    assert out["pyav_cores_per_gpu"] == pytest.approx(50.0 / one["samples_per_cpu_s"])
    assert one["samples_per_cpu_s"] == pytest.approx(1e3 / one["median_cpu_ms"])
    assert out["end_to_end_pyav"] == {"samples": 4, "amplification": 2.5, "cpu_ms_per_sample": pytest.approx(50.0)}


@pytest.mark.slow
def test_bench_repeat_samples_run(tiny_manifest, tmp_path):
    from mscl_stream.commands.bench import run_bench

    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split=", "data.decoder=pyav"])
    res = run_bench(cfg, out=tmp_path, steps=2, repeat_samples=2)
    assert set(res["runs"]) == {"end_to_end", "resident", "end_to_end_repeat2"}
    rep = res["runs"]["end_to_end_repeat2"]["loader"]
    # the repeated run decoded through PyAV's group path and counted its cost (grouping itself is tested
    # in tests/data/test_repeat_sampling.py)
    assert rep["pyav_samples"] >= 4 and rep["pyav_frames_decoded"] >= rep["pyav_frames_wanted"] > 0
    assert res["profile"] == "data.manifest" and res["decode_cost"]["pyav_cores_per_gpu"] > 0
