"""Synthetic videos with known motion, and a small labelled sample dataset.

Frames are built on a torus: a smooth random background texture and a smooth random foreground texture
seen through a soft rectangular mask, each translated with a constant velocity. Textures are
band-limited and periodic, so a sub-pixel translation is an exact Fourier phase shift and the true
motion is known everywhere: foreground pixels move by ``velocity`` per frame, background pixels by
``bg_velocity`` (positions taken modulo the frame size). Videos are encoded with PyAV.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mscl_stream.errors import UserError

# codec name -> (FFmpeg encoder, container suffix, pixel format, encoder options)
_CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    # realtime + cpu-used 8: ~10x faster than the default "good" deadline, quality is irrelevant here
    "vp9": ("libvpx-vp9", ".webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "32",
                                               "b": "0", "row-mt": "1"}),
    "h264": ("libx264", ".mp4", "yuv420p", {"preset": "ultrafast", "crf": "23"}),
    "hevc": ("libx265", ".mp4", "yuv420p", {"preset": "ultrafast", "crf": "28",
                                            "x265-params": "log-level=error"}),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p", {"q": "4"}),
}

CODECS = tuple(_CODECS)
CLASSES = ("right", "left", "down", "up")          # sample dataset: foreground direction of motion
_DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}


def suffix_for(codec: str) -> str:
    """Container file suffix (with the dot) used for ``codec``."""
    if codec not in _CODECS:
        raise UserError(f"codec {codec!r}: choose one of {', '.join(_CODECS)}")
    return _CODECS[codec][1]


def write_video(path: str | Path, frames: np.ndarray, codec: str = "vp9", fps: int = 25,
                gop: int = 16) -> Path:
    """Encode RGB frames into a video file with PyAV.

    Args:
        path: output file; its suffix is replaced by the codec's container (.webm/.mp4/.avi).
        frames: (N, H, W, 3) uint8 RGB; H and W must be even (4:2:0 chroma).
        codec: "vp9", "h264", "hevc" or "mjpeg".
        fps: frame rate (integer, exact time base 1/fps).
        gop: keyframe interval in frames; short because a random start decodes from the previous keyframe.

    Returns:
        The path written.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserError(f"write_video: need (N,H,W,3) uint8 frames, got {frames.shape} {frames.dtype}")
    n, h, w, _ = frames.shape
    if n == 0 or h % 2 or w % 2:
        raise UserError(f"write_video: need >= 1 frame and even H, W; got {frames.shape}")
    encoder, suffix, pix_fmt, options = _CODECS[codec] if codec in _CODECS else (None, "", "", {})
    if encoder is None:
        raise UserError(f"codec {codec!r}: choose one of {', '.join(_CODECS)}")
    path = Path(path).with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + suffix)   # atomic: a crash never leaves a half file
    with av.open(str(tmp), "w") as out:
        st = out.add_stream(encoder, rate=Fraction(fps, 1), options=dict(options))
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        st.codec_context.gop_size = gop
        if codec in ("h264", "hevc"):
            # no B-frames: decode order == display order, so packet count == frame count trivially
            st.codec_context.max_b_frames = 0
        st.codec_context.time_base = Fraction(1, fps)
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            vf.pts = i
            for pkt in st.encode(vf):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    tmp.replace(path)
    return path


def _smooth_texture(rng: np.random.Generator, h: int, w: int, cutoff: float) -> np.ndarray:
    """Periodic band-limited RGB texture in the Fourier domain: (3, h, w//2+1) complex spectrum.

    ``cutoff`` is the Gaussian low-pass width in cycles per frame; the texture is scaled to unit std.
    """
    noise = rng.standard_normal((3, h, w))
    spec = np.fft.rfft2(noise)
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w
    spec *= np.exp(-0.5 * (fx**2 + fy**2) / cutoff**2)
    spec[:, 0, 0] = 0.0                                  # zero mean: the colour offset is added later
    # cut the Nyquist row/column so a Fourier shift is a real, exact translation
    if h % 2 == 0:
        spec[:, h // 2, :] = 0.0
    if w % 2 == 0:
        spec[:, :, -1] = 0.0
    std = np.fft.irfft2(spec, s=(h, w)).std()
    return spec / max(std, 1e-12)


def _shift(spec: np.ndarray, h: int, w: int, dx: float, dy: float) -> np.ndarray:
    """Texture translated by (dx, dy) pixels (periodically): (3, h, w) float64."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    phase = np.exp(-2j * np.pi * (fx * dx + fy * dy))
    return np.fft.irfft2(spec * phase, s=(h, w))


def _soft_box(h: int, w: int, cx: float, cy: float, bh: float, bw: float, soft: float = 2.0) -> np.ndarray:
    """Periodic soft rectangle mask centred at (cx, cy): (h, w) in [0, 1], analytic in the centre."""
    x = np.arange(w)[None, :] - cx
    y = np.arange(h)[:, None] - cy
    x = (x + w / 2) % w - w / 2                          # periodic distance to the centre
    y = (y + h / 2) % h - h / 2
    mx = np.clip((bw / 2 - np.abs(x)) / soft + 0.5, 0.0, 1.0)
    my = np.clip((bh / 2 - np.abs(y)) / soft + 0.5, 0.0, 1.0)
    return my * mx


def moving_texture_frames(n: int, h: int, w: int, velocity: tuple[float, float] = (2.0, 0.0),
                          seed: int = 0, bg_velocity: tuple[float, float] = (0.0, 0.0),
                          patch: tuple[float, float] | None = None) -> np.ndarray:
    """Frames of a textured foreground patch translating over a textured background.

    Frame t is, on the torus of size (h, w): ``mask(x - v t) * F(x - v t) + (1 - mask(x - v t)) * B(x - b t)``
    with F, B smooth random textures, so every foreground pixel moves by exactly ``velocity`` and every
    background pixel by ``bg_velocity`` per frame (sub-pixel velocities are exact Fourier shifts).

    Args:
        n, h, w: frame count and size.
        velocity: (dx, dy) foreground motion in pixels per frame (x right, y down).
        seed: texture, colours and initial patch position.
        bg_velocity: (dx, dy) background motion in pixels per frame.
        patch: (height, width) of the foreground patch in pixels (default: half of each side).

    Returns:
        (n, h, w, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    bg = _smooth_texture(rng, h, w, cutoff=rng.uniform(4.0, 8.0))
    fg = _smooth_texture(rng, h, w, cutoff=rng.uniform(6.0, 12.0))
    bg_mean, fg_mean = rng.uniform(70, 130, 3), rng.uniform(110, 170, 3)
    bg_amp, fg_amp = rng.uniform(20, 30), rng.uniform(35, 50)
    ph, pw = patch if patch is not None else (h / 2, w / 2)
    cx0, cy0 = rng.uniform(0, w), rng.uniform(0, h)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        fx, fy = velocity[0] * t, velocity[1] * t
        m = _soft_box(h, w, cx0 + fx, cy0 + fy, ph, pw)
        f = fg_mean[:, None, None] + fg_amp * _shift(fg, h, w, fx, fy)
        b = bg_mean[:, None, None] + bg_amp * _shift(bg, h, w, bg_velocity[0] * t, bg_velocity[1] * t)
        img = m * f + (1.0 - m) * b
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return out
