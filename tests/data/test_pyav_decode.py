"""PyAV decode path against an independent full decode with av (frame identity, resize + crop, errors)."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
from av.video.reformatter import Interpolation

from mscl_stream.data.frame_sink import cover_crop
from mscl_stream.data.pyav_decode import DecodeError, decode_frames

# FFmpeg's default yuv420p -> rgb24 path repeats chroma samples; DALI (and the code under test)
# interpolate chroma bilinearly. The reference uses the accurate conversion so that "same frame" means
# < 1/255 rather than ~3/255 on this colourful synthetic texture.
ACCURATE = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
            | Interpolation.ACCURATE_RND)


def reference(path) -> np.ndarray:
    """Every frame of the file, decoded start to end with av: (N, H, W, 3) uint8."""
    with av.open(str(path)) as c:
        return np.stack([f.reformat(format="rgb24", interpolation=ACCURATE).to_ndarray()
                         for f in c.decode(video=0)])


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def assert_same_frames(got: np.ndarray, ref: np.ndarray, idx) -> None:
    """Each decoded frame is within 3/255 of the reference frame it should be, and closest to it."""
    for k, i in enumerate(idx):
        diffs = [mad(got[k], r) for r in ref]
        assert diffs[i] < 3.0, (k, i, diffs[i])
        assert int(np.argmin(diffs)) == i, (k, i, int(np.argmin(diffs)))


def test_h264_frames_any_order_with_duplicates(h264_video):
    ref = reference(h264_video)
    idx = [40, 3, 3, 17, 63, 0, 40, 16, 15]
    got = decode_frames(h264_video, idx, None)
    assert got.shape == (len(idx),) + ref.shape[1:] and got.dtype == np.uint8
    assert_same_frames(got, ref, idx)


@pytest.mark.parametrize("codec,gop", [("h264", 40), ("vp9", 8), ("mjpeg", 1), ("hevc", 24)])
def test_sparse_frames_across_keyframes(make_video, codec, gop):
    path = make_video(n=90, h=48, w=64, codec=codec, gop=gop, velocity=(3.0, 1.0), seed=2)
    ref = reference(path)
    assert len(ref) == 90
    idx = [85, 2, 44, 45, 60, 89, 0, 31]
    assert_same_frames(decode_frames(path, idx, None, threads=1), ref, idx)


def cover_crop_reference(frames: np.ndarray, size) -> np.ndarray:
    """Resize to cover ``size`` keeping the aspect (OpenCV), then take the centre. Sizes in the tests
    are chosen so the resized size and the centre are whole pixels."""
    h, w = frames.shape[1:3]
    oh, ow = size
    s = max(oh / h, ow / w)
    nh, nw = round(h * s), round(w * s)
    assert abs(nh - h * s) < 1e-6 and abs(nw - w * s) < 1e-6 and (nh - oh) % 2 == 0 and (nw - ow) % 2 == 0
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    y0, x0 = (nh - oh) // 2, (nw - ow) // 2
    return np.stack([cv2.resize(f, (nw, nh), interpolation=interp)[y0:y0 + oh, x0:x0 + ow] for f in frames])


@pytest.mark.parametrize("size", [(64, 88), (96, 96), (112, 112), (160, 160)])
def test_resize_covers_then_centre_crops(vp9_video, size):
    ref = reference(vp9_video)                      # 128 x 176
    idx = [5, 33, 62]
    got = decode_frames(vp9_video, idx, size)
    assert got.shape == (3, *size, 3)
    want = cover_crop_reference(ref[idx], size)
    for k in range(3):
        assert mad(got[k], want[k]) < 3.0
    # a one-pixel shift of the crop would be visible: the check above can tell
    shifted = cover_crop_reference(ref[idx], size)[:, 1:, :]
    assert mad(got[:, :-1], shifted) > mad(got, want) + 1.0


def test_cover_crop_geometry():
    assert cover_crop(128, 176, 96, 96) == (96, 132, 0, 18)
    assert cover_crop(128, 176, 64, 88) == (64, 88, 0, 0)
    assert cover_crop(120, 160, 64, 64) == (64, 85, 0, 11)        # 85.33 -> 85; (85 - 64) / 2 rounds up
    assert cover_crop(272, 640, 128, 176) == (128, 301, 0, 63)


def test_out_of_range_and_bad_files_raise(vp9_video, tmp_path):
    n = len(reference(vp9_video))
    with pytest.raises(DecodeError, match="requested"):
        decode_frames(vp9_video, [0, n], None)
    with pytest.raises(DecodeError, match="requested"):
        decode_frames(vp9_video, [-1], None)
    bad = tmp_path / "bad.webm"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match="bad.webm"):
        decode_frames(bad, [0], (32, 32))
    with pytest.raises(DecodeError, match="missing"):
        decode_frames(tmp_path / "missing.webm", [0], (32, 32))
    assert decode_frames(vp9_video, [], (32, 48)).shape == (0, 32, 48, 3)


def test_file_rewritten_after_first_read_is_reindexed(make_video, tmp_path):
    a = make_video(n=30, h=32, w=48, codec="vp9", seed=1)
    b = make_video(n=50, h=32, w=48, codec="vp9", seed=2)
    target = tmp_path / "v.webm"
    target.write_bytes(a.read_bytes())
    assert decode_frames(target, [29], None).shape[0] == 1
    with pytest.raises(DecodeError):
        decode_frames(target, [45], None)
    target.write_bytes(b.read_bytes())
    assert_same_frames(decode_frames(target, [45], None), reference(b), [45])


def test_one_swscale_context_per_call_gives_the_per_frame_conversion_exactly(h264_video):
    # decode_frames reuses one swscale context for all frames of a call: the pixels must be those of a
    # fresh conversion of each frame (the full decode's frame, with its own context), bit for bit
    idx, size = [40, 3, 3, 17, 63, 0], (96, 96)
    nh, nw, y0, x0 = cover_crop(128, 176, *size)
    with av.open(str(h264_video)) as c:
        frames = list(c.decode(video=0))
    want = np.stack([frames[i].reformat(width=nw, height=nh, format="rgb24", interpolation=ACCURATE).to_ndarray()
                     [y0:y0 + size[0], x0:x0 + size[1]] for i in idx])
    assert np.array_equal(decode_frames(h264_video, idx, size), want)
    assert np.array_equal(decode_frames(h264_video, idx, None), reference(h264_video)[idx])
