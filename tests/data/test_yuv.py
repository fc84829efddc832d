"""YUV hand-off: ``decode_frames(output="yuv")`` planes against an independent full decode, the torch
conversion against a float64 numpy re-implementation of the BT.601/BT.709 equations, and the whole
YUV path against the RGB path (``decode_frames(..., size)``) on real decodes."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from mscl_stream.data.frame_sink import YuvFrames
from mscl_stream.data.pyav_decode import decode_frames
from mscl_stream.data.synthetic import moving_texture_frames
from mscl_stream.data.yuv import yuv420_to_rgb_cover_crop

# Published YUV -> RGB matrices (ITU-R BT.601 / BT.709; limited range: Y 16..235, chroma 16..240; full
# range as JPEG/JFIF), written out rather than derived: rows R, G, B; columns Y - offset, U - 128, V - 128
PUBLISHED = {
    ("bt601", False): (16, [[1.164384, 0.0, 1.596027], [1.164384, -0.391762, -0.812968], [1.164384, 2.017232, 0.0]]),
    ("bt709", False): (16, [[1.164384, 0.0, 1.792741], [1.164384, -0.213249, -0.532909], [1.164384, 2.112402, 0.0]]),
    ("bt601", True): (0, [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]),
    ("bt709", True): (0, [[1.0, 0.0, 1.5748], [1.0, -0.187324, -0.468124], [1.0, 1.8556, 0.0]]),
}


def bilinear(plane: np.ndarray, h: int, w: int, left: bool = False) -> np.ndarray:
    """float64 (hc, wc) -> (h, w) upsampling: output pixel centre i + 0.5 maps to (i + 0.5) * hc / h in
    the input (pixel edges), linear between the two nearest input centres, edge pixels repeated.
    ``left``: chroma sample j sits on luma column 2j, i.e. a quarter chroma pixel right of the centred
    grid's position for the same output column (swscale's convention for MPEG-2 siting)."""
    def axis(n_in: int, n_out: int, shift: float = 0.0):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5 + shift, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo
    r0, r1, fy = axis(plane.shape[0], h)
    c0, c1, fx = axis(plane.shape[1], w, 0.25 if left else 0.0)
    p = plane.astype(np.float64)
    rows = p[r0] * (1 - fy)[:, None] + p[r1] * fy[:, None]
    return rows[:, c0] * (1 - fx) + rows[:, c1] * fx


def reference_rgb(y: np.ndarray, uv: np.ndarray, matrix: str = "bt601", full_range: bool = False,
                  left: bool = False) -> np.ndarray:
    """(h, w) luma + (2, hc, wc) chroma -> (h, w, 3) float64 RGB (unrounded, unclamped)."""
    off, m = PUBLISHED[(matrix, full_range)]
    h, w = y.shape
    yuv = np.stack([y.astype(np.float64) - off, bilinear(uv[0], h, w, left) - 128, bilinear(uv[1], h, w, left) - 128],
                   -1)
    return yuv @ np.asarray(m).T


@pytest.mark.parametrize("h,w", [(48, 64), (47, 63), (9, 14)])
@pytest.mark.parametrize("matrix,full_range", list(PUBLISHED))
@pytest.mark.parametrize("left", [False, True])
def test_conversion_equals_the_published_equations(h, w, matrix, full_range, left):
    rng = np.random.default_rng(h * w)
    y = rng.integers(16, 236, (3, h, w), dtype=np.uint8)
    uv = rng.integers(16, 241, (3, 2, (h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
    got = yuv420_to_rgb_cover_crop(torch.from_numpy(y), torch.from_numpy(uv), None, matrix, full_range, left)
    assert got.shape == (3, h, w, 3) and got.dtype == torch.uint8
    for k in range(3):
        want = np.clip(np.floor(reference_rgb(y[k], uv[k], matrix, full_range, left) + 0.5), 0, 255)
        diff = np.abs(got[k].numpy().astype(np.float64) - want)
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())   # float32 rounding only


def test_equations_can_tell_the_matrices_and_sitings_apart():
    # the check above fails on the wrong matrix, range or siting: random planes differ by far more than 1
    rng = np.random.default_rng(0)
    y, uv = rng.integers(16, 236, (1, 16, 16), dtype=np.uint8), rng.integers(16, 241, (1, 2, 8, 8), dtype=np.uint8)
    got = yuv420_to_rgb_cover_crop(torch.from_numpy(y), torch.from_numpy(uv), None, "bt709").numpy()[0]
    assert np.abs(got - reference_rgb(y[0], uv[0], "bt601")).max() > 10
    assert np.abs(got - reference_rgb(y[0], uv[0], "bt709", left=True)).max() > 10


def encode(path, frames: np.ndarray, codec: str, pix_fmt: str, options: dict | None = None, gop: int = 12):
    """RGB frames -> a file with PyAV, in the given pixel format (options: the encoder's)."""
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=Fraction(25, 1), options=options or {})
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        st.codec_context.gop_size = gop
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            for pkt in st.encode(vf):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def all_planes(path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame's planes from a plain full decode: (N, h, w) luma, (N, 2, hc, wc) chroma."""
    ys, uvs = [], []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in f.planes)
            ys.append(y.copy())
            uvs.append(np.stack([u, v]))
    return np.stack(ys), np.stack(uvs)


