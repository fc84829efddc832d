"""Test views: index rules and crop boxes against hand-written values; score_views and extract_features
against a slow reference (an independent full PyAV decode, each view scored alone in float64)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import Interpolation

from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.errors import UserError
from mscl_stream.eval import features as FE
from mscl_stream.eval.views import ViewPlan, clip_indices, crop_boxes, score_views, segment_indices

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _rec(path="v.webm", n=100, label=0, start=0, end=-1, h=64, w=96):
    return VideoRecord(path=str(path), label=label, label_name=str(label), split="test", num_frames=n, fps=25.0,
                       width=w, height=h, codec="vp9", duration=n / 25, start=start, end=end)


# ----------------------------------------------------------------------------- index rules


def test_clip_indices_hand_values():
    # span = 3 * 10 + 1 = 31 raw frames; 100 frames leave 69 spare -> centred start 34
    assert clip_indices(_rec(n=100), 4, 10) == [[34, 44, 54, 64]]
    assert clip_indices(_rec(n=100), 4, 10, clips=3) == [[0, 10, 20, 30], [34, 44, 54, 64], [69, 79, 89, 99]]
    # shorter than one clip: starts at the first frame, clamped to the last, never dropped or padded
    assert clip_indices(_rec(n=20), 4, 10) == [[0, 10, 19, 19]]
    assert clip_indices(_rec(n=20), 4, 10, clips=2) == [[0, 10, 19, 19], [0, 10, 19, 19]]
    assert clip_indices(_rec(n=1), 4, 10) == [[0, 0, 0, 0]]
    # the record's start/end bounds are respected
    assert clip_indices(_rec(n=100, start=10, end=51), 4, 10) == [[15, 25, 35, 45]]
    assert clip_indices(_rec(n=100, start=90), 4, 10) == [[90, 99, 99, 99]]


def test_segment_indices_centres_hand_values():
    assert segment_indices(_rec(n=16), 4) == [2, 6, 10, 14]              # centres of [0,4) [4,8) ...
    assert segment_indices(_rec(n=100, start=10, end=26), 4) == [12, 16, 20, 24]
    assert segment_indices(_rec(n=10), 4) == [1, 3, 6, 8]                # floor(1.25), floor(3.75), ...
    # fewer frames than segments: frames repeat, never past the last one
    assert segment_indices(_rec(n=5), 8) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert segment_indices(_rec(n=1), 3) == [0, 0, 0]


def test_segment_indices_random_within_segments():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        got = segment_indices(_rec(n=16), 4, rng)
        assert [g // 4 for g in got] == [0, 1, 2, 3]                     # one frame inside each [4i, 4i+4)
        seen.update(got)
    assert seen == set(range(16))                                        # every frame of a segment drawn
    # 3 frames, 8 segments: integer segments [0,0) [0,0) [0,1) [1,1) [1,1) [1,2) [2,2) [2,3)
    assert segment_indices(_rec(n=3), 8, np.random.default_rng(1)) == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(UserError, match="segment"):
        segment_indices(_rec(n=0), 4)


def test_crop_boxes_hand_values():
    assert crop_boxes(128, 171, 112, 1) == [(8, 29)]
    assert crop_boxes(128, 171, 112, 3) == [(8, 0), (8, 29), (8, 59)]
    assert crop_boxes(171, 128, 112, 3) == [(0, 8), (29, 8), (59, 8)]    # tall: along the height
    assert crop_boxes(128, 128, 128, 3) == [(0, 0), (0, 0), (0, 0)]
    with pytest.raises(UserError, match="larger"):
        crop_boxes(100, 171, 112, 1)
    with pytest.raises(UserError, match="crops=2"):
        crop_boxes(128, 171, 112, 2)


def test_view_plan_geometry():
    cfg = Config()
    cfg.eval.test_short_side, cfg.eval.test_crop = 128, 112
    plan = ViewPlan.of(cfg, clips=10, crops=3)
    assert plan.size(_rec(h=240, w=320)) == (128, 171)                   # 320 * 128 / 240 = 170.67
    assert plan.size(_rec(h=320, w=240)) == (171, 128)
    assert plan.size(_rec(h=0, w=0)) == (128, 128)
    assert (plan.views, plan.describe()) == (30, "10x3")
    seg = ViewPlan.of(cfg, clips=10, crops=1, segments=16)
    assert (seg.views, seg.describe(), seg.indices(_rec(n=32))) == (1, "16seg x1", [list(range(1, 32, 2))])
    cfg.eval.test_short_side = 0
    assert ViewPlan.of(cfg, 1, 1).size(_rec(h=240, w=320)) == tuple(cfg.data.frame_size)
    cfg.eval.test_short_side, cfg.eval.test_crop = 100, 112
    with pytest.raises(UserError, match="larger than the test frames"):
        ViewPlan.of(cfg, 1, 1)


# ----------------------------------------------------------------------------- scoring vs a slow reference


def _all_frames(path: Path) -> np.ndarray:
    """Every frame of the file, decoded plainly by PyAV (no index, no skipping), converted to RGB one frame
    at a time with the swscale settings the project uses (full chroma interpolation, accurate rounding)."""
    flags = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
             | Interpolation.ACCURATE_RND)
    with av.open(str(path)) as c:
        return np.stack([f.reformat(format="rgb24", interpolation=flags).to_ndarray() for f in c.decode(video=0)])


class _Tiny(torch.nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, classes))

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def _reference(model, frames, clips, boxes, s):
    """Each view alone in float64: softmax probabilities averaged by hand."""
    ref = model.double().eval()
    probs = []
    for idx in clips:
        for y, x in boxes:
            v = (frames[idx, y:y + s, x:x + s].astype(np.float64) / 255.0 - MEAN) / STD
            z = ref(torch.from_numpy(v.transpose(3, 0, 1, 2)[None]))
            probs.append(torch.softmax(z, 1)[0].numpy())
    model.float()
    return np.mean(probs, 0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from mscl_stream.data.synthetic import moving_texture_frames, write_video
    root = tmp_path_factory.mktemp("views")
    wide = write_video(root / "wide", moving_texture_frames(40, 64, 96, (2.0, 0.0), seed=1), "vp9")
    tall = write_video(root / "tall", moving_texture_frames(30, 96, 64, (0.0, 1.5), seed=2), "vp9")
    short = write_video(root / "short", moving_texture_frames(5, 64, 96, (1.0, 1.0), seed=3), "vp9")
    bad = root / "damaged.webm"
    bad.write_bytes(Path(wide).read_bytes()[:300])              # a header, then nothing
    return {"wide": Path(wide), "tall": Path(tall), "short": Path(short), "bad": bad}


def _cfg(workers="processes"):
    cfg = Config()
    cfg.data.frames_per_clip, cfg.data.frame_stride = 4, 3
    cfg.data.decode_workers, cfg.data.pyav_workers = 2, workers
    cfg.eval.test_short_side, cfg.eval.test_crop = 64, 48         # the native short side: no resize
    return cfg


@pytest.mark.parametrize("workers", ["processes", "threads"])
def test_score_views_matches_per_view_reference(videos, workers):
    recs = [_rec(videos["wide"], 40, 1), _rec(videos["bad"], 40, 2), _rec(videos["tall"], 30, 3, h=96, w=64),
            _rec(videos["short"], 5, 4)]
    model = _Tiny().train()
    probs, labels, counts = score_views(model, recs, _cfg(workers), "cpu", clips=2, crops=3, batch_size=4)
    assert model.training                                       # its mode is restored
    assert labels.tolist() == [1, 3, 4]                         # the short video is scored, the damaged one not
    assert counts["videos"] == 4 and counts["evaluated"] == 3 and counts["failed"] == 1
    assert counts["failed_files"][0]["path"] == str(videos["bad"]) and counts["views"] == 18
    # hand-written views: span (4-1)*3+1 = 10; wide 40 frames -> starts 0 and 30; tall 30 -> 0 and 20;
    # short (5 frames, shorter than one clip) -> [0, 3, 4, 4] twice; 3 crops of 48 along the long side
    wide_boxes, tall_boxes = [(8, 0), (8, 24), (8, 48)], [(0, 8), (24, 8), (48, 8)]
    want = [
        _reference(model, _all_frames(videos["wide"]), [[0, 3, 6, 9], [30, 33, 36, 39]], wide_boxes, 48),
        _reference(model, _all_frames(videos["tall"]), [[0, 3, 6, 9], [20, 23, 26, 29]], tall_boxes, 48),
        _reference(model, _all_frames(videos["short"]), [[0, 3, 4, 4]] * 2, wide_boxes, 48),
    ]
    assert probs.dtype == torch.float32 and probs.shape == (3, 5)
    np.testing.assert_allclose(probs.numpy(), np.stack(want), atol=2e-6)


def test_score_views_segments_on_a_video_shorter_than_the_segment_count(videos):
    recs = [_rec(videos["short"], 5, 4)]
    model = _Tiny()
    probs, labels, counts = score_views(model, recs, _cfg(), "cpu", clips=7, crops=1, segments=8)
    assert counts["views_per_video"] == 1 and counts["views_desc"] == "8seg x1"
    want = _reference(model, _all_frames(videos["short"]), [[0, 0, 1, 2, 2, 3, 4, 4]], [(8, 24)], 48)
    np.testing.assert_allclose(probs.numpy()[0], want, atol=2e-6)


def test_score_views_nothing_decodes_is_an_error(videos):
    with pytest.raises(UserError, match="none of 1 videos.*damaged"):
        score_views(_Tiny(), [_rec(videos["bad"], 40)], _cfg(), "cpu", clips=1, crops=1)


def test_extract_features_averages_clips_of_the_working_size(videos):
    """Retrieval features: clips x one centre crop of data.frame_size (default geometry), averaged."""
    cfg = _cfg()
    cfg.eval.test_short_side = cfg.eval.test_crop = 0
    cfg.data.frame_size, cfg.augment.out_size = (64, 96), 32      # native size: no resize; crop at (16, 32)

    class MeanPixel(torch.nn.Module):                             # (B,3,T,S,S) -> (B, 3*T) spatial means
        def forward(self, x):
            return x.double().mean((3, 4)).flatten(1)

    recs = [_rec(videos["short"], 5, 4), _rec(videos["wide"], 40, 1)]
    feats, labels = FE.extract_features(MeanPixel(), recs, cfg, "cpu", clips=3)
    assert labels.tolist() == [4, 1]

    def ref(path, clips):
        f = _all_frames(path)[:, 16:48, 32:64].astype(np.float64) / 255.0
        per = [((f[c] - MEAN) / STD).mean((1, 2)).T.reshape(-1) for c in clips]
        return np.mean(per, 0)

    want = [ref(videos["short"], [[0, 3, 4, 4]] * 3),
            ref(videos["wide"], [[0, 3, 6, 9], [15, 18, 21, 24], [30, 33, 36, 39]])]
    np.testing.assert_allclose(feats.numpy(), np.stack(want), atol=1e-5)
    cfg.eval.clips = 1                                            # the default clip count comes from eval.clips
    one, _ = FE.extract_features(MeanPixel(), recs[1:], cfg, "cpu")
    np.testing.assert_allclose(one.numpy()[0], ref(videos["wide"], [[15, 18, 21, 24]]), atol=1e-5)
