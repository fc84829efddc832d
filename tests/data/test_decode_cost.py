"""Decode cost accounting: frames the decoder produces against frames wanted, per decode path."""

from __future__ import annotations

import numpy as np
import pytest

from mscl_stream.data.decode_cost import dali_cpu_costs, pyav_costs, summarize
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.dali import dali_available
from mscl_stream.data.pyav_decode import decode_frames, decode_frames_counted, frame_index, sweep_frames
from mscl_stream.data.synthetic import moving_texture_frames, write_video
from mscl_stream.data.sampler import SampleSpec


def test_counts_on_short_gop(h264_video):
    # 64 frames, keyframes every 16 (0, 16, 32, 48), no B-frames. Frames 20, 21: seek to 16, decode
    # 16..21 (6 frames); frame 40: its keyframe 32 lies ahead of 21, so seek again and decode 32..40 (9).
    st: dict = {}
    got = decode_frames(h264_video, [21, 20, 40, 20], None, threads=1, stats=st)
    assert st == {"requested": 4, "wanted": 3, "decoded": 15, "skipped": 0, "seeks": 2}   # no B-frames
    assert sweep_frames(frame_index(h264_video), np.array([20, 21, 40])) == (15, 2)
    frames, st2 = decode_frames_counted(h264_video, [21, 20, 40, 20], None)
    assert np.array_equal(frames, got) and st2["decoded"] == 15 and st2["cpu_seconds"] > 0


def test_long_gop_with_b_frames_amplifies(tmp_path):
    # x264 medium (B-frames), one keyframe in 120 frames: frame 100 costs a plain decoder 101 frames;
    # frames 10, 50, 90 in one forward sweep cost 91 and one seek. Skipping leaves out part of them.
    path = write_video(tmp_path / "v.mp4", moving_texture_frames(120, 48, 64, (1.5, 0.5), seed=1), "h264",
                       gop=250, encoding="medium")
    index = frame_index(path)
    assert list(index.key_pts) == [index.pts[0]]
    for want, expect in (([100], (101, 1)), ([10, 50, 90], (91, 1))):
        st: dict = {}
        decode_frames(path, want, (32, 32), threads=1, stats=st, skip_unreferenced=False)
        assert (st["decoded"], st["seeks"]) == expect and st["skipped"] == 0
        assert sweep_frames(index, np.array(want)) == expect
        sk: dict = {}
        decode_frames(path, want, (32, 32), threads=1, stats=sk)
        assert sk["decoded"] + sk["skipped"] == expect[0] and 0 < sk["skipped"] < expect[0] - len(want)


def _spec(frames: list[int]) -> SampleSpec:
    a = np.array(frames, np.int64)
    return SampleSpec(0, a[:2], a[2:3], a[3:5], a[5:6])


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_both_paths_report_cost_rows(tmp_path):
    path = write_video(tmp_path / "v.webm", moving_texture_frames(48, 48, 64, (1.0, 0.0), seed=2), "vp9", gop=8)
    rec = VideoRecord(path=str(path), label=0, label_name="a", split="train", num_frames=48, fps=25.0, width=64,
                      height=48, codec="vp9", duration=48 / 25)
    # wanted 3, 5, 7 | 19, 21, 23: two seeks (to 0 and to 16); decoded 0..7 + 16..23 = 16 of 6 wanted
    specs = [_spec([3, 5, 7, 19, 21, 23])] * 3
    for rows in (pyav_costs([rec], specs, (32, 32)), dali_cpu_costs([rec], specs, (32, 32))):
        assert [(r["requested"], r["wanted"], r["decoded"], r["seeks"]) for r in rows] == [(6, 6, 16, 2)] * 3
        s = summarize(rows)
        assert s["median_amplification"] == pytest.approx(16 / 6) and s["samples_per_cpu_s"] > 0


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_loader_reports_pyav_decode_cost(h264_video, workers):
    import dataclasses

    import torch

    from mscl_stream.config import Config
    from mscl_stream.data.loader import build_loader

    rec = VideoRecord(path=str(h264_video), label=0, label_name="a", split="train", num_frames=64, fps=25.0,
                      width=176, height=128, codec="h264", duration=64 / 25)
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, frames_per_clip=4, frame_stride=6, flow_gap=3, max_shift=8,
                                   batch_size=2, frame_size=(32, 48), decode_workers=1, prefetch=1,
                                   pyav_workers=workers, decoder="pyav")
    loader = build_loader(cfg, [rec] * 2, device=torch.device("cpu"))
    loader.set_epoch(0)
    (batch,) = list(loader)
    loader.close()
    st = loader.stats
    # the counts equal the keyframe sweep over each delivered sample's unique frames, from the packet index
    index = frame_index(h264_video)
    expect = [0, 0, 0]
    for b in range(2):
        want = np.unique(np.concatenate([getattr(batch, k)[b].numpy() for k in
                                         ("frame_idx_a", "frame_idx_b", "partner_idx_a", "partner_idx_b")]))
        d, s = sweep_frames(index, want)
        expect = [expect[0] + len(want), expect[1] + d, expect[2] + s]
    assert [st["pyav_frames_wanted"], st["pyav_frames_decoded"], st["pyav_seeks"]] == expect
    assert st["pyav_frames_requested"] == 2 * (2 * 4 + 2 * 2) and st["pyav_cpu_seconds"] > 0
