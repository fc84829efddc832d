"""Fused flow views: per-frame max magnitude, then crop + resize + flip + scale + FRA + colour wheel.

The Triton counterpart of ``mscl_stream.motion.flow_views`` for the whole batch in two launches per
window, reading the view's crop box and flip from the uploaded parameter table (no host values, static
shapes):

1. ``_max_kernel``, one program per flow frame: 1 / (max_x |flow(x)| + 1e-5) over the H x W frame.
2. ``_crop_encode_kernel``, per output pixel: bilinear crop of u and v with the view's box and flip
   (the RGB view's geometry, ``kernels.augment_rgb.crop_bilinear``), scaled, flip sign (u negated), rotated by
   the FRA angle, both colour-wheel images written (``kernels.flow_encode.encode_store``) in the
   output's dtype and strides ((B, 3, F, S, S), contiguous or channels_last_3d).

The reference is ``motion.flow_views(..., backend="torch")``.
"""

from __future__ import annotations

import math

import torch

from mscl_stream.augment.params import COL_BOX, COL_FLIP, VIEW_COLS
from mscl_stream.errors import UserError
from mscl_stream.motion.wheel import FLOW_EPS, WHEEL_SIZE, wheel01

try:
    import triton
    import triton.language as tl

    from mscl_stream.kernels.augment_rgb import crop_bilinear
    from mscl_stream.kernels.flow_encode import TAN_PI_8, encode_store
except ImportError:   # pragma: no cover - depends on the install
    triton = None

_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _max_kernel(flow_ptr, inv_ptr, HW, EPS: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, HW, BLOCK):
            pix = start + tl.arange(0, BLOCK)
            mask = pix < HW
            u = tl.load(flow_ptr + n * 2 * HW + pix, mask=mask, other=0.0)
            v = tl.load(flow_ptr + (n * 2 + 1) * HW + pix, mask=mask, other=0.0)
            acc = tl.maximum(acc, tl.sqrt(u * u + v * v))
        tl.store(inv_ptr + n, 1.0 / (tl.max(acc, axis=0) + EPS))

    @triton.jit
    def _crop_encode_kernel(flow_ptr, inv_ptr, tab_ptr, tab_stride, ang_ptr, ang_stride, wheel_ptr,
                            base_ptr, rot_ptr, NF, H, W, S, o_b, o_c, o_t, o_h, o_w,
                            NEGATE_U: tl.constexpr, C_BOX: tl.constexpr, C_FLIP: tl.constexpr,
                            PI: tl.constexpr, TAN_PI_8: tl.constexpr, NCOLS: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)                  # flow frame = clip * NF + step
        clip = n // NF
        step = n - clip * NF
        SS = S * S
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = pix < SS
        row = tab_ptr + clip * tab_stride
        x0 = tl.load(row + C_BOX)
        y0 = tl.load(row + C_BOX + 1)
        x1 = tl.load(row + C_BOX + 2)
        y1 = tl.load(row + C_BOX + 3)
        flip = tl.load(row + C_FLIP) > 0.5
        ang = tl.load(ang_ptr + clip * ang_stride)
        cos = tl.cos(ang)
        sin = tl.sin(ang)
        if NEGATE_U:
            sign = tl.where(flip, -1.0, 1.0)
        else:
            sign = tl.where(flip, 1.0, 1.0)
        scale = tl.load(inv_ptr + n)
        hw = H * W
        src = flow_ptr + n * 2 * hw
        u = crop_bilinear(src, pix, mask, x0, y0, x1, y1, flip, H, W, S) * scale
        v = crop_bilinear(src + hw, pix, mask, x0, y0, x1, y1, flip, H, W, S) * scale
        i = pix // S
        j = pix - i * S
        off = clip * o_b + step * o_t + i * o_h + j * o_w
        encode_store(sign * u, v, wheel_ptr, base_ptr + off, o_c, mask, PI, TAN_PI_8, NCOLS)
        encode_store(sign * (u * cos - v * sin), u * sin + v * cos, wheel_ptr, rot_ptr + off, o_c, mask,
                     PI, TAN_PI_8, NCOLS)


def flow_views_fused(flow: torch.Tensor, table: torch.Tensor, angles: torch.Tensor, out_size: int,
                     compat: str = "default", out_dtype: torch.dtype = torch.float32,
                     memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and FRA-rotated colour-wheel views of one window, fused (Triton; CPU under TRITON_INTERPRET=1).

    Args:
        flow: (B, F, 2, H, W) raw flow in pixels.
        table: (B, >= VIEW_COLS) the RGB view's parameter table on the device (box and flip columns).
        angles: (B,) FRA angles in radians on the device (any stride).
        out_size: S. compat: "default" or "released" (flips do not negate u).
        out_dtype, memory_format: of the results.

    Returns:
        (base, rot): each (B, 3, F, S, S) in [0, 1], quantised to k / 255.
    """
    if triton is None:
        raise UserError("flow_views_fused: needs triton, which does not import")
    if flow.dim() != 5 or flow.shape[2] != 2:
        raise UserError(f"flow_views_fused: flow must be (B,F,2,H,W), got {tuple(flow.shape)}")
    b, nf, _, h, w = flow.shape
    if table.ndim != 2 or table.shape[0] != b or table.shape[1] < VIEW_COLS or table.stride(1) != 1:
        raise UserError(f"flow_views_fused: table must be ({b}, >= {VIEW_COLS}), got {tuple(table.shape)}")
    if tuple(angles.shape) != (b,):
        raise UserError(f"flow_views_fused: angles must be ({b},), got {tuple(angles.shape)}")
    if compat not in ("default", "released"):
        raise UserError(f"flow_views_fused: compat must be 'default' or 'released', got {compat!r}")
    flow = flow.float().contiguous()
    s = out_size
    inv = torch.empty(b * nf, device=flow.device, dtype=torch.float32)
    base = torch.empty((b, 3, nf, s, s), device=flow.device, dtype=out_dtype, memory_format=memory_format)
    rot = torch.empty_like(base)
    wheel = wheel01(flow.device, torch.float32)
    _max_kernel[(b * nf,)](flow, inv, h * w, EPS=FLOW_EPS, BLOCK=_BLOCK)
    _crop_encode_kernel[(b * nf, triton.cdiv(s * s, _BLOCK))](
        flow, inv, table, table.stride(0), angles, angles.stride(0), wheel, base, rot, nf, h, w, s,
        *base.stride(), NEGATE_U=compat == "default", C_BOX=COL_BOX, C_FLIP=COL_FLIP, PI=math.pi,
        TAN_PI_8=TAN_PI_8, NCOLS=WHEEL_SIZE, BLOCK=_BLOCK)
    return base, rot
