"""On-device RGB augmentation of one clip window, with one parameter set per clip.

Every random choice is drawn on the CPU (from an optional ``torch.Generator``) by :func:`sample_params`,
then :func:`apply_params` runs the pixel work on whatever device the frames are on. The split keeps runs
reproducible, keeps the device free of host syncs (which clips get which op is known on the host), and
lets the flow side reuse exactly the same crop box and flip of a view.

Order of operations per clip (MoCo v2 order, torchvision semantics):
    random resized crop (box shared by all T frames) + horizontal flip -> /255 -> colour jitter
    (p = jitter_p, one factor set and one random op order per clip) -> grayscale (p = gray_p) ->
    Gaussian blur (p = blur_p, one sigma per clip, in output pixels) -> ImageNet mean/std.

Crop geometry (shared with the flow side through :func:`crop_resize`):
    A box is (x0, y0, x1, y1), relative to the H x W frame, in *pixel-edge* coordinates: the crop
    covers columns x in [x0 * W, x1 * W) and rows y in [y0 * H, y1 * H), where pixel k spans [k, k + 1)
    and has its centre at k + 0.5. :func:`sample_params` returns boxes whose edges sit on pixel
    boundaries (integer multiples of 1/W, 1/H) of the frame size it was given. Resampling is bilinear
    with ``align_corners=False`` semantics: output column j (of S) samples the input at the continuous
    position X = W * (x0 + (j + 0.5) / S * (x1 - x0)), i.e. pixel-index coordinate X - 0.5, between
    the 4 nearest pixel centres; positions past the outermost centres are clamped to the edge pixel
    (``padding_mode="border"``). No antialiasing (crops are at most ~1.6x downscales here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

from mscl_stream.config import AugmentConfig
from mscl_stream.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop before its centre-crop fallback


@dataclass
class AugmentParams:
    """The random choices of one batch of views (CPU tensors; B = batch).

    Attributes:
        boxes: (B, 4) float32 relative crop boxes (x0, y0, x1, y1), pixel-edge convention (module doc).
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


@dataclass
class AugmentedView:
    """One augmented view of a batch of clips, ready for R3D-18.

    Attributes:
        frames: (B, 3, T, S, S) float32, ImageNet-normalised, on the input's device.
        boxes: (B, 4) float32 relative crop boxes (x0, y0, x1, y1) of the H x W input frames, on the
            input's device: pass them to :func:`crop_resize` to crop this view's flow identically.
        flips: (B,) bool on the input's device: flip the flow too (and negate its u component).
    """

    frames: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor


