"""The ``motion`` sample task: classes that one rotation of every flow vector of a clip leaves unchanged.

Flow Rotation Augmentation (FRA) rotates all flow vectors of a clip by one angle and asks the RGB clip
to match the result, so it teaches the encoder that the direction of motion is a nuisance. The
``direction`` task (:data:`mscl_stream.data.synthetic.CLASSES`) labels exactly that nuisance; this task
labels what such a rotation keeps: speed over time, the number of moving parts, the angle between the
parts' motions and the extent of the moving region. docs/experiments.md ("Two sample tasks") states the
classes and this reason.

Every video shows a textured background and two textured parts (so a single frame never tells the
class: both parts are always there); the class says which of them move, and how:

=================  ===================================================================================
``still``          nothing moves
``pan``            the whole frame (background and both parts) translates with one velocity
``steady``         one part translates at a constant velocity; the rest stays
``oscillate``      one part moves back and forth along a line (sinusoidal offset); the rest stays
``stop_go``        one part alternates between moving with a constant velocity and standing still
``pair_same``      both parts translate with the same velocity; the background stays
``pair_opposite``  both parts translate at the same speed in opposite directions; the background stays
=================  ===================================================================================

Drawn per video, independently of the class: the direction (uniform over the circle; the axis for
``oscillate``), the peak speed (``SPEED`` px/frame), the period of ``oscillate`` and ``stop_go``
(``PERIOD_S`` seconds) and its phase, which part moves, and (by the renderers) textures, colours, part
sizes, positions, frame size and length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mscl_stream.data.textures import shifted, smooth_texture, soft_box
from mscl_stream.errors import UserError

MOTION_CLASSES = ("still", "pan", "steady", "oscillate", "stop_go", "pair_same", "pair_opposite")
SPEED = (1.0, 3.0)               # px/frame: peak speed of whatever moves, at the video's own size
# Period of oscillate / stop_go in seconds: 20-32 frames at 25 fps, so one demo clip (8 frames at stride
# 4: 29 raw frames) always spans at least one reversal or one stop.
PERIOD_S = (0.8, 1.28)


@dataclass(frozen=True)
class Trajectories:
    """Where the layers of one video are at each frame: offsets (dx, dy) in pixels from frame 0.

    Attributes:
        background: (n, 2) float64 offsets of the background (x right, y down).
        parts: two (n, 2) float64 offsets, one per part (the part's texture and mask move together).
        info: one line describing the draw (for the generator's log).
        draw: the nuisances drawn (``angle_deg``: the direction, or the axis for ``oscillate``, in image
            coordinates, x right, y down; ``speed`` px/frame; ``period`` frames; ``mover``: the part that
            moves alone), for analyses of what an encoder keeps; empty where a test builds one by hand.
    """

    background: np.ndarray
    parts: tuple[np.ndarray, np.ndarray]
    info: str
    draw: dict = field(default_factory=dict)


def _stop_go_offsets(t: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Distance travelled at unit speed when moving during the first half of every period: (n,) float64.

    Exact integral of the square wave: whole periods contribute period/2 each, plus the moving part of
    the current one (``phase`` in [0, 1) shifts where in its cycle the video starts).
    """
    def travelled(u: np.ndarray) -> np.ndarray:   # from cycle time 0 to u (in frames)
        whole, rest = np.divmod(u, period)
        return whole * (period / 2) + np.minimum(rest, period / 2)

    start = phase * period
    return travelled(t + start) - travelled(np.array(start))


def sample_trajectories(name: str, n: int, fps: float, rng: np.random.Generator) -> Trajectories:
    """Draw the motion of one video of class ``name`` with ``n`` frames at ``fps``.

    The nuisance draws come first and in the same order for every class, so class and nuisances are
    independent by construction.
    """
    if name not in MOTION_CLASSES:
        raise UserError(f"motion class {name!r}: choose one of {', '.join(MOTION_CLASSES)}")
    angle = rng.uniform(0.0, 2.0 * np.pi)
    speed = rng.uniform(*SPEED)
    period = rng.uniform(*PERIOD_S) * fps
    phase = rng.uniform(0.0, 1.0)
    mover = int(rng.integers(2))
    u = np.array([np.cos(angle), np.sin(angle)])
    t = np.arange(n, dtype=np.float64)
    zero = np.zeros((n, 2))
    line = (speed * t)[:, None] * u[None]
    if name == "oscillate":
        amp = speed * period / (2.0 * np.pi)        # peak speed of amp * sin(2 pi t / period) is `speed`
        off = amp * (np.sin(2.0 * np.pi * (t / period + phase)) - np.sin(2.0 * np.pi * phase))
        line = off[:, None] * u[None]
    elif name == "stop_go":
        line = (speed * _stop_go_offsets(t, period, phase))[:, None] * u[None]
    bg, parts = zero, [zero, zero]
    if name == "pan":
        bg, parts = line, [line, line]
    elif name in ("steady", "oscillate", "stop_go"):
        parts[mover] = line
    elif name == "pair_same":
        parts = [line, line]
    elif name == "pair_opposite":
        parts = [line, -line]
    info = ("still" if name == "still" else f"{name}: {np.degrees(angle):.0f} deg, {speed:.2f} px/frame"
            + (f", period {period:.1f} frames" if name in ("oscillate", "stop_go") else "")
            + (f", part {mover} moves" if name in ("steady", "oscillate", "stop_go") else ""))
    draw = {"class": name, "angle_deg": float(np.degrees(angle)), "speed": float(speed), "period": float(period),
            "mover": mover}
    return Trajectories(bg, (parts[0], parts[1]), info, draw)


def motion_texture_frames(n: int, h: int, w: int, traj: Trajectories, seed: int = 0) -> np.ndarray:
    """Toy-profile frames: a smooth background and two smooth textured parts moving as ``traj`` says.

    Frame t is, on the torus of size (h, w), the background ``B(x - b_t)`` with each part composited over
    it in turn: ``m_j(x - p_jt) * F_j(x - p_jt)`` (soft box mask ``m_j``), so every pixel of part j moves
    by exactly ``p_jt`` (sub-pixel offsets are exact Fourier shifts). Part sizes are 25-45 % of each side.

    Returns:
        (n, h, w, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    bg = smooth_texture(rng, h, w, cutoff=rng.uniform(4.0, 8.0))
    bg_mean = rng.uniform(70, 130, 3).astype(np.float32)[:, None, None]
    bg_amp = np.float32(rng.uniform(20, 30))
    parts = []
    for _ in range(2):
        spec = smooth_texture(rng, h, w, cutoff=rng.uniform(6.0, 12.0))
        mean = rng.uniform(110, 170, 3).astype(np.float32)[:, None, None]
        amp = np.float32(rng.uniform(35, 50))
        size = (h * rng.uniform(0.25, 0.45), w * rng.uniform(0.25, 0.45))
        parts.append((spec, mean, amp, size, (rng.uniform(0, w), rng.uniform(0, h))))
    out = np.empty((n, h, w, 3), np.uint8)
    chunk = 16                                   # frames per vectorised FFT call (bounded memory)
    for t0 in range(0, n, chunk):
        sl = slice(t0, min(n, t0 + chunk))
        b = traj.background[sl]
        img = shifted(bg, h, w, b[:, 0], b[:, 1]) * bg_amp + bg_mean
        for (spec, mean, amp, (ph, pw), (cx, cy)), off in zip(parts, traj.parts):
            o = off[sl]
            f = shifted(spec, h, w, o[:, 0], o[:, 1]) * amp + mean
            m = np.stack([soft_box(h, w, cx + dx, cy + dy, ph, pw) for dx, dy in o]).astype(np.float32)
            img += m[:, None] * (f - img)
        np.rint(img, out=img)
        out[sl] = np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out
