"""Crop geometry shared by the RGB and flow views: boxes in pixel-edge coordinates, bilinear crop + resize.

A box is (x0, y0, x1, y1), relative to the H x W frame, in *pixel-edge* coordinates: the crop covers
columns x in [x0 * W, x1 * W) and rows y in [y0 * H, y1 * H), where pixel k spans [k, k + 1) and has its
centre at k + 0.5. Resampling is bilinear with ``align_corners=False`` semantics: output column j (of S)
samples the input at the continuous position X = W * (x0 + (j + 0.5) / S * (x1 - x0)), i.e. pixel-index
coordinate X - 0.5, between the 4 nearest pixel centres; positions past the outermost centres are
clamped to the edge pixel (``padding_mode="border"``). No antialiasing (crops are mild downscales).

The RGB view (``mscl_stream.augment``) and the flow view (``mscl_stream.motion.flow_views``) both crop
with :func:`crop_resize`, so a view's flow and frames align exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int],
                flips: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each sample to its relative box and resize it, bilinear, in one ``grid_sample`` call.

    Geometry (module doc): box edges are pixel edges; output pixel (i, j) of (h, w) samples the input at
    continuous (X, Y) = (W * (x0 + (j + 0.5) / w * (x1 - x0)), H * (y0 + (i + 0.5) / h * (y1 - y0))),
    i.e. pixel-index coordinates (X - 0.5, Y - 0.5), bilinear, clamped to the edge pixels. With
    ``flips[n]`` set, output column j takes the sample of column w - 1 - j (a horizontal flip of the
    crop); the values are not changed, so a flow field's u must be negated by the caller.
    All channels of a sample share its box: fold time into channels, e.g. (B, T*C, H, W), to give every
    frame of a clip the same crop.

    Args:
        x: (N, C, H, W) floating-point tensor.
        boxes: (N, 4) relative boxes (x0, y0, x1, y1), any device.
        size: output side S, or (h, w).
        flips: optional (N,) bool.

    Returns:
        (N, C, h, w) tensor of x's dtype and device.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise UserError(f"crop_resize: expected a floating (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    if boxes.shape != (n, 4):
        raise UserError(f"crop_resize: boxes must be ({n}, 4), got {tuple(boxes.shape)}")
    if flips is not None and flips.shape != (n,):
        raise UserError(f"crop_resize: flips must be ({n},), got {tuple(flips.shape)}")
    oh, ow = (size, size) if isinstance(size, int) else size
    # grid_sample wants float coordinates of x's dtype (half-precision grids lose whole pixels).
    gdt = x.dtype if x.dtype == torch.float64 else torch.float32
    bx = boxes.to(device=x.device, dtype=gdt)
    tx = (torch.arange(ow, device=x.device, dtype=gdt) + 0.5) / ow          # (w,) in (0, 1)
    ty = (torch.arange(oh, device=x.device, dtype=gdt) + 0.5) / oh
    tx = tx.expand(n, ow)
    if flips is not None:
        tx = torch.where(flips.to(x.device).view(n, 1), 1.0 - tx, tx)
    gx = bx[:, 0:1] + tx * (bx[:, 2:3] - bx[:, 0:1])                         # (N, w) relative
    gy = bx[:, 1:2] + ty * (bx[:, 3:4] - bx[:, 1:2])                         # (N, h)
    # align_corners=False: normalised -1 / +1 are the outer pixel edges, so g = 2 * relative - 1.
    grid = torch.stack(torch.broadcast_tensors(gx.view(n, 1, ow), gy.view(n, oh, 1)), dim=-1) * 2 - 1
    out = F.grid_sample(x if x.dtype == gdt else x.to(gdt), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.to(x.dtype)
