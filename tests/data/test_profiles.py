"""Benchmark data profiles: stream properties checked with PyAV, content that moves and is textured."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from mscl_stream.data.profiles import PROFILES, realistic_frames
from mscl_stream.data.synthetic import CLASSES, make_sample_dataset
from mscl_stream.errors import UserError


def stream_facts(path: Path) -> dict:
    """What PyAV sees in a file: codec, size, fps, keyframe positions (display order), B-frames."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        facts = {"codec": st.codec_context.name, "size": (st.codec_context.height, st.codec_context.width),
                 "fps": float(st.average_rate)}
        pkts = [(p.pts, p.is_keyframe) for p in c.demux(st) if p.size]
        c.seek(0)
        # FFmpeg's AVPictureType: 1 = I, 2 = P, 3 = B (PyAV 18 gives the plain int)
        facts["pict_types"] = {"-IPB"[int(f.pict_type)] if int(f.pict_type) < 4 else "?" for f in c.decode(st)}
    order = np.argsort([p for p, _ in pkts])
    keys = [int(i) for i, k in enumerate(np.array([k for _, k in pkts])[order]) if k]
    facts.update(frames=len(pkts), keys=keys,
                 reordered=any(a > b for (a, _), (b, _) in zip(pkts, pkts[1:])))   # decode != display order
    return facts


def test_profile_table_matches_the_datasets():
    u, k = PROFILES["ucf101"], PROFILES["k400"]
    assert u.sizes == ((240, 320),) and u.fps == 25 and 6 * 25 <= u.frames[0] <= u.frames[1] <= 8 * 25
    assert all(min(s) == 256 for s in k.sizes) and k.fps == 30 and k.frames == (300, 300)
    assert u.gop == k.gop == 250 and u.encoding == k.encoding == "medium"
    assert PROFILES["toy"].gop == 16 and PROFILES["toy"].encoding == "toy"


def test_k400_like_h264_stream_properties(tmp_path):
    # the k400 profile at a tiny size and length (its encoding, frame rate and GOP rule unchanged)
    tiny = replace(PROFILES["k400"], sizes=((48, 80),), frames=(60, 60))
    out = make_sample_dataset(tmp_path / "ds", videos=4, profile=tiny, gop=24, seed=1, task="direction")
    files = sorted(out.rglob("*.mp4"))
    assert len(files) == 4 and {f.parent.name for f in files} == set(CLASSES)
    for f in files:
        facts = stream_facts(f)
        assert facts["codec"] == "h264" and facts["size"] == (48, 80) and facts["fps"] == pytest.approx(30)
        assert facts["frames"] == 60
        assert "B" in facts["pict_types"] and facts["reordered"]          # B-frames, reordered packets
        assert facts["keys"][0] == 0 and np.diff(facts["keys"] + [60]).max() <= 24
        assert len(facts["keys"]) <= 60 // 24 + 2                      # not every few frames
        head = f.read_bytes()[:200_000]
        assert b"cabac=1" in head and b"bframes=3" in head             # x264's own record of its settings


def test_ucf101_like_vp9_version_and_default_gop(tmp_path):
    tiny = replace(PROFILES["ucf101"], sizes=((48, 64),), frames=(40, 40))
    out = make_sample_dataset(tmp_path / "ds", videos=4, profile=tiny, codec="vp9", seed=2, task="direction")
    for f in sorted(out.rglob("*.webm")):
        facts = stream_facts(f)
        assert facts["codec"] == "vp9" and facts["size"] == (48, 64) and facts["fps"] == pytest.approx(25)
        assert facts["frames"] >= 40 and facts["keys"] == [0]         # GOP 250 > 40 frames: one keyframe


def test_realistic_content_is_textured_moving_and_panning():
    frames, info = realistic_frames(12, 64, 96, (0.0, -1.0), seed=3, grain=0.0)
    f = frames.astype(np.float64).mean(-1)
    # textured: strong local contrast everywhere, not flat colour
    grad = np.abs(np.diff(f, axis=2)).mean()
    assert grad > 2.0 and f[0].std() > 15
    # the background pans by its velocity: the strongest phase-correlation peak over 8 frames
    a, b = f[0] - f[0].mean(), f[8] - f[8].mean()
    r = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a)) / (np.abs(np.fft.fft2(b) * np.conj(np.fft.fft2(a))) + 1e-9)).real
    y, x = np.unravel_index(np.argmax(r), r.shape)
    shift = ((x + 48) % 96 - 48, (y + 32) % 64 - 32)
    assert np.allclose(shift, np.round(8 * np.asarray(info["pan"])), atol=1)
    # objects move along the class direction (up: vx = 0, vy < 0) at 1-3 px/frame
    assert all(vx == 0 and -3 <= vy <= -1 for vx, vy in info["objects"])
    # grain is fresh in every frame: two identical seeds without grain agree, with grain they differ
    g1, _ = realistic_frames(2, 32, 48, (1.0, 0.0), seed=4, grain=2.0)
    assert np.array_equal(realistic_frames(2, 32, 48, (1.0, 0.0), seed=4, grain=0.0)[0][0].shape, g1[0].shape)
    noise = g1.astype(float) - realistic_frames(2, 32, 48, (1.0, 0.0), seed=4, grain=0.0)[0]
    assert 1.5 < noise.std() < 2.5


def test_bad_profile_and_gop(tmp_path):
    with pytest.raises(UserError):
        make_sample_dataset(tmp_path / "x", videos=4, profile="hmdb")
    with pytest.raises(UserError):
        make_sample_dataset(tmp_path / "x", videos=4, profile="toy", gop=0, task="direction")


def test_parallel_generation_gives_the_same_videos(tmp_path, capsys):
    tiny = replace(PROFILES["ucf101"], sizes=((32, 48),), frames=(12, 12))
    a = make_sample_dataset(tmp_path / "a", videos=4, profile=tiny, seed=5, task="direction")
    out_a = capsys.readouterr().out
    b = make_sample_dataset(tmp_path / "b", videos=4, profile=tiny, seed=5, workers=2, task="direction")
    out_b = capsys.readouterr().out
    lines = lambda out: [ln for ln in out.splitlines() if ln.startswith("[")]  # noqa: E731
    assert lines(out_a) == lines(out_b) and len(lines(out_a)) == 4    # same sizes, lengths, velocities
    fa, fb = sorted(a.rglob("*.mp4")), sorted(b.rglob("*.mp4"))
    assert [f.relative_to(a) for f in fa] == [f.relative_to(b) for f in fb] and len(fa) == 4
    def frames(path):
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(float)

    da, db = [frames(x) for x in fa], [frames(y) for y in fb]
    # the same pictures, not bit-equal files: numpy's SIMD math can round an ulp differently with memory
    # alignment, a pixel of the grain then rounds the other way and x264 decides differently (seen:
    # 4-6 levels mean difference on these tiny noisy frames). Each video is far closer to its twin than
    # to any other video.
    for i, x in enumerate(da):
        same = np.abs(x - db[i]).mean()
        other = min(np.abs(x - y).mean() for j, y in enumerate(db) if j != i)
        assert x.shape == db[i].shape and same < 0.3 * other, (fa[i].name, same, other)
