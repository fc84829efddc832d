"""`mscl-stream bench` on CPU: every run happens, the efficiency is the ratio it claims, files are written."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TRAIN
from mscl_stream.config import load_config
from mscl_stream.commands.bench import ResidentLoader, run_bench, steady_rate


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
    assert set(res["runs"]) == {"end_to_end", "resident", "pyav_dataloader", "precomputed_flow", "flow=farneback"}
    for run in res["runs"].values():
        assert run["clips_per_s"] > 0 and run["stage_share"]
        assert abs(sum(run["stage_share"].values()) - 1.0) < 1e-6
    a, b = res["runs"]["end_to_end"]["clips_per_s"], res["runs"]["resident"]["clips_per_s"]
    assert res["stream_efficiency"] == pytest.approx(a / b)
    assert res["speedup_vs_pyav"] == pytest.approx(a / res["runs"]["pyav_dataloader"]["clips_per_s"])
    # the precomputed baseline wrote every frame pair of the six 40-frame 32x40 videos as float16
    cost = res["runs"]["precomputed_flow"]["precompute"]
    assert cost["videos"] == 6 and cost["pairs"] == 6 * 40 and cost["bytes"] >= 6 * 40 * 2 * 32 * 40 * 2
    assert res["runs"]["precomputed_flow"]["stage_share"]["flow"] < res["runs"]["end_to_end"]["stage_share"]["flow"]
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".png"]
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["machine"]["cpu_count"] and saved["machine"]["torch"]
    # the derived ratios reach the file too (it is written after every run, the ratios with them)
    assert saved["speedup_vs_pyav"] == pytest.approx(res["speedup_vs_pyav"])
    assert saved["stream_efficiency"] == pytest.approx(res["stream_efficiency"])
    assert "stream efficiency" in capsys.readouterr().out


def test_precomputed_flow_equals_in_batch_flow(tiny_manifest, tmp_path):
    """The baseline's flow read back from disk is the flow of exactly the sampled pairs."""
    import torch

    from mscl_stream.flow import estimator_from_config
    from mscl_stream.commands.baseline import precomputed_flow_loader
    from mscl_stream.train.inputs import compute_flow

    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split=",
                             "data.max_shift=40"])   # shifts past the end: wrapped pairs too
    est = estimator_from_config(cfg.flow, "cpu")
    loader, cost = precomputed_flow_loader(cfg, est, tmp_path / "flows")
    assert len(list((tmp_path / "flows").glob("*.npy"))) == cost["videos"] == 6
    # workers are not forked: forked ones deadlocked in libswscale after the in-process precompute (H100)
    assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
    loader.set_epoch(0)
    for batch in loader:
        assert batch.flow_a is not None and batch.flow_a.dtype == torch.float16
        fresh = batch.to("cpu")
        fresh.flow_a = fresh.flow_b = None                     # force the in-batch computation
        _, flow_a, flow_b = compute_flow(fresh, est)
        torch.testing.assert_close(batch.flow_a.float(), flow_a, atol=0.02, rtol=0.002)
        torch.testing.assert_close(batch.flow_b.float(), flow_b, atol=0.02, rtol=0.002)


def test_precompute_chunks_wrap_without_changing_the_flow(tiny_manifest, tmp_path):
    """Fixed-shape chunks (the last one padded by wrapping to the video's first pairs) give the same
    per-pair flow as one chunk per video: the padding is computed and dropped, never written."""
    import numpy as np

    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.flow import estimator_from_config
    from mscl_stream.commands.baseline import precompute_flows

    cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split="])
    records = read_manifest(cfg.data.manifest, "")[:2]
    est = estimator_from_config(cfg.flow, "cpu")
    whole = precompute_flows(cfg, records, est, tmp_path / "whole")
    parts = precompute_flows(cfg, records, est, tmp_path / "parts", chunk=16)   # 40 frames: 16 + 16 + 8
    assert whole["pairs"] == parts["pairs"] == sum(r.frame_end - r.start for r in records)
    for row in range(len(records)):
        a, b = (np.load(tmp_path / d / f"{row:06d}.npy") for d in ("whole", "parts"))
        assert a.shape == b.shape == (records[row].frame_end - records[row].start, 2, 32, 40)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_bench_refuses_an_unknown_run_to_skip(tmp_path):
    from mscl_stream.errors import UserError
    cfg = load_config(None, TINY_TRAIN)
    with pytest.raises(UserError, match="cannot skip \\['resident'\\]"):
        run_bench(cfg, out=tmp_path, steps=4, skip=("resident",))   # resident defines the efficiency
    assert not list(tmp_path.iterdir())
