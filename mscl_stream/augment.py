"""On-device RGB augmentation of one clip window, with one parameter set per clip.

Every random choice is drawn on the CPU (one ``torch.rand`` call on an optional ``torch.Generator``,
then numpy) by :func:`sample_params`; :func:`upload_views` sends all parameters of a step to the device
as ONE float32 table (pinned, ``non_blocking`` on CUDA); :func:`apply_uploaded` runs the pixel work on
whatever device the frames are on, reading nothing back. The split keeps runs reproducible, keeps the
host from waiting on the device, and lets the flow side reuse exactly the same crop box and flip of a view.

Two implementations (``augment.backend``): "torch" (kornia's colour ops and blur on the subsets of clips
that draw each op; the reference, and the CPU path) and "triton" (``mscl_stream.kernels.augment_rgb``:
a few fused kernels over the whole batch with per-clip parameters; the CUDA default).

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

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


def upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host array to the device as ONE copy: pinned host memory and ``non_blocking`` on CUDA (no sync).

    The pinned block is returned to PyTorch's caching host allocator only after the copy has run, so it
    is never overwritten in flight.
    """
    host = np.ascontiguousarray(host, dtype=np.float32)
    if device.type == "cuda":
        src = torch.empty(host.shape, dtype=torch.float32, pin_memory=True)
        src.numpy()[...] = host
    else:
        src = torch.from_numpy(host)
    return torch.empty(host.shape, dtype=torch.float32, device=device).copy_(src, non_blocking=True)


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
    from mscl_stream.kernels.augment_rgb import triton_available   # lazy: kernels import this module
    if backend == "triton":
        if not triton_available():
            raise UserError("augment.backend=triton: triton does not import; use auto or torch")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("augment.backend=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter: "
                            "slow, for tests and op counts); use auto or torch")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_available() else "torch"


@dataclass
class UploadedView:
    """One view's parameters on the device (see :func:`upload_views`).

    table: (B, VIEW_COLS) float32 device view of the uploaded parameter table; rows / spans: the subset
    row lists (device long) and their host-side (start, end) spans (torch path only, else None).
    """

    table: torch.Tensor
    rows: torch.Tensor | None
    spans: dict | None


def upload_views(params: list[AugmentParams], extra: np.ndarray | None, device: torch.device,
                 subsets: bool) -> tuple[list[UploadedView], torch.Tensor | None]:
    """Every view's parameters (and ``extra`` (B,) per-clip values, e.g. FRA angles) in ONE upload.

    Layout of the uploaded float32 buffer: the (B, V * VIEW_COLS [+ 1]) table, then with ``subsets``
    the row lists of every view (exact as float32 below 2**24).

    Returns:
        one UploadedView per view, and ``extra`` as a (B,) device view (None without it).
    """
    b = params[0].boxes.shape[0]
    cols = [param_table(p) for p in params] + ([extra.reshape(b, 1).astype(np.float32)] if extra is not None else [])
    table = np.concatenate(cols, axis=1)
    parts, row_info = [table.ravel()], []
    if subsets:
        at = table.size
        for p in params:
            rows, spans = subset_rows(p)
            parts.append(rows.astype(np.float32))
            row_info.append((at, at + rows.size, spans))
            at += rows.size
    buf = upload(np.concatenate(parts), device)
    dev_table = buf[:table.size].view(b, table.shape[1])
    views = []
    for v, p in enumerate(params):
        rows = spans = None
        if subsets:
            lo, hi, spans = row_info[v]
            rows = buf[lo:hi].long()
        views.append(UploadedView(dev_table[:, v * VIEW_COLS:(v + 1) * VIEW_COLS], rows, spans))
    return views, (dev_table[:, -1] if extra is not None else None)


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
