"""Periodic textures on a torus, moved by exact sub-pixel translations: the synthetic videos' primitives.

A band-limited periodic texture translated by a Fourier phase shift is an exact real translation, so
the true motion of every pixel of a synthetic video is known (:mod:`mscl_stream.data.synthetic`,
:mod:`mscl_stream.data.motion_task`).
"""

from __future__ import annotations

import numpy as np

from mscl_stream.data.profiles import unit_periodic_spectrum


def smooth_texture(rng: np.random.Generator, h: int, w: int, cutoff: float) -> np.ndarray:
    """Periodic band-limited RGB texture in the Fourier domain: (3, h, w//2+1) complex spectrum.

    ``cutoff`` is the Gaussian low-pass width in cycles per frame; the texture is scaled to unit std.
    """
    noise = rng.standard_normal((3, h, w))
    spec = np.fft.rfft2(noise)
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w
    spec *= np.exp(-0.5 * (fx**2 + fy**2) / cutoff**2)
    return unit_periodic_spectrum(spec, h, w)            # zero mean: the colour offset is added later


def shifted(spec: np.ndarray, h: int, w: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Texture translated by (dx[t], dy[t]) pixels (periodically) for each t: (T, 3, h, w) float32."""
    fy = np.fft.fftfreq(h)[None, :, None]
    fx = np.fft.rfftfreq(w)[None, None, :]
    # the phase ramp is separable: exp(-2 pi i (fx dx + fy dy)) = row factor * column factor
    px = np.exp(-2j * np.pi * fx * dx[:, None, None]).astype(np.complex64)
    py = np.exp(-2j * np.pi * fy * dy[:, None, None]).astype(np.complex64)
    return np.fft.irfft2(spec.astype(np.complex64)[None] * (py * px)[:, None], s=(h, w))


def soft_box(h: int, w: int, cx: float, cy: float, bh: float, bw: float, soft: float = 2.0) -> np.ndarray:
    """Periodic soft rectangle mask centred at (cx, cy): (h, w) in [0, 1], analytic in the centre."""
    x = np.arange(w)[None, :] - cx
    y = np.arange(h)[:, None] - cy
    x = (x + w / 2) % w - w / 2                          # periodic distance to the centre
    y = (y + h / 2) % h - h / 2
    mx = np.clip((bw / 2 - np.abs(x)) / soft + 0.5, 0.0, 1.0)
    my = np.clip((bh / 2 - np.abs(y)) / soft + 0.5, 0.0, 1.0)
    return my * mx
