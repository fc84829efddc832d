"""The random choices of an RGB view: :class:`AugmentParams`, their sampling, and the parameter-table layout.

Every random choice is drawn on the CPU (one ``torch.rand`` call on an optional ``torch.Generator``, then
numpy). A view's parameters become one float32 row per clip (columns ``COL_*``), the form the device and
the fused kernels (``mscl_stream.kernels.augment_rgb``, ``mscl_stream.kernels.flow_views``) read.
Crop boxes follow the pixel-edge convention of ``mscl_stream.geometry``; :func:`sample_params` returns
boxes whose edges sit on pixel boundaries (integer multiples of 1/W, 1/H) of the frame size it was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mscl_stream.config import AugmentConfig
from mscl_stream.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop before its centre-crop fallback


@dataclass
class AugmentParams:
    """The random choices of one batch of views (CPU tensors, or numpy arrays from ``params_from_uniforms(...,
    as_numpy=True)``; B = batch).

    Attributes:
        boxes: (B, 4) float32 relative crop boxes (x0, y0, x1, y1), pixel-edge convention (``mscl_stream.geometry``).
        flips: (B,) bool, horizontal flip.
        jitter: (B,) bool, colour jitter applied.
        factors: (B, 4) float32 (brightness, contrast, saturation, hue) in torchvision units: the first
            three multiply/blend (1 = identity), hue is a shift in fractions of the colour circle.
        order: (B, 4) long, a permutation of (0, 1, 2, 3): the order the four jitter ops run in.
        gray: (B,) bool, grayscale applied.
        blur: (B,) bool, Gaussian blur applied.
        sigma: (B,) float32 blur sigma in output pixels.
    """

    boxes: torch.Tensor
    flips: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


# Uniform draws per clip of one view: 10 crop attempts x (area, aspect), crop position (2), flip, jitter,
# 4 factors, 4 order keys, gray, blur, sigma. One torch.rand call per batch draws them all (few host ops,
# reproducible from the generator); the parameters are then computed in numpy.
_U_CROP = 2 * _CROP_ATTEMPTS + 2
N_UNIFORMS = _U_CROP + 13

# Columns of a view's parameter table (B, VIEW_COLS) float32, the form the device (and the fused kernels)
# receive: box x0 y0 x1 y1, flip, jitter, factors (brightness, contrast, saturation, hue fraction), op order
# (4 op ids), gray, blur, sigma.
COL_BOX, COL_FLIP, COL_JITTER, COL_FACTORS, COL_ORDER, COL_GRAY, COL_BLUR, COL_SIGMA = 0, 4, 5, 6, 10, 14, 15, 16
VIEW_COLS = 17


def crop_boxes_from_uniforms(u: np.ndarray, height: int, width: int, area: tuple[float, float],
                             ratio: tuple[float, float]) -> np.ndarray:
    """Random resized crop boxes from uniforms u (B, 22) in [0, 1): see :func:`sample_crop_boxes`."""
    n = _CROP_ATTEMPTS
    scale = (area[0] + (area[1] - area[0]) * u[:, :n]) * (height * width)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(lr[0] + (lr[1] - lr[0]) * u[:, n:2 * n])
    w = np.round(np.sqrt(scale * aspect))
    h = np.round(np.sqrt(scale / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)[:, None]                       # first fitting attempt per row
    w = np.take_along_axis(w, first, 1)[:, 0]
    h = np.take_along_axis(h, first, 1)[:, 0]
    i = np.minimum(np.floor(u[:, 2 * n] * (height - h + 1)), height - h)
    j = np.minimum(np.floor(u[:, 2 * n + 1] * (width - w + 1)), width - w)

    # Fallback for rows where nothing fitted: centred crop, aspect clamped into the range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    miss = ~ok.any(axis=1)
    w = np.where(miss, float(fw), w)
    h = np.where(miss, float(fh), h)
    i = np.where(miss, float((height - fh) // 2), i)
    j = np.where(miss, float((width - fw) // 2), j)
    return np.stack([j / width, i / height, (j + w) / width, (i + h) / height], axis=1).astype(np.float32)


def _draw(shape: tuple[int, int], generator: torch.Generator | None) -> np.ndarray:
    if generator is not None and generator.device.type != "cpu":
        raise UserError(f"augment: the generator must live on the CPU, got one on {generator.device}")
    return torch.rand(shape, generator=generator, dtype=torch.float64).numpy()


def sample_crop_boxes(batch_size: int, height: int, width: int, area: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop boxes, torchvision ``RandomResizedCrop.get_params`` sampling, batched.

    Up to 10 attempts per box: area fraction uniform in ``area``, aspect (w / h) log-uniform in
    ``ratio``, sides rounded to whole pixels, kept if they fit; the position is uniform over whole-pixel
    offsets. If no attempt fits: the largest centred crop whose aspect is clamped into ``ratio``.

    Args:
        batch_size: B.
        height, width: frame size H, W in pixels.
        area: (lo, hi) fraction of H * W.
        ratio: (lo, hi) aspect ratio w / h.
        generator: CPU generator (None: torch's default generator).

    Returns:
        (B, 4) float32 relative boxes (x0, y0, x1, y1) with edges on pixel boundaries (CPU).
    """
    u = _draw((batch_size, _U_CROP), generator)
    return torch.from_numpy(crop_boxes_from_uniforms(u, height, width, area, ratio))