def blur_kernel_size(cfg: AugmentConfig) -> int:
    """Odd Gaussian kernel size covering +-3 sigma of the largest sigma, capped below the output size."""
    k = 2 * math.ceil(3.0 * cfg.blur_sigma[1]) + 1
    return max(1, min(k, 2 * ((cfg.out_size - 1) // 2) + 1))  # reflect padding needs k // 2 < S


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


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
        (B, 4) float32 relative boxes (x0, y0, x1, y1) with edges on pixel boundaries.
    """
    b, n = batch_size, _CROP_ATTEMPTS
    scale = _uniform((b, n), area[0], area[1], generator) * (height * width)
    aspect = torch.exp(_uniform((b, n), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(scale * aspect))
    h = torch.round(torch.sqrt(scale / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)        # first fitting attempt per row
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u = torch.rand((b, 2), generator=generator, dtype=torch.float64)
    i = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    j = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)

    # Fallback for rows where nothing fitted: centred crop, aspect clamped into the range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    miss = ~ok.any(dim=1)
    w = torch.where(miss, float(fw), w)
    h = torch.where(miss, float(fh), h)
    i = torch.where(miss, float((height - fh) // 2), i)
    j = torch.where(miss, float((width - fw) // 2), j)
    return torch.stack([j / width, i / height, (j + w) / width, (i + h) / height], dim=1).float()


def sample_params(batch_size: int, height: int, width: int, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> AugmentParams:
    """Draw every random choice of a batch of views on the CPU.

    Args:
        batch_size: B.
        height, width: input frame size H, W.
        cfg: augmentation config (probabilities and ranges).
        generator: CPU generator for reproducible runs (None: torch's default generator).

    Returns:
        AugmentParams with CPU tensors.
    """
    if generator is not None and generator.device.type != "cpu":
        raise UserError(f"augment: the generator must live on the CPU, got one on {generator.device}")
    g, b = generator, batch_size
    boxes = sample_crop_boxes(b, height, width, cfg.crop_area, cfg.crop_ratio, g)
    flips = torch.rand(b, generator=g) < cfg.flip_p
    jitter = torch.rand(b, generator=g) < cfg.jitter_p
    br, co, sa, hu = cfg.jitter
    factors = torch.stack([_uniform((b,), max(0.0, 1.0 - br), 1.0 + br, g),
                           _uniform((b,), max(0.0, 1.0 - co), 1.0 + co, g),
                           _uniform((b,), max(0.0, 1.0 - sa), 1.0 + sa, g),
                           _uniform((b,), -hu, hu, g)], dim=1).float()
    order = torch.argsort(torch.rand((b, 4), generator=g), dim=1)  # a uniform random permutation per row
    gray = torch.rand(b, generator=g) < cfg.gray_p
    blur = torch.rand(b, generator=g) < cfg.blur_p
    sigma = _uniform((b,), cfg.blur_sigma[0], cfg.blur_sigma[1], g).float()
    return AugmentParams(boxes, flips, jitter, factors, order, gray, blur, sigma)


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


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma 0.299/0.587/0.114 (PIL's; torchvision's tensor path uses 0.2989 for R).
    return kornia.color.rgb_to_grayscale(x)


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One torchvision-semantics colour op on (N, 3, S, S) in [0, 1] with per-image factor f (N,)."""
    fv = f.view(-1, 1, 1, 1)
    if op == 0:    # brightness: multiplicative (blend with black)
        return (x * fv).clamp_(0.0, 1.0)
    if op == 1:    # contrast: blend with the frame's mean gray level
        mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return (fv * x + (1.0 - fv) * mean).clamp_(0.0, 1.0)
    if op == 2:    # saturation: blend with the grayscale image
        return (fv * x + (1.0 - fv) * _gray(x)).clamp_(0.0, 1.0)
    return kornia.enhance.adjust_hue(x, f * (2.0 * math.pi)).clamp_(0.0, 1.0)  # hue: fraction -> radians


def _apply_on(x: torch.Tensor, rows: torch.Tensor, fn, *per_clip: torch.Tensor) -> None:
    """x[rows] = fn(frames of those clips, per-frame params), in place; rows is a CPU index (n,)."""
    if rows.numel() == 0:
        return
    b, t = x.shape[:2]
    idx = rows.to(x.device)
    sub = x.index_select(0, idx).flatten(0, 1)                               # (n*T, 3, S, S)
    args = [p.index_select(0, rows).repeat_interleave(t, dim=0).to(x.device) for p in per_clip]
    x.index_copy_(0, idx, fn(sub, *args).view(rows.numel(), t, *x.shape[2:]))


def apply_params(rgb: torch.Tensor, params: AugmentParams, cfg: AugmentConfig) -> AugmentedView:
    """Apply drawn augmentation parameters to one window of clips on rgb's device.

    Args:
        rgb: (B, T, 3, H, W) uint8 frames of one window.
        params: from :func:`sample_params` (CPU tensors) for batch B.
        cfg: augmentation config (out_size and blur range are read here).

    Returns:
        AugmentedView with frames (B, 3, T, S, S) float32 normalised, boxes (B, 4), flips (B,).
    """
    if rgb.ndim != 5 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise UserError(f"augment: expected (B, T, 3, H, W) uint8 frames, got {rgb.dtype} {tuple(rgb.shape)}")
    b, t, _, h, w = rgb.shape
    if params.boxes.shape[0] != b:
        raise UserError(f"augment: parameters for {params.boxes.shape[0]} clips, frames for {b}")
    s, dev = cfg.out_size, rgb.device

    # Crop + flip while still 0..255 (a convex resampling), on T*3 channels so frames share the box.
    x = crop_resize(rgb.reshape(b, t * 3, h, w).float(), params.boxes, s, params.flips)
    x = x.view(b, t, 3, s, s).mul_(1.0 / 255.0)

    # Colour jitter in each clip's own op order; clip subsets are known on the host (no device sync).
    for slot in range(4):
        for op in range(4):
            rows = torch.nonzero(params.jitter & (params.order[:, slot] == op)).flatten()
            _apply_on(x, rows, lambda v, f, op=op: _jitter_op(op, v, f), params.factors[:, op])
    _apply_on(x, torch.nonzero(params.gray).flatten(), lambda v: _gray(v).expand(-1, 3, -1, -1))
    k = blur_kernel_size(cfg)
    _apply_on(x, torch.nonzero(params.blur).flatten(),
              lambda v, sg: kornia.filters.gaussian_blur2d(v, (k, k), torch.stack([sg, sg], 1), "reflect"),
              params.sigma)

    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 1, 3, 1, 1)
    frames = ((x - mean) / std).permute(0, 2, 1, 3, 4).contiguous()          # (B, 3, T, S, S)
    return AugmentedView(frames, params.boxes.to(dev), params.flips.to(dev))


def augment_view(rgb: torch.Tensor, cfg: AugmentConfig,
                 generator: torch.Generator | None = None) -> AugmentedView:
    """Augment one window of clips: draw per-clip parameters on the CPU, apply them on rgb's device.

    Args:
        rgb: (B, T, 3, H, W) uint8 frames of one window (any device).
        cfg: augmentation config.
        generator: CPU ``torch.Generator`` for reproducible draws (None: torch's default generator).

    Returns:
        AugmentedView: frames (B, 3, T, S, S) float32 normalised, boxes (B, 4) float32 relative
        (x0, y0, x1, y1) crop boxes of the H x W frames, flips (B,) bool; all on rgb's device.
        Crop this view's flow with ``crop_resize(flow, view.boxes, S, view.flips)`` and negate u
        where flipped.
    """
    if rgb.ndim != 5:
        raise UserError(f"augment: expected (B, T, 3, H, W) uint8 frames, got {rgb.dtype} {tuple(rgb.shape)}")
    params = sample_params(rgb.shape[0], rgb.shape[3], rgb.shape[4], cfg, generator)
    return apply_params(rgb, params, cfg)
