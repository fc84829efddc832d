"""YUV 4:2:0 planes -> RGB at the working size, in torch, on whichever device holds the planes.

Geometry is the RGB decode path's (:func:`~mscl_stream.data.frame_sink.cover_crop`): resize to cover
(H, W) keeping the aspect ratio, bilinear and antialiased when downscaling, then a centre crop. Colour
is BT.601 (or BT.709) YUV -> RGB with bilinearly interpolated chroma, as FFmpeg's swscale gives with
``FULL_CHR_H_INT | ACCURATE_RND``: luma and chroma are each resampled straight to the covering size
(chroma from its own grid, sited as the decoder reports it: between two luma columns, or on the left
one as H.264/HEVC/MPEG-2/MPEG-4 place it by default), then converted per pixel. Resampling before
converting equals converting first (both are linear; only rounding differs) and converts only the
pixels kept by the crop.

The function only queues device work: no host reads, no synchronisation (the small chroma resampling
matrices are built once per size and device and kept).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.data.frame_sink import cover_crop

# (Kr, Kb) of each matrix; Kg = 1 - Kr - Kb
_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
_WEIGHTS: dict[tuple, torch.Tensor] = {}
_WEIGHTS_LOCK = threading.Lock()


def yuv_coefficients(matrix: str = "bt601", full_range: bool = False) -> tuple[float, float, float, float,
                                                                                  float, float, float]:
    """(luma offset o, luma scale s, vr, ug, vg, ub, chroma scale c) of the YUV -> RGB equations
    R = s (Y - o) + c vr (V - 128); G = s (Y - o) - c (ug (U - 128) + vg (V - 128)); B = s (Y - o) + c ub (U - 128)."""
    if matrix not in _MATRICES:
        raise ValueError(f"matrix {matrix!r}: one of {sorted(_MATRICES)}")
    kr, kb = _MATRICES[matrix]
    kg = 1.0 - kr - kb
    off, ys, cs = (0.0, 1.0, 1.0) if full_range else (16.0, 255.0 / 219.0, 255.0 / 224.0)
    return off, ys, 2 * (1 - kr), 2 * (1 - kb) * kb / kg, 2 * (1 - kr) * kr / kg, 2 * (1 - kb), cs


def resample_weights(n_in: int, n_out: int, shift: float = 0.0) -> np.ndarray:
    """(n_out, n_in) float64 rows of a bilinear resampler, antialiased when downscaling: output k reads
    the input around position c = (k + 0.5) n_in / n_out - 0.5 + ``shift`` (input pixel indices) with
    a triangle of half-width max(1, n_in / n_out), the part outside the input dropped and the rest
    renormalised (torch's antialiased ``interpolate`` and swscale's bilinear filter do the same)."""
    scale = n_in / n_out
    support = max(1.0, scale)
    c = (np.arange(n_out) + 0.5) * scale - 0.5 + shift
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - c[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def _weights(n_in: int, n_out: int, shift: float, rows: slice, device: torch.device) -> torch.Tensor:
    key = (n_in, n_out, shift, rows.start, rows.stop, str(device))
    with _WEIGHTS_LOCK:
        w = _WEIGHTS.get(key)
    if w is None:
        w = torch.from_numpy(resample_weights(n_in, n_out, shift)[rows]).float().to(device)
        with _WEIGHTS_LOCK:
            if len(_WEIGHTS) > 256:
                _WEIGHTS.clear()
            _WEIGHTS[key] = w
    return w


def yuv420_to_rgb_cover_crop(y: torch.Tensor, uv: torch.Tensor, out_hw: tuple[int, int] | None,
                             matrix: str = "bt601", full_range: bool = False,
                             chroma_left: bool = False) -> torch.Tensor:
    """Frames as 4:2:0 planes -> (N, H, W, 3) uint8 RGB covering ``out_hw``, centre-cropped.

    Args:
        y: (N, h, w) uint8 luma.
        uv: (N, 2, ceil(h / 2), ceil(w / 2)) uint8 chroma (U then V), on the same device.
        out_hw: (H, W) working size; None keeps (h, w).
        matrix: "bt601" (swscale's and DALI's default) or "bt709".
        full_range: JPEG range (Y and chroma over 0..255) instead of limited (Y 16..235, chroma 16..240).
        chroma_left: chroma samples sit on the even luma columns (MPEG-2 siting, H.264/HEVC's default)
            rather than between two columns (MPEG-1/JPEG/VP9 siting); vertically always between rows.
    """
    n, h, w = y.shape
    oh, ow = out_hw if out_hw is not None else (h, w)
    nh, nw, y0, x0 = cover_crop(h, w, oh, ow)
    rows, cols = slice(y0, y0 + oh), slice(x0, x0 + ow)
    luma = y[:, None].float()
    if (nh, nw) != (h, w):
        luma = F.interpolate(luma, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    luma = luma[:, 0, rows, cols]
    hc, wc = uv.shape[-2:]
    wy = _weights(hc, nh, 0.0, rows, uv.device)                        # (oh, hc)
    wx = _weights(wc, nw, 0.25 if chroma_left else 0.0, cols, uv.device)  # (ow, wc)
    chroma = wy @ uv.float() @ wx.T                                     # (N, 2, oh, ow)
    off, ys, vr, ug, vg, ub, cs = yuv_coefficients(matrix, full_range)
    lum = (luma - off) * ys
    u = (chroma[:, 0] - 128.0) * cs
    v = (chroma[:, 1] - 128.0) * cs
    rgb = torch.stack((lum + vr * v, lum - ug * u - vg * v, lum + ub * u), dim=-1)
    return rgb.add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