def convert(frames, size):
    if isinstance(frames, np.ndarray):
        return frames
    return yuv420_to_rgb_cover_crop(torch.from_numpy(frames.y), torch.from_numpy(frames.uv), size,
                                    frames.matrix, frames.full_range, frames.chroma_left).numpy()


def mean_diffs(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(len(got), len(ref)) mean absolute difference of every pair of frames."""
    g, r = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    return np.stack([np.abs(r - x).mean(axis=1) for x in g])


def assert_matches_rgb_path(path, idx, size, tol: float = 3.0) -> tuple[float, float]:
    """The YUV path's frames (converted by torch) are within ``tol`` of the RGB path's frame at the same
    index and closest to it among all of the file's frames; returns (worst per-frame mean, max)."""
    n = len(all_planes(path)[0])
    ref = decode_frames(path, np.arange(n), size)
    got = convert(decode_frames(path, idx, size, output="yuv"), size)
    assert got.shape == (len(idx),) + ref.shape[1:]
    d = mean_diffs(got, ref)
    for k, i in enumerate(idx):
        assert d[k, i] < tol and int(np.argmin(d[k])) == i, (k, i, d[k, i], int(np.argmin(d[k])))
    return float(max(d[k, i] for k, i in enumerate(idx))), float(np.abs(got.astype(int) - ref[idx]).max())


@pytest.mark.parametrize("fixture", ["h264_video", "vp9_video"])
def test_planes_are_the_decoders_in_order_with_duplicates(request, fixture):
    path = request.getfixturevalue(fixture)
    y, uv = all_planes(path)
    idx = [40, 3, 3, 17, 63, 0, 40, 16, 15]
    got = decode_frames(path, idx, (64, 88), threads=1, output="yuv")
    assert isinstance(got, YuvFrames) and (got.matrix, got.full_range) == ("bt601", False)
    assert got.chroma_left == (fixture == "h264_video")          # H.264's default siting; VP9's is centred
    assert np.array_equal(got.y, y[idx]) and np.array_equal(got.uv, uv[idx])


@pytest.mark.parametrize("size", [(64, 88), (96, 96), (128, 176), (160, 160)])
def test_yuv_path_matches_the_rgb_path(h264_video, size):
    worst, _ = assert_matches_rgb_path(h264_video, [5, 33, 33, 62, 0], size)
    assert worst < 0.2                         # the same conversion up to float rounding


def test_crop_geometry_is_the_rgb_paths(vp9_video):
    # a one-pixel shift of the crop would be visible: the RGB-path comparison can tell
    size, idx = (96, 96), [5, 33, 62]
    rgb = decode_frames(vp9_video, idx, size)
    got = convert(decode_frames(vp9_video, idx, size, output="yuv"), size).astype(np.float64)
    assert np.abs(got - rgb).mean() + 1.0 < np.abs(got[:, 1:] - rgb[:, :-1]).mean()


def test_odd_sizes(tmp_path):
    frames = np.ascontiguousarray(moving_texture_frames(30, 48, 64, (2.0, 1.0), seed=3)[:, :47, :63])
    path = encode(tmp_path / "odd.webm", frames, "libvpx-vp9", "yuv420p")
    y, uv = all_planes(path)
    got = decode_frames(path, [29, 4, 4, 11], None, output="yuv")
    assert got.y.shape == (4, 47, 63) and got.uv.shape == (4, 2, 24, 32)
    assert np.array_equal(got.y, y[[29, 4, 4, 11]]) and np.array_equal(got.uv, uv[[29, 4, 4, 11]])
    for size in [None, (32, 40), (24, 24), (48, 64)]:
        worst, _ = assert_matches_rgb_path(path, [29, 4, 4, 11, 0], size)
        assert worst < 0.2


@pytest.mark.parametrize("name,codec,pix_fmt,options,tag", [
    ("mjpeg.avi", "mjpeg", "yuvj420p", None, ("bt601", True)),
    ("full.mp4", "libx264", "yuvj420p", None, ("bt601", True)),
    ("bt709.mp4", "libx264", "yuv420p", {"x264-params": "colormatrix=bt709"}, ("bt709", False)),
])
def test_tagged_matrix_and_range_follow_the_rgb_path(tmp_path, name, codec, pix_fmt, options, tag):
    # swscale converts with the matrix and range the file is tagged with; the YUV path must too
    frames = moving_texture_frames(24, 48, 64, (2.0, 1.0), seed=4)
    path = encode(tmp_path / name, frames, codec, pix_fmt, options)
    got = decode_frames(path, [3, 20], None, output="yuv")
    assert isinstance(got, YuvFrames) and (got.matrix, got.full_range) == tag
    worst, _ = assert_matches_rgb_path(path, [3, 20, 20, 7], (32, 40))
    assert worst < 0.2
    wrong = YuvFrames(got.y, got.uv, "bt709" if tag[0] == "bt601" else "bt601", not tag[1], got.chroma_left)
    assert np.abs(convert(wrong, None).astype(int) - decode_frames(path, [3, 20], None)).mean() > 2.0


@pytest.mark.parametrize("name,codec,pix_fmt", [("444.mp4", "libx264", "yuv444p"), ("422.mp4", "libx264", "yuv422p"),
                                                ("10bit.mp4", "libx264", "yuv420p10le"),
                                                ("mjpeg422.avi", "mjpeg", "yuvj422p")])
def test_other_pixel_formats_come_back_as_rgb(tmp_path, name, codec, pix_fmt):
    frames = moving_texture_frames(16, 48, 64, (2.0, 1.0), seed=5)
    path = encode(tmp_path / name, frames, codec, pix_fmt)
    idx = [15, 2, 2, 9]
    got = decode_frames(path, idx, (32, 40), output="yuv")
    assert isinstance(got, np.ndarray) and np.array_equal(got, decode_frames(path, idx, (32, 40)))


def test_groups_split_per_sample(h264_video):
    from mscl_stream.data.pyav_decode import decode_group_counted

    lists = [np.array([5, 9, 9]), np.array([9, 60]), np.array([0])]
    parts, stats = decode_group_counted(h264_video, lists, (64, 88), output="yuv")
    y, uv = all_planes(h264_video)
    assert [len(p) for p in parts] == [3, 2, 1] and stats["wanted"] == 4
    for p, lst in zip(parts, lists):
        assert isinstance(p, YuvFrames) and np.array_equal(p.y, y[lst]) and np.array_equal(p.uv, uv[lst])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_conversion_queues_no_host_sync(h264_video):
    frames = decode_frames(h264_video, [5, 33, 62], None, output="yuv")
    y, uv = torch.from_numpy(frames.y).cuda(), torch.from_numpy(frames.uv).cuda()
    yuv420_to_rgb_cover_crop(y, uv, (64, 88), chroma_left=True)   # builds this size's resampling matrices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = yuv420_to_rgb_cover_crop(y, uv, (64, 88), chroma_left=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = yuv420_to_rgb_cover_crop(y.cpu(), uv.cpu(), (64, 88), chroma_left=True)
    assert got.is_cuda and (got.cpu().int() - cpu.int()).abs().max() <= 2
    assert_matches_rgb_path(h264_video, [5, 33, 62], (64, 88))
