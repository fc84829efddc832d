"""Benchmark data profiles: synthetic videos shaped and encoded like the datasets people pretrain on.

``toy`` is the small sample data of :func:`mscl_stream.data.synthetic.make_sample_dataset` (120x160 to
144x192, x264/libvpx at their fastest settings, a keyframe every 16 frames). ``ucf101`` and ``k400``
match the size, frame rate, length and encoding of UCF101 and of Kinetics-400 as usually stored:

============  ==================================  =====  ==========  ===========================
profile       size (H x W)                        fps    length      encoding
============  ==================================  =====  ==========  ===========================
``ucf101``    240 x 320                           25     6-8 s       x264 ``medium``, GOP 250
``k400``      256 x 340 or 256 x 456 (short 256)   30     10 s        x264 ``medium``, GOP 250
============  ==================================  =====  ==========  ===========================

x264 ``medium`` means CABAC and up to 3 B-frames with a keyframe every ``gop`` frames (scene cuts may
add more); the VP9 versions (``codec="vp9"``, for DALI's CPU decoder) use libvpx's ``good`` deadline
with alt-ref frames. Decoding cost depends on what the pictures hold, so the content is built to cost
what camera footage costs, not flat colour: a broadband (1/f amplitude spectrum, like natural images)
background panning in a random direction, 1-3 textured objects moving over it, and per-frame sensor
grain. The class is still only how things move (the ``direction`` task: ``horizontal``, ``up``,
``down``, ``still``; the ``motion`` task: two objects and the background moving as
:mod:`mscl_stream.data.motion_task` says), so ``index``, ``pretrain`` and evaluation run on these
datasets as on the toy one. benchmarks/README.md
gives the measured decode cost against a real clip encoded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mscl_stream.errors import UserError

if TYPE_CHECKING:
    from mscl_stream.data.motion_task import Trajectories


@dataclass(frozen=True)
class Profile:
    """Shape and encoding of one benchmark data profile."""

    name: str
    sizes: tuple[tuple[int, int], ...]    # (H, W) choices, one drawn per video
    fps: int
    frames: tuple[int, int]              # frame count range [lo, hi] (inclusive)
    gop: int                             # keyframe interval (frames)
    encoding: str                        # "toy" (fastest settings) or "medium" (x264 medium-like)


PROFILES: dict[str, Profile] = {
    "toy": Profile("toy", ((120, 160), (128, 170), (136, 182), (144, 192)), 25, (140, 220), 16, "toy"),
    "ucf101": Profile("ucf101", ((240, 320),), 25, (150, 200), 250, "medium"),
    "k400": Profile("k400", ((256, 340), (256, 456)), 30, (300, 300), 250, "medium"),
}

# Grain (std of per-frame Gaussian noise, 8-bit levels) and pan/object speeds: chosen so that one
# MSCL sample of a k400 video costs about what the same sample of a real clip encoded alike costs
# to decode (calibration in benchmarks/README.md, "Decode cost by data profile").
GRAIN_STD = 2.0
PAN_SPEED = (0.3, 1.5)                   # px/frame, camera pan (background)
OBJECT_SPEED = (1.0, 3.0)                # px/frame, moving objects (the class direction)


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(f"profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def _pink_spectrum(rng: np.random.Generator, h: int, w: int, alpha: float = 1.0) -> np.ndarray:
    """Periodic RGB texture with a 1/f^alpha amplitude spectrum: (3, h, w//2+1) complex, unit std.

    The three channels share most of their structure (natural images are strongly correlated across
    colour), with a little independent colour texture on top. Nyquist row/column are cut so a Fourier
    phase shift is an exact real translation.
    """
    base = rng.standard_normal((h, w))
    col = rng.standard_normal((3, h, w))
    noise = base[None] + 0.35 * col
    spec = np.fft.rfft2(noise)
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spec *= f ** -alpha
    return unit_periodic_spectrum(spec, h, w)


def unit_periodic_spectrum(spec: np.ndarray, h: int, w: int) -> np.ndarray:
    """A texture spectrum (3, h, w//2+1) made zero-mean, unit-std, with the Nyquist row/column cut so
    that a Fourier phase shift is an exact real translation (modified in place and returned)."""
    spec[:, 0, 0] = 0.0
    if h % 2 == 0:
        spec[:, h // 2, :] = 0.0
    if w % 2 == 0:
        spec[:, :, -1] = 0.0
    std = np.fft.irfft2(spec, s=(h, w)).std()
    return spec / max(std, 1e-12)


def _shift(spec: np.ndarray, h: int, w: int, dx: float, dy: float) -> np.ndarray:
    """irfft2 of ``spec`` translated by (dx, dy) pixels (periodic, exact): (3, h, w) float32."""
    px = np.exp(-2j * np.pi * np.fft.rfftfreq(w) * dx)[None, None, :]
    py = np.exp(-2j * np.pi * np.fft.fftfreq(h) * dy)[None, :, None]
    return np.fft.irfft2(spec * (py * px), s=(h, w)).astype(np.float32)


@dataclass
class _Object:
    spec: np.ndarray                     # (3, ph, pw//2+1) patch texture spectrum
    mean: np.ndarray                     # (3, 1, 1) colour
    amp: float
    size: tuple[int, int]                # (ph, pw) patch box (even)
    radii: tuple[float, float]           # ellipse half-axes (ry, rx), inside the box
    p0: tuple[float, float]              # (x, y) box top-left at t = 0 (frame coordinates)
    v: tuple[float, float]               # (vx, vy) px/frame


def _ellipse(ph: int, pw: int, ry: float, rx: float, fx: float, fy: float) -> np.ndarray:
    """Soft ellipse mask (ph, pw) in [0, 1], centre at the box centre + (fx, fy), ~1.5 px soft edge."""
    y = (np.arange(ph)[:, None] - (ph - 1) / 2 - fy) / ry
    x = (np.arange(pw)[None, :] - (pw - 1) / 2 - fx) / rx
    r = np.sqrt(x ** 2 + y ** 2)
    return np.clip((1.0 - r) * min(ry, rx) / 1.5 + 0.5, 0.0, 1.0).astype(np.float32)


def realistic_frames(n: int, h: int, w: int, direction: tuple[float, float], seed: int = 0,
                     grain: float = GRAIN_STD, traj: "Trajectories | None" = None) -> tuple[np.ndarray, dict]:
    """Frames of 1-3 textured objects moving along ``direction`` over a panning broadband background.

    Every object moves at its own constant speed (``OBJECT_SPEED``, px/frame) along ``direction`` (a unit
    (dx, dy), or (0, 0) for still objects); the background pans at a constant velocity in a random
    direction (``PAN_SPEED``); each frame gets fresh Gaussian grain of std ``grain`` levels. Translations
    are exact Fourier shifts (textures are periodic and band-limited), objects are soft ellipses.

    With ``traj`` (the ``motion`` task, :mod:`mscl_stream.data.motion_task`) ``direction`` is ignored:
    there are exactly two objects and they and the background move as ``traj`` says.

    Returns:
        (frames (n, h, w, 3) uint8 RGB, info dict with "pan" (vx, vy) and "objects" [(vx, vy), ...];
        with ``traj``: "pan" and "objects" are the offsets at the last frame).
    """
    rng = np.random.default_rng(seed)
    bg = _pink_spectrum(rng, h, w, alpha=rng.uniform(1.3, 1.5)).astype(np.complex64)
    bg_mean = rng.uniform(60, 150, 3).astype(np.float32)[:, None, None]
    bg_amp = float(rng.uniform(30, 45))
    a = rng.uniform(0, 2 * np.pi)
    s = rng.uniform(*PAN_SPEED)
    pan = (s * np.cos(a), s * np.sin(a))
    objs: list[_Object] = []
    for _ in range(2 if traj is not None else int(rng.integers(1, 4))):
        ph = 2 * int(rng.uniform(0.25, 0.5) * h / 2)
        pw = 2 * int(rng.uniform(0.2, 0.4) * w / 2)
        speed = rng.uniform(*OBJECT_SPEED) * (1.0 if direction[1] or rng.random() < 0.5 else -1.0)
        objs.append(_Object(
            spec=_pink_spectrum(rng, ph, pw, alpha=rng.uniform(1.2, 1.4)).astype(np.complex64),
            mean=rng.uniform(80, 190, 3).astype(np.float32)[:, None, None], amp=float(rng.uniform(35, 55)),
            size=(ph, pw), radii=(ph / 2 - 2, pw / 2 - 2),
            p0=(rng.uniform(0, w - pw), rng.uniform(0, h - ph)),
            v=(speed * direction[0], speed * direction[1])))
    if traj is not None:
        pan_at = traj.background
        paths = list(traj.parts)
    else:
        t_all = np.arange(n, dtype=np.float64)[:, None]
        pan_at = t_all * np.array(pan)[None]
        paths = [t_all * np.array(o.v)[None] for o in objs]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        img = _shift(bg, h, w, pan_at[t, 0], pan_at[t, 1]) * np.float32(bg_amp) + bg_mean
        for o, path in zip(objs, paths):
            ph, pw = o.size
            # integer placement on the (periodic) frame + exact sub-pixel shift of texture and mask
            x, y = o.p0[0] + path[t, 0], o.p0[1] + path[t, 1]
            ix, iy = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - ix, y - iy
            tex = _shift(o.spec, ph, pw, fx, fy) * np.float32(o.amp) + o.mean
            m = _ellipse(ph, pw, *o.radii, fx, fy)[None]
            rows = np.arange(iy, iy + ph) % h
            cols = np.arange(ix, ix + pw) % w
            region = img[:, rows[:, None], cols[None, :]]
            img[:, rows[:, None], cols[None, :]] = region + m * (tex - region)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(grain)
        np.rint(img, out=img)
        out[t] = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if traj is not None:
        return out, {"pan": tuple(pan_at[-1]), "objects": [tuple(p[-1]) for p in paths]}
    return out, {"pan": pan, "objects": [o.v for o in objs]}
