"""Fused RGB view augmentation: crop + resize + flip, colour jitter, grayscale, blur, normalise.

Three Triton kernels over the whole batch, one parameter row per clip (``mscl_stream.augment.params``'s
table, columns ``COL_*``), every clip's choices applied by masks and uniform per-program branches (no subsets,
no host reads, static shapes so the launches can sit in a CUDA graph):

1. ``_chain_kernel``, one program per frame (clip b, frame t): bilinear crop of the uint8 frame
   (pixel-edge boxes, ``align_corners=False``, border clamp; flip mirrors the sampled columns), /255,
   the four jitter ops in the clip's own order (brightness, contrast against the frame's mean luma,
   saturation, kornia's HSV hue shift; each clamped to [0, 1]), grayscale; writes a float32 (B*T, 3, S, S)
   scratch. The contrast mean needs the whole frame first: a first pass over the frame recomputes the
   chain up to the contrast op and sums the luma.
2. ``_blur_kernel`` (rows), Gaussian with the clip's sigma, kornia's kernel (exp(-x^2 / 2 sigma^2) over
   K taps, normalised) and ``reflect`` border; clips without blur get a unit impulse.
3. ``_blur_kernel`` (columns) + ImageNet normalisation, stored in the output's dtype and strides
   ((B, 3, T, S, S), contiguous or channels_last_3d).

``augment_rgb_reference`` is the same computation in torch over the whole batch (masked, no subsets);
``mscl_stream.augment.apply_uploaded(..., backend="torch")`` (kornia on subsets) is the independent
reference the parity tests compare both against.
"""

from __future__ import annotations

import math

import torch

from mscl_stream.augment.params import (COL_BLUR, COL_BOX, COL_FACTORS, COL_FLIP, COL_GRAY, COL_JITTER, COL_ORDER,
                                        COL_SIGMA, IMAGENET_MEAN, IMAGENET_STD, VIEW_COLS)
from mscl_stream.errors import UserError
from mscl_stream.geometry import crop_resize

try:   # Triton is optional: without it (or without CUDA) the torch paths run
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - depends on the install
    triton = None

_BLOCK = 1024
_GRAY = (0.299, 0.587, 0.114)       # kornia.color.rgb_to_grayscale (ITU-R 601)


def triton_available() -> bool:
    """True when Triton imports (a CUDA device, or TRITON_INTERPRET=1, is still needed to run)."""
    return triton is not None


def _check(rgb: torch.Tensor, table: torch.Tensor) -> None:
    if rgb.ndim != 5 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise UserError(f"augment_rgb: expected (B, T, 3, H, W) uint8 frames, got {rgb.dtype} {tuple(rgb.shape)}")
    if table.ndim != 2 or table.shape[0] != rgb.shape[0] or table.shape[1] < VIEW_COLS or table.stride(1) != 1:
        raise UserError(f"augment_rgb: table must be ({rgb.shape[0]}, >= {VIEW_COLS}) with unit column stride, "
                        f"got {tuple(table.shape)}")