def params_from_uniforms(u: np.ndarray, height: int, width: int, cfg: AugmentConfig,
                         as_numpy: bool = False) -> AugmentParams:
    """A view's parameters from uniforms u (B, N_UNIFORMS) in [0, 1), computed on the host (numpy).

    With ``as_numpy`` the fields are numpy arrays (what the step uploads; no torch ops), else CPU tensors.
    """
    b = u.shape[0]
    boxes = crop_boxes_from_uniforms(u[:, :_U_CROP], height, width, cfg.crop_area, cfg.crop_ratio)
    v = u[:, _U_CROP:]
    br, co, sa, hu = cfg.jitter
    lo = np.array([max(0.0, 1.0 - br), max(0.0, 1.0 - co), max(0.0, 1.0 - sa), -hu])
    hi = np.array([1.0 + br, 1.0 + co, 1.0 + sa, hu])
    factors = (lo + (hi - lo) * v[:, 2:6]).astype(np.float32)
    order = np.argsort(v[:, 6:10], axis=1, kind="stable")      # a uniform random permutation per row
    sigma = (cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * v[:, 12]).astype(np.float32)
    t = (lambda a: a) if as_numpy else torch.from_numpy
    return AugmentParams(boxes=t(boxes), flips=t(v[:, 0] < cfg.flip_p), jitter=t(v[:, 1] < cfg.jitter_p),
                         factors=t(factors), order=t(order.astype(np.int64)), gray=t(v[:, 10] < cfg.gray_p),
                         blur=t(v[:, 11] < cfg.blur_p), sigma=t(sigma.reshape(b)))


def sample_params(batch_size: int, height: int, width: int, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> AugmentParams:
    """Draw every random choice of a batch of views on the CPU (one ``torch.rand`` call).

    Args:
        batch_size: B.
        height, width: input frame size H, W.
        cfg: augmentation config (probabilities and ranges).
        generator: CPU generator for reproducible runs (None: torch's default generator).

    Returns:
        AugmentParams with CPU tensors.
    """
    return params_from_uniforms(_draw((batch_size, N_UNIFORMS), generator), height, width, cfg)


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()


def param_table(p: AugmentParams) -> np.ndarray:
    """(B, VIEW_COLS) float32 host table of one view's parameters (column layout: COL_* above)."""
    cols = [_np(p.boxes), _np(p.flips)[:, None], _np(p.jitter)[:, None], _np(p.factors),
            _np(p.order), _np(p.gray)[:, None], _np(p.blur)[:, None], _np(p.sigma)[:, None]]
    return np.concatenate([c.astype(np.float32) for c in cols], axis=1)


def subset_rows(p: AugmentParams) -> tuple[np.ndarray, dict]:
    """Rows of each op subset of one view, for the subset (kornia/torch) path.

    Returns:
        rows: (L,) int64, the concatenated row lists; spans: {key: (start, end)} into rows, keys
        ("jitter", slot, op) for slot, op in 0..3, "gray" and "blur".
    """
    jit, order = _np(p.jitter), _np(p.order)
    lists, spans, at = [], {}, 0
    keys = [("jitter", s, o) for s in range(4) for o in range(4)] + ["gray", "blur"]
    for key in keys:
        mask = jit & (order[:, key[1]] == key[2]) if isinstance(key, tuple) else _np(getattr(p, key))
        rows = np.flatnonzero(mask)
        lists.append(rows)
        spans[key] = (at, at + rows.size)
        at += rows.size
    return np.concatenate(lists).astype(np.int64), spans
