"""Repeated sampling (data.repeat_samples): R samples per video visit, each with its own windows, decoded
in one sweep. Checked on an index-stamped video (frame i is flat grey level 10 + 2 i)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from mscl_stream.config import Config, DataConfig
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.pyav_decode import frame_index, sweep_frames
from mscl_stream.data.synthetic import write_video
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.errors import UserError

N = 120                                   # frames per stamped video: levels 10 .. 248


def stamped_video(path, seed: int):
    """Frame i: flat grey 10 + 2 i with a faint seeded texture (so videos differ); x264 medium, GOP 250."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(-2, 3, (32, 48, 1))
    frames = np.stack([np.clip(10 + 2 * i + tex, 0, 255) for i in range(N)]).repeat(3, -1).astype(np.uint8)
    return write_video(path, frames, "h264", gop=250, encoding="medium")


def record(path, i) -> VideoRecord:
    return VideoRecord(path=str(path), label=i, label_name=f"c{i}", split="train", num_frames=N, fps=25.0,
                       width=48, height=32, codec="h264", duration=N / 25)


def small_data(**kw) -> DataConfig:
    base = dict(frames_per_clip=4, frame_stride=6, flow_gap=3, max_shift=20, batch_size=4, frame_size=(32, 48),
                decode_workers=1, prefetch=1, decoder="pyav", pyav_workers="threads")
    return dataclasses.replace(DataConfig(), **{**base, **kw})


def test_sampler_groups(tmp_path):
    recs = [record(f"/x/v{i}.mp4", i) for i in range(5)]
    plain = ClipSampler(recs, small_data(clips_per_video=2), seed=3)
    rep = ClipSampler(recs, small_data(clips_per_video=2, repeat_samples=3), seed=3)
    assert len(rep) == 3 * len(plain) == 30
    plain.set_epoch(0)
    rep.set_epoch(0)
    specs = list(rep)
    # consecutive groups of 3 share a video; each video is visited clips_per_video times, 3 samples each
    for g in range(0, 30, 3):
        assert {s.video_idx for s in specs[g:g + 3]} == {specs[g].video_idx}
        assert list(rep.group(g + 1)) == [g, g + 1, g + 2]
    assert collections.Counter(s.video_idx for s in specs) == {i: 6 for i in range(5)}
    # each member has its own windows: across many groups, members rarely share window A's start
    big = ClipSampler([record("/x/v.mp4", 0)], small_data(clips_per_video=200, repeat_samples=2), seed=0)
    big.set_epoch(0)
    s = list(big)
    same = np.mean([s[i].frame_idx_a[0] == s[i + 1].frame_idx_a[0] for i in range(0, len(s), 2)])
    assert same < 0.2
    # a state saved with other repeat settings is refused; a state without the key means 1 (older runs)
    st = rep.state_dict()
    with pytest.raises(UserError, match="repeat_samples"):
        plain.load_state_dict({**st, "clips_per_video": 2})
    old = plain.state_dict()
    del old["repeat_samples"]
    plain.load_state_dict(old)


# groups aligned with batches (3) and straddling them (2); frames handed over as RGB or as YUV planes
@pytest.mark.parametrize("batch_size,output,workers", [(3, "rgb", "threads"), (2, "rgb", "threads"),
                                                       (2, "yuv", "threads"), (3, "yuv", "processes")])
def test_each_repeated_sample_gets_its_own_frames_and_decode_is_shared(tmp_path, batch_size, output, workers):
    recs = [record(stamped_video(tmp_path / f"v{i}.mp4", i), i) for i in range(2)]
    cfg = Config()
    cfg.data = small_data(repeat_samples=3, batch_size=batch_size, pyav_output=output, pyav_workers=workers)
    loader = build_loader(cfg, recs, device=torch.device("cpu"))
    loader.set_epoch(0)
    batches = list(loader)
    loader.close()
    assert len(batches) == 6 // batch_size
    parts = [("rgb_a", "frame_idx_a"), ("rgb_b", "frame_idx_b"),
             ("partner_rgb_a", "partner_idx_a"), ("partner_rgb_b", "partner_idx_b")]
    delivered = []
    for batch in batches:
        for b in range(batch.rgb_a.shape[0]):
            for img, idx in parts:
                level = getattr(batch, img)[b].float().mean(dim=(1, 2, 3)).numpy()   # (frames,)
                want = getattr(batch, idx)[b].numpy()
                np.testing.assert_allclose(level, 10 + 2 * want, atol=1.2)          # frame i is level 10 + 2 i
            delivered.append((int(batch.video_idx[b]), np.unique(np.concatenate(
                [getattr(batch, idx)[b].numpy() for _, idx in parts]))))
    # groups of 3 consecutive samples share their video; members' windows differ
    for g in range(0, 6, 3):
        assert len({v for v, _ in delivered[g:g + 3]}) == 1
        assert len({tuple(f) for _, f in delivered[g:g + 3]}) > 1
    # the decoder swept each group once: frames decoded or skipped (B-frames nobody references) = the
    # sweep over the union of the group's frames, fewer than decoding each sample on its own
    st = loader.stats
    grouped = sum(sweep_frames(frame_index(recs[delivered[g][0]].path),
                               np.unique(np.concatenate([f for _, f in delivered[g:g + 3]])))[0] for g in (0, 3))
    alone = sum(sweep_frames(frame_index(recs[v].path), f)[0] for v, f in delivered)
    assert st["pyav_samples"] == 6 and st["pyav_frames_decoded"] + st["pyav_frames_skipped"] == grouped < alone
    assert st["pyav_frames_skipped"] > 0