if triton is not None:

    @triton.jit
    def _hue(r, g, b, shift, TWO_PI: tl.constexpr):
        # kornia.enhance.adjust_hue: rgb_to_hsv -> h + shift mod 2 pi -> hsv_to_rgb (kornia 0.9 formulas)
        mx = tl.maximum(tl.maximum(r, g), b)
        mn = tl.minimum(tl.minimum(r, g), b)
        dc = mx - mn
        v = mx
        s = dc / tl.where(mx == 0, 1.0, mx + 1e-8)
        dc = tl.where(dc == 0, 1.0, dc)
        rc = mx - r
        gc = mx - g
        bc = mx - b
        h1 = bc - gc
        h2 = (rc - bc) + 2.0 * dc
        h3 = (gc - rc) + 4.0 * dc
        h = tl.where((r >= g) & (r >= b), h1, tl.where(g >= b, h2, h3))
        h = h / dc
        h = h / 6.0
        h = h - tl.floor(h)                                   # % 1.0 (floor mod, as torch)
        h = TWO_PI * h
        h = tl.where(h >= TWO_PI, 0.0, h)
        h = h + shift
        h = h - tl.floor(h / TWO_PI) * TWO_PI                 # torch.remainder
        h = tl.where(h >= TWO_PI, 0.0, h)
        h6 = (h / TWO_PI) * 6.0
        hi = tl.floor(h6) - tl.floor(tl.floor(h6) / 6.0) * 6.0
        f = (h6 - tl.floor(h6 / 6.0) * 6.0) - hi
        p = v * (1.0 - s)
        q = v * (1.0 - f * s)
        t = v * (1.0 - (1.0 - f) * s)
        hi = tl.minimum(tl.maximum(hi, 0.0), 5.0)
        ro = tl.where(hi == 0, v, tl.where(hi == 1, q, tl.where(hi == 2, p, tl.where(hi == 3, p,
                      tl.where(hi == 4, t, v)))))
        go = tl.where(hi == 0, t, tl.where(hi == 1, v, tl.where(hi == 2, v, tl.where(hi == 3, q,
                      tl.where(hi == 4, p, p)))))
        bo = tl.where(hi == 0, p, tl.where(hi == 1, p, tl.where(hi == 2, t, tl.where(hi == 3, v,
                      tl.where(hi == 4, v, q)))))
        return ro, go, bo

    @triton.jit
    def _clamp01(x):
        return tl.minimum(tl.maximum(x, 0.0), 1.0)

    @triton.jit
    def _jitter_op(r, g, b, op, f, mean, GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr,
                   TWO_PI: tl.constexpr):
        # op: 0 brightness, 1 contrast (mean = frame's mean luma), 2 saturation, 3 hue (f in turns)
        if op == 0:
            r = _clamp01(r * f)
            g = _clamp01(g * f)
            b = _clamp01(b * f)
        elif op == 1:
            r = _clamp01(f * r + (1.0 - f) * mean)
            g = _clamp01(f * g + (1.0 - f) * mean)
            b = _clamp01(f * b + (1.0 - f) * mean)
        elif op == 2:
            y = GR * r + GG * g + GB * b
            r = _clamp01(f * r + (1.0 - f) * y)
            g = _clamp01(f * g + (1.0 - f) * y)
            b = _clamp01(f * b + (1.0 - f) * y)
        else:
            r, g, b = _hue(r, g, b, f * TWO_PI, TWO_PI)
            r = _clamp01(r)
            g = _clamp01(g)
            b = _clamp01(b)
        return r, g, b

    @triton.jit
    def crop_bilinear(src, pix, mask, x0, y0, x1, y1, flip, H, W, S):
        # bilinear sample of one uint8 channel plane at output pixels pix (i * S + j), as crop_resize
        i = pix // S
        j = pix - i * S
        jj = tl.where(flip, S - 1 - j, j)
        gx = x0 + (jj.to(tl.float32) + 0.5) / S * (x1 - x0)
        gy = y0 + (i.to(tl.float32) + 0.5) / S * (y1 - y0)
        ix = tl.minimum(tl.maximum(gx * W - 0.5, 0.0), W - 1.0)
        iy = tl.minimum(tl.maximum(gy * H - 0.5, 0.0), H - 1.0)
        fx0 = tl.floor(ix)
        fy0 = tl.floor(iy)
        wx = ix - fx0
        wy = iy - fy0
        cx0 = fx0.to(tl.int32)
        cy0 = fy0.to(tl.int32)
        cx1 = tl.minimum(cx0 + 1, W - 1)
        cy1 = tl.minimum(cy0 + 1, H - 1)
        v00 = tl.load(src + cy0 * W + cx0, mask=mask, other=0).to(tl.float32)
        v01 = tl.load(src + cy0 * W + cx1, mask=mask, other=0).to(tl.float32)
        v10 = tl.load(src + cy1 * W + cx0, mask=mask, other=0).to(tl.float32)
        v11 = tl.load(src + cy1 * W + cx1, mask=mask, other=0).to(tl.float32)
        top = v00 * (1.0 - wx) + v01 * wx
        bot = v10 * (1.0 - wx) + v11 * wx
        return top * (1.0 - wy) + bot * wy

    @triton.jit
    def _chain_kernel(rgb_ptr, tab_ptr, tab_stride, mid_ptr, T, H, W, S,
                      C_BOX: tl.constexpr, C_FLIP: tl.constexpr, C_JIT: tl.constexpr, C_FAC: tl.constexpr,
                      C_ORD: tl.constexpr, C_GRAY: tl.constexpr,
                      GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr, TWO_PI: tl.constexpr,
                      BLOCK: tl.constexpr):
        frame = tl.program_id(0).to(tl.int64)                # b * T + t
        clip = frame // T
        row = tab_ptr + clip * tab_stride
        x0 = tl.load(row + C_BOX)
        y0 = tl.load(row + C_BOX + 1)
        x1 = tl.load(row + C_BOX + 2)
        y1 = tl.load(row + C_BOX + 3)
        flip = tl.load(row + C_FLIP) > 0.5
        jit = tl.load(row + C_JIT) > 0.5
        gray = tl.load(row + C_GRAY) > 0.5
        o0 = tl.load(row + C_ORD).to(tl.int32)
        o1 = tl.load(row + C_ORD + 1).to(tl.int32)
        o2 = tl.load(row + C_ORD + 2).to(tl.int32)
        o3 = tl.load(row + C_ORD + 3).to(tl.int32)
        # slot of the contrast op (4 = none): the chain before it feeds the frame's mean luma
        cslot = tl.where(o0 == 1, 0, tl.where(o1 == 1, 1, tl.where(o2 == 1, 2, tl.where(o3 == 1, 3, 4))))
        cslot = tl.where(jit, cslot, 4)
        hw = H * W
        src = rgb_ptr + frame * 3 * hw
        SS = S * S
        mean = x0 * 0.0                                       # an fp32 scalar in both branches (compiled if)
        if cslot < 4:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, SS, BLOCK):
                pix = start + tl.arange(0, BLOCK)
                mask = pix < SS
                r = crop_bilinear(src, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
                g = crop_bilinear(src + hw, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
                b = crop_bilinear(src + 2 * hw, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
                for slot in tl.static_range(4):
                    if slot < cslot:
                        op = tl.where(slot == 0, o0, tl.where(slot == 1, o1, tl.where(slot == 2, o2, o3)))
                        f = tl.load(row + C_FAC + op)
                        r, g, b = _jitter_op(r, g, b, op, f, 0.0, GR, GG, GB, TWO_PI)
                acc += tl.where(mask, GR * r + GG * g + GB * b, 0.0)
            mean = tl.sum(acc, axis=0) / SS
        dst = mid_ptr + frame * 3 * SS
        for start in range(0, SS, BLOCK):
            pix = start + tl.arange(0, BLOCK)
            mask = pix < SS
            r = crop_bilinear(src, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
            g = crop_bilinear(src + hw, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
            b = crop_bilinear(src + 2 * hw, pix, mask, x0, y0, x1, y1, flip, H, W, S) / 255.0
            if jit:
                for slot in tl.static_range(4):
                    op = tl.where(slot == 0, o0, tl.where(slot == 1, o1, tl.where(slot == 2, o2, o3)))
                    f = tl.load(row + C_FAC + op)
                    r, g, b = _jitter_op(r, g, b, op, f, mean, GR, GG, GB, TWO_PI)
            if gray:
                y = GR * r + GG * g + GB * b
                r = y
                g = y
                b = y
            tl.store(dst + pix, r, mask=mask)
            tl.store(dst + SS + pix, g, mask=mask)
            tl.store(dst + 2 * SS + pix, b, mask=mask)

    @triton.jit
    def _blur_kernel(src_ptr, tab_ptr, tab_stride, out_ptr, T, S,
                     o_b, o_c, o_t, o_h, o_w, m0, m1, m2, s0, s1, s2,
                     C_BLUR: tl.constexpr, C_SIGMA: tl.constexpr, K: tl.constexpr, VERTICAL: tl.constexpr,
                     NORMALISE: tl.constexpr, BLOCK: tl.constexpr):
        # 1-D Gaussian along rows (VERTICAL=False) or columns of every channel of frame (b, t), reflect border.
        frame = tl.program_id(0).to(tl.int64)
        clip = frame // T
        t = frame - clip * T
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        SS = S * S
        mask = pix < SS
        i = pix // S
        j = pix - i * S
        row = tab_ptr + clip * tab_stride
        blur = tl.load(row + C_BLUR) > 0.5
        sigma = tl.load(row + C_SIGMA)
        C: tl.constexpr = K // 2
        # kornia's kernel: exp(-x^2 / (2 sigma^2)) over x = -C..C, normalised; a unit impulse without blur
        norm = 0.0
        for k in tl.static_range(K):
            norm += tl.exp(-((k - C) * (k - C)) / (2.0 * sigma * sigma))
        src = src_ptr + frame * 3 * SS
        for c in tl.static_range(3):
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            if blur:
                for k in tl.static_range(K):
                    wk = tl.exp(-((k - C) * (k - C)) / (2.0 * sigma * sigma)) / norm
                    if VERTICAL:
                        q = i + (k - C)
                    else:
                        q = j + (k - C)
                    q = tl.where(q < 0, -q, q)
                    q = tl.where(q > S - 1, 2 * (S - 1) - q, q)
                    if VERTICAL:
                        off = q * S + j
                    else:
                        off = i * S + q
                    acc += wk * tl.load(src + c * SS + off, mask=mask, other=0.0)
            else:
                acc = tl.load(src + c * SS + pix, mask=mask, other=0.0)
            if NORMALISE:
                m = tl.where(c == 0, m0, tl.where(c == 1, m1, m2))
                sd = tl.where(c == 0, s0, tl.where(c == 1, s1, s2))
                acc = (acc - m) / sd
                dst = out_ptr + clip * o_b + c * o_c + t * o_t + i * o_h + j * o_w
            else:
                dst = out_ptr + frame * 3 * SS + c * SS + pix
            tl.store(dst, acc, mask=mask)


def augment_rgb(rgb: torch.Tensor, table: torch.Tensor, out_size: int, blur_k: int,
                out_dtype: torch.dtype = torch.float32,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Fused augmentation of one window (Triton: CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Args:
        rgb: (B, T, 3, H, W) uint8 frames.
        table: (B, >= VIEW_COLS) float32 per-clip parameters on rgb's device (``mscl_stream.augment``'s
            column layout; a column slice of a wider table is fine).
        out_size: S. blur_k: the Gaussian's odd tap count (``augment.blur_kernel_size``), below S.
        out_dtype, memory_format: of the result (the model's input dtype and layout).

    Returns:
        (B, 3, T, S, S) ImageNet-normalised frames.
    """
    if triton is None:
        raise UserError("augment_rgb: the fused kernels need triton, which does not import")
    _check(rgb, table)
    rgb = rgb.contiguous()
    table = table.float()
    b, t, _, h, w = rgb.shape
    s = out_size
    mid = torch.empty((b * t, 3, s, s), device=rgb.device, dtype=torch.float32)
    tmp = torch.empty_like(mid)
    out = torch.empty((b, 3, t, s, s), device=rgb.device, dtype=out_dtype, memory_format=memory_format)
    ts = table.stride(0)
    _chain_kernel[(b * t,)](rgb, table, ts, mid, t, h, w, s,
                            C_BOX=COL_BOX, C_FLIP=COL_FLIP, C_JIT=COL_JITTER, C_FAC=COL_FACTORS, C_ORD=COL_ORDER,
                            C_GRAY=COL_GRAY, GR=_GRAY[0], GG=_GRAY[1], GB=_GRAY[2], TWO_PI=2 * math.pi,
                            BLOCK=_BLOCK)
    grid = (b * t, triton.cdiv(s * s, _BLOCK))
    m, sd = IMAGENET_MEAN, IMAGENET_STD
    _blur_kernel[grid](mid, table, ts, tmp, t, s, 0, 0, 0, 0, 0, *m, *sd,
                       C_BLUR=COL_BLUR, C_SIGMA=COL_SIGMA, K=blur_k, VERTICAL=False, NORMALISE=False, BLOCK=_BLOCK)
    _blur_kernel[grid](tmp, table, ts, out, t, s, *out.stride(), *m, *sd,
                       C_BLUR=COL_BLUR, C_SIGMA=COL_SIGMA, K=blur_k, VERTICAL=True, NORMALISE=True, BLOCK=_BLOCK)
    return out


def augment_rgb_reference(rgb: torch.Tensor, table: torch.Tensor, out_size: int, blur_k: int,
                          out_dtype: torch.dtype = torch.float32,
                          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The fused kernels' computation in torch over the whole batch (masks, no subsets). Args as :func:`augment_rgb`."""
    _check(rgb, table)
    b, t, _, h, w = rgb.shape
    s = out_size
    tab = table.float()
    x = crop_resize(rgb.reshape(b, t * 3, h, w).float(), tab[:, COL_BOX:COL_BOX + 4], s, tab[:, COL_FLIP] > 0.5)
    x = (x / 255.0).view(b, t, 3, s, s)
    r, g, bl = x.unbind(2)

    def per(col: torch.Tensor) -> torch.Tensor:
        return col.view(b, 1, 1, 1)

    jit = per(tab[:, COL_JITTER] > 0.5)
    order = tab[:, COL_ORDER:COL_ORDER + 4].long()
    for slot in range(4):
        op = order[:, slot]
        f = per(tab.gather(1, (COL_FACTORS + op).view(b, 1)).view(b))
        y = _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * bl
        mean = y.mean(dim=(-2, -1), keepdim=True)
        cands = [[(c * f).clamp(0, 1) for c in (r, g, bl)],
                 [(f * c + (1 - f) * mean).clamp(0, 1) for c in (r, g, bl)],
                 [(f * c + (1 - f) * y).clamp(0, 1) for c in (r, g, bl)],
                 [c.clamp(0, 1) for c in _hue_torch(r, g, bl, f * (2 * math.pi))]]
        sel = [torch.where(jit & per(op == k), 1.0, 0.0) for k in range(4)]
        keep = 1 - sum(sel)
        r, g, bl = [sum(sel[k] * cands[k][c] for k in range(4)) + keep * old for c, old in enumerate((r, g, bl))]
    gray = per(tab[:, COL_GRAY] > 0.5)
    y = _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * bl
    x = torch.stack([torch.where(gray, y, c) for c in (r, g, bl)], 2)           # (B, T, 3, S, S)

    # separable Gaussian, kornia's kernel, reflect border; impulse where a clip has no blur
    c = blur_k // 2
    sig = tab[:, COL_SIGMA].view(b, 1)
    wts = torch.exp(-(torch.arange(blur_k, device=x.device, dtype=torch.float32) - c) ** 2 / (2 * sig * sig))
    wts = wts / wts.sum(1, keepdim=True)
    impulse = (torch.arange(blur_k, device=x.device) == c).float().expand(b, blur_k)
    wts = torch.where(tab[:, COL_BLUR].view(b, 1) > 0.5, wts, impulse)            # (B, K)
    xp = torch.nn.functional.pad(x.reshape(b, t * 3, s, s), (c, c, c, c), mode="reflect")
    win = xp.unfold(3, blur_k, 1)                                                  # (B, T*3, S+2c, S, K)
    x = (win * wts.view(b, 1, 1, 1, blur_k)).sum(-1)
    win = x.unfold(2, blur_k, 1)                                                   # (B, T*3, S, S, K)
    x = (win * wts.view(b, 1, 1, 1, blur_k)).sum(-1).view(b, t, 3, s, s)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 1, 3, 1, 1)
    return ((x - mean) / std).permute(0, 2, 1, 3, 4).to(dtype=out_dtype, memory_format=memory_format)


def _hue_torch(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, shift: torch.Tensor):
    # kornia's hue shift on (B, T, S, S) planes, shift (B, 1, 1, 1) radians
    import kornia
    x = torch.stack([r, g, b], -3)                                   # (B, T, 3, S, S)
    sh = shift.expand(r.shape[:2] + (1, 1)).reshape(-1)
    return kornia.enhance.adjust_hue(x.flatten(0, 1), sh).view_as(x).unbind(-3)
