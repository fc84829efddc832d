"""RGB augmentation of one clip window on the device, from parameters already uploaded; backend dispatch.

Two implementations (``augment.backend``): "torch" (kornia's colour ops and blur on the subsets of clips
that draw each op; the reference, and the CPU path) and "triton" (``mscl_stream.kernels.augment_rgb``:
a few fused kernels over the whole batch with per-clip parameters; the CUDA default).

Order of operations per clip (MoCo v2 order, torchvision semantics):
    random resized crop (box shared by all T frames) + horizontal flip -> /255 -> colour jitter
    (p = jitter_p, one factor set and one random op order per clip) -> grayscale (p = gray_p) ->
    Gaussian blur (p = blur_p, one sigma per clip, in output pixels) -> ImageNet mean/std.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from mscl_stream.augment.params import (COL_BOX, COL_FACTORS, COL_FLIP, COL_SIGMA, IMAGENET_MEAN, IMAGENET_STD,
                                        AugmentParams, sample_params)
from mscl_stream.augment.upload import UploadedView, upload_views
from mscl_stream.config import AugmentConfig
from mscl_stream.errors import UserError
from mscl_stream.geometry import crop_resize


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


def _kornia():
    # imported where used: the fused (Triton) path runs on hosts without kornia
    import kornia
    return kornia


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma 0.299/0.587/0.114 (PIL's; torchvision's tensor path uses 0.2989 for R).
    return _kornia().color.rgb_to_grayscale(x)


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
    return _kornia().enhance.adjust_hue(x, f * (2.0 * math.pi)).clamp_(0.0, 1.0)  # hue: fraction -> radians


def _apply_on(x: torch.Tensor, rows: torch.Tensor, fn, *per_clip: torch.Tensor) -> None:
    """x[rows] = fn(frames of those clips, per-frame params), in place.

    rows: (n,) long on x's device (a slice of the uploaded index list: no host-device copy); per_clip:
    (B,) tensors on x's device, gathered and repeated over the T frames on the device.
    """
    n = rows.numel()
    if n == 0:
        return
    t = x.shape[1]
    sub = x.index_select(0, rows).flatten(0, 1)                               # (n*T, 3, S, S)
    args = [p.index_select(0, rows).view(n, 1).expand(n, t).reshape(n * t) for p in per_clip]
    x.index_copy_(0, rows, fn(sub, *args).view(n, t, *x.shape[2:]))


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # built once per device and dtype: a torch.tensor(..., device=cuda) per call is a blocking copy
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 1, 3, 1, 1).to(device)
    return mean, std


def augment_backend(backend: str, device: torch.device) -> str:
    """Resolve ``augment.backend``: auto = the fused Triton kernels on CUDA (when Triton imports), else torch.

    "triton" on CPU tensors needs TRITON_INTERPRET=1 (tests, the op-count proxy).
    """
    if backend not in ("auto", "torch", "triton"):
        raise UserError(f"augment.backend must be auto, torch or triton, got {backend!r}")
    from mscl_stream.kernels.augment_rgb import triton_available   # lazy: the kernel module imports triton
    if backend == "triton":
        if not triton_available():
            raise UserError("augment.backend=triton: triton does not import; use auto or torch")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("augment.backend=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter: "
                            "slow, for tests and op counts); use auto or torch")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def apply_uploaded(rgb: torch.Tensor, view: UploadedView, cfg: AugmentConfig, backend: str = "torch",
                   out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> AugmentedView:
    """Augment one window with parameters already on the device; no host-device copy, no host read.

    Args:
        rgb: (B, T, 3, H, W) uint8 frames of one window.
        view: from :func:`upload_views` (with subsets for the torch backend).
        cfg: augmentation config (out_size and blur range are read here).
        backend: "torch" (kornia per op subset; the reference and the CPU path) or "triton" (fused kernels
            over the whole batch with per-clip parameters).
        out_dtype, channels_last: the frames' dtype and memory format (the fused path writes them
            directly; the torch path converts at the end).

    Returns:
        AugmentedView with frames (B, 3, T, S, S) normalised, boxes (B, 4) and flips (B,) on the device.
    """
    if rgb.ndim != 5 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise UserError(f"augment: expected (B, T, 3, H, W) uint8 frames, got {rgb.dtype} {tuple(rgb.shape)}")
    b, t, _, h, w = rgb.shape
    if view.table.shape[0] != b:
        raise UserError(f"augment: parameters for {view.table.shape[0]} clips, frames for {b}")
    tab = view.table
    boxes, flips = tab[:, COL_BOX:COL_BOX + 4], tab[:, COL_FLIP] > 0.5
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if backend == "triton":
        from mscl_stream.kernels.augment_rgb import augment_rgb
        frames = augment_rgb(rgb, tab, cfg.out_size, blur_kernel_size(cfg), out_dtype, fmt)
        return AugmentedView(frames, boxes, flips)
    if backend != "torch":
        raise UserError(f"augment: backend must be 'torch' or 'triton', got {backend!r}")
    s, dev = cfg.out_size, rgb.device

    # Crop + flip while still 0..255 (a convex resampling), on T*3 channels so frames share the box.
    x = crop_resize(rgb.reshape(b, t * 3, h, w).float(), boxes, s, flips)
    x = x.view(b, t, 3, s, s).mul_(1.0 / 255.0)

    # Colour jitter in each clip's own op order; the subsets are known on the host, their rows were uploaded.
    span = view.spans

    def rows(key) -> torch.Tensor:
        lo, hi = span[key]
        return view.rows[lo:hi]

    for slot in range(4):
        for op in range(4):
            _apply_on(x, rows(("jitter", slot, op)), lambda v, f, op=op: _jitter_op(op, v, f),
                      tab[:, COL_FACTORS + op])
    _apply_on(x, rows("gray"), lambda v: _gray(v).expand(-1, 3, -1, -1))
    k = blur_kernel_size(cfg)
    # kornia's gaussian_blur2d with kernels built from the device sigmas: its (sigma > 0) check would read
    # a device sigma back (sigma > 0 holds by construction: augment.blur_sigma is validated)
    kf = _kornia().filters
    _apply_on(x, rows("blur"), lambda v, sg: kf.filter2d_separable(
        v, *(kf.get_gaussian_kernel1d(k, sg.view(-1, 1)),) * 2, "reflect"), tab[:, COL_SIGMA])

    mean, std = _mean_std(dev, x.dtype)
    frames = ((x - mean) / std).permute(0, 2, 1, 3, 4)                        # (B, 3, T, S, S)
    return AugmentedView(frames.to(out_dtype).contiguous(memory_format=fmt), boxes, flips)


def apply_params(rgb: torch.Tensor, params: AugmentParams, cfg: AugmentConfig,
                 backend: str = "auto") -> AugmentedView:
    """Apply drawn augmentation parameters to one window of clips on rgb's device (one upload).

    Args:
        rgb: (B, T, 3, H, W) uint8 frames of one window.
        params: from :func:`sample_params` (CPU tensors) for batch B.
        cfg: augmentation config (out_size and blur range are read here).
        backend: "auto" (fused kernels on CUDA), "torch" or "triton".

    Returns:
        AugmentedView with frames (B, 3, T, S, S) float32 normalised (contiguous), boxes (B, 4), flips (B,).
    """
    if rgb.ndim != 5 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise UserError(f"augment: expected (B, T, 3, H, W) uint8 frames, got {rgb.dtype} {tuple(rgb.shape)}")
    if params.boxes.shape[0] != rgb.shape[0]:
        raise UserError(f"augment: parameters for {params.boxes.shape[0]} clips, frames for {rgb.shape[0]}")
    backend = augment_backend(backend, rgb.device)
    (view,), _ = upload_views([params], None, rgb.device, subsets=backend == "torch")
    return apply_uploaded(rgb, view, cfg, backend)


def augment_view(rgb: torch.Tensor, cfg: AugmentConfig,
                 generator: torch.Generator | None = None) -> AugmentedView:
    """Augment one window of clips: draw per-clip parameters on the CPU, apply them on rgb's device.

    Args:
        rgb: (B, T, 3, H, W) uint8 frames of one window (any device).
        cfg: augmentation config (``cfg.backend`` picks the implementation).
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
    return apply_params(rgb, params, cfg, cfg.backend)
