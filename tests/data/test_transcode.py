"""`mscl-stream transcode`: size, keyframes and frames of the outputs (checked with PyAV), resume,
failures reported with reasons, exit codes."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest

from mscl_stream.cli import main
from mscl_stream.data.synthetic import moving_texture_frames, write_video
from mscl_stream.data.transcode import output_size, transcode_dataset
from mscl_stream.errors import UserError


def facts(path) -> dict:
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        pkts = sorted((p.pts, p.is_keyframe) for p in c.demux(st) if p.size)
        c.seek(0)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(st)])
        return {"codec": st.codec_context.name, "size": (st.codec_context.height, st.codec_context.width),
                "fps": float(st.average_rate), "keys": [i for i, (_, k) in enumerate(pkts) if k], "frames": frames}


@pytest.fixture
def dataset(tmp_path):
    src = tmp_path / "src"
    a = moving_texture_frames(40, 96, 128, (2.0, 0.0), seed=1)
    write_video(src / "train" / "walk" / "a.webm", a, "vp9", fps=25, gop=40)
    write_video(src / "train" / "run" / "b.mp4", moving_texture_frames(30, 64, 48, (0, 1.0), seed=2), "h264",
                fps=30, gop=30)
    (src / "train" / "run" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (src / "train" / "run" / "notes.txt").write_text("not a video")
    return src, a


def test_output_size_rule():
    assert output_size(240, 320, 128) == (128, 170) and output_size(256, 456, 128) == (128, 228)
    assert output_size(96, 128, 256) == (96, 128)                  # never upscaled


def test_transcode_sizes_gop_frames_and_failures(dataset, tmp_path, capsys):
    src, a = dataset
    dst = tmp_path / "dst"
    rep = transcode_dataset(src, dst, short_side=48, gop=8, workers=2)
    out_a, out_b = dst / "train" / "walk" / "a.mp4", dst / "train" / "run" / "b.mp4"
    fa, fb = facts(out_a), facts(out_b)
    assert fa["codec"] == fb["codec"] == "h264"
    assert fa["size"] == (48, 64) and fb["size"] == (64, 48)      # short side 48 (b has it already), aspect kept
    assert fa["fps"] == pytest.approx(25) and fb["fps"] == pytest.approx(30)
    assert len(fa["frames"]) == 40 and len(fb["frames"]) == 30     # every frame, in order
    assert fa["keys"][0] == 0 and np.diff(fa["keys"] + [40]).max() <= 8
    # frame identity: each output frame is closest to the downscaled source frame of the same index
    import cv2
    decoded = facts(src / "train" / "walk" / "a.webm")["frames"]      # the source as the decoder sees it
    small = np.stack([cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in decoded]).astype(float)
    for t in (0, 17, 39):            # on luma: 4:2:0 twice on this tiny colourful texture blurs colour
        d = np.abs(small.mean(-1) - fa["frames"][t].mean(-1)).mean(axis=(1, 2))
        assert int(np.argmin(d)) == t and d[t] < 0.8 * np.sort(d)[1]
    # the broken file is a counted failure with its reason, the text file a skip; no partial outputs
    assert [f["path"].endswith("broken.mp4") for f in rep["failed"]] == [True] and rep["failed"][0]["reason"]
    assert [s["path"].endswith("notes.txt") for s in rep["skipped"]] == [True]
    assert sorted(p.name for p in dst.rglob("*") if p.is_file()) == ["a.mp4", "b.mp4", "transcode.report.json"]
    saved = json.loads((dst / "transcode.report.json").read_text())
    assert len(saved["transcoded"]) == 2 and len(saved["failed"]) == 1
    assert "broken.mp4" in capsys.readouterr().err

    # resume: outputs that exist are not redone (their bytes and times unchanged); a removed one is
    before = out_a.stat().st_mtime_ns
    out_b.unlink()
    rep2 = transcode_dataset(src, dst, short_side=48, gop=8, workers=1)
    assert rep2["existing"] == [str(out_a)] and [t["path"] for t in rep2["transcoded"]] == [str(src / "train" / "run" / "b.mp4")]
    assert out_a.stat().st_mtime_ns == before and out_b.is_file()


def test_cli_exit_codes(dataset, tmp_path, capsys):
    src, _ = dataset
    # partial failure: exit 0
    assert main(["transcode", str(src), str(tmp_path / "ok"), "--short-side", "32", "--gop", "4", "--workers", "1"]) == 0
    # every file broken: exit 2 with one line
    bad = tmp_path / "bad"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "x.mp4").write_bytes(b"garbage")
    assert main(["transcode", str(bad), str(tmp_path / "bad_out"), "--short-side", "32", "--gop", "4"]) == 2
    assert "all 1 videos failed" in capsys.readouterr().err
    # bad arguments: exit 2 before any work
    assert main(["transcode", str(src), str(src / "inside"), "--short-side", "32", "--gop", "4"]) == 2
    assert main(["transcode", str(src), str(tmp_path / "x"), "--short-side", "32", "--gop", "0"]) == 2
    with pytest.raises(UserError):
        transcode_dataset(tmp_path / "missing", tmp_path / "y", 32, 4)


def _frame_types(path) -> tuple[int, int, int]:
    """(frames, B-frames, frames left when the decoder drops every frame nothing references), read with
    av's own decoder: once plainly, once with skip_frame=NONREF on every packet."""
    counts = []
    for skip in (False, True):
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "NONE"
            if skip:
                st.codec_context.skip_frame = "NONREF"
            counts.append([int(f.pict_type) for f in c.decode(st)])   # AV_PICTURE_TYPE_B = 3
    full, kept = counts
    return len(full), full.count(3), len(kept)


def test_sparse_encoding_makes_every_b_frame_skippable(tmp_path):
    src = tmp_path / "src"
    write_video(src / "a.mp4", moving_texture_frames(96, 64, 96, (2.5, 1.0), seed=3), "h264", gop=96,
                encoding="medium")
    for encoding in ("sparse", "medium"):
        transcode_dataset(src, tmp_path / encoding, short_side=64, gop=96, workers=1, encoding=encoding)
    n, b, kept = _frame_types(tmp_path / "sparse" / "a.mp4")
    assert n == 96 and b >= 96 * 3 // 4 and kept == n - b      # 7 B-frames per P, none of them referenced
    n, b, kept = _frame_types(tmp_path / "medium" / "a.mp4")
    assert n == 96 and b > 0 and kept > n - b                  # B-pyramid: some B-frames are references
    with pytest.raises(UserError, match="--encoding"):
        transcode_dataset(src, tmp_path / "x", short_side=64, gop=96, encoding="fast")
