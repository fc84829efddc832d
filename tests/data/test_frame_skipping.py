"""Skipping unreferenced frames in the PyAV path: the wanted frames stay pixel-identical to a plain
start-to-end decode with av, the counts add up to a full sweep, and damaged files still fail clearly."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from av.video.reformatter import Interpolation

from mscl_stream.data.pyav_decode import DecodeError, decode_frames
from mscl_stream.data.synthetic import moving_texture_frames

# chroma interpolated bilinearly, accurate rounding: the conversion the code under test promises
ACCURATE = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
            | Interpolation.ACCURATE_RND)

N, H, W = 96, 64, 96
# name -> (encoder, suffix, options, whether the encoding leaves frames that nothing references)
ENCODINGS = {
    "h264_bpyramid": ("libx264", ".mp4", {"preset": "medium", "crf": "23"}, True),
    "h264_no_bpyramid": ("libx264", ".mp4", {"preset": "medium", "crf": "23",
                                             "x264-params": "b-pyramid=none:b-adapt=0:bframes=7"}, True),
    "h264_open_gop": ("libx264", ".mp4", {"preset": "medium", "crf": "23", "x264-params": "open-gop=1"}, True),
    "hevc": ("libx265", ".mp4", {"preset": "medium", "crf": "28", "x265-params": "log-level=error"}, True),
    "mpeg4": ("mpeg4", ".mp4", {"bf": "2", "qscale": "4"}, True),
    "vp9": ("libvpx-vp9", ".webm", {"deadline": "good", "cpu-used": "8", "crf": "32", "b": "0"}, False),
}
WANT = [90, 3, 3, 17, 40, 41, 47, 0, 63, 64, 88]   # across keyframes, any order, a duplicate


def encode(path, encoder: str, options: dict, gop: int = 32) -> str:
    frames = moving_texture_frames(N, H, W, (2.5, 1.0), seed=3)
    with av.open(str(path), "w") as out:
        st = out.add_stream(encoder, rate=Fraction(25, 1), options=dict(options))
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        st.codec_context.gop_size = gop
        st.codec_context.time_base = Fraction(1, 25)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for pkt in st.encode(vf):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return str(path)


def reference(path) -> np.ndarray:
    """Every frame of the file, decoded start to end with av's own loop: (N, H, W, 3) uint8."""
    with av.open(str(path)) as c:
        return np.stack([f.reformat(format="rgb24", interpolation=ACCURATE).to_ndarray()
                         for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("skipping")
    return {name: encode(root / f"{name}{suffix}", enc, opts) for name, (enc, suffix, opts, _) in ENCODINGS.items()}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_wanted_frames_identical_to_a_full_decode(encoded, name):
    path = encoded[name]
    ref = reference(path)
    assert len(ref) == N
    skip, full = {}, {}
    got = decode_frames(path, WANT, None, threads=1, stats=skip)
    plain = decode_frames(path, WANT, None, threads=1, stats=full, skip_unreferenced=False)
    np.testing.assert_array_equal(got, ref[WANT])          # bit-exact, not merely close
    np.testing.assert_array_equal(plain, ref[WANT])
    # every frame the full sweep decoded was either decoded or left out, nothing else
    assert skip["decoded"] + skip["skipped"] == full["decoded"]
    assert full["skipped"] == 0 and skip["seeks"] == full["seeks"]
    if ENCODINGS[name][3]:
        assert skip["skipped"] > 0 and skip["decoded"] < full["decoded"]
    else:            # VP9 as libvpx writes it: every frame is a reference; skipping changes nothing
        assert skip["skipped"] == 0 and skip["decoded"] == full["decoded"]


def test_b_frame_mp4_files_carry_an_edit_list(encoded):
    # x264's B-frame delay makes the MP4 muxer write an edit list: the parity above covers such files
    for name in ("h264_bpyramid", "h264_no_bpyramid", "hevc"):
        with open(encoded[name], "rb") as f:
            assert b"elst" in f.read(), name


@pytest.mark.parametrize("name", ["h264_bpyramid", "h264_no_bpyramid", "hevc"])
def test_frame_threaded_decoder_skips_bit_exactly(encoded, name):
    ref = reference(encoded[name])
    st: dict = {}
    got = decode_frames(encoded[name], WANT, None, threads=2, stats=st)
    np.testing.assert_array_equal(got, ref[WANT])
    assert st["skipped"] > 0


def test_working_size_output_unchanged_by_skipping(encoded):
    path = encoded["h264_no_bpyramid"]
    np.testing.assert_array_equal(decode_frames(path, WANT, (48, 48), threads=1),
                                  decode_frames(path, WANT, (48, 48), threads=1, skip_unreferenced=False))


def test_damaged_files_still_fail_clearly(encoded, tmp_path):
    data = open(encoded["h264_no_bpyramid"], "rb").read()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])       # the index (moov) sits at the end: unreadable
    with pytest.raises(DecodeError, match="truncated.mp4"):
        decode_frames(cut, WANT, None, threads=1)
    # garbage over the middle of the coded data: FFmpeg conceals or refuses, never a wrong-sized answer
    rng = np.random.default_rng(0)
    broken = bytearray(data)
    mid = len(broken) // 2
    broken[mid:mid + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bad = tmp_path / "garbled.mp4"
    bad.write_bytes(bytes(broken))
    try:
        got = decode_frames(bad, WANT, None, threads=1)
    except DecodeError as e:
        assert "garbled.mp4" in str(e)
    else:
        assert got.shape == (len(WANT), H, W, 3)
