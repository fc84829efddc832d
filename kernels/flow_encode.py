"""Fused flow encoding: scale + FRA rotation + flip sign + colour wheel, base and rotated in one pass.

Input is the cropped/resized raw flow of a window (the crop commutes with scaling and rotation, see
``mscl_stream.motion.flow_views``); per flow frame n the parameters are
``params[n] = (inv_scale, cos b, sin b, sign)`` with sign = -1 where the view is flipped (u negated).
With (u, v) = inv_scale * flow:
    base = wheel(sign * u, v)
    rot  = wheel(sign * (u cos b - v sin b), u sin b + v cos b)
written straight into the (B, 3, F, S, S) layout the 3D CNN takes. ``flow_encode_reference`` is the
torch path (CPU, and the parity reference); ``flow_encode_triton`` the Triton kernel (CUDA, or CPU
tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import torch

from mscl_stream.errors import UserError
from mscl_stream.motion.wheel import WHEEL_SIZE, wheel01, wheel_encode_255

try:   # Triton is optional: without it (or without CUDA) the torch reference runs
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - depends on the install
    triton = None

TAN_PI_8 = math.tan(math.pi / 8)
_BLOCK = 256


def triton_available() -> bool:
    """True when Triton imports (a CUDA device, or TRITON_INTERPRET=1, is still needed to run)."""
    return triton is not None


def _check(flow: torch.Tensor, params: torch.Tensor, frames_per_sample: int) -> tuple[int, int]:
    if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[2] != flow.shape[3]:
        raise UserError(f"flow_encode: flow must be (B*F,2,S,S), got {tuple(flow.shape)}")
    n = flow.shape[0]
    if frames_per_sample < 1 or n % frames_per_sample:
        raise UserError(f"flow_encode: {n} frames do not split into samples of {frames_per_sample}")
    if tuple(params.shape) != (n, 4):
        raise UserError(f"flow_encode: params must be ({n}, 4), got {tuple(params.shape)}")
    return n // frames_per_sample, flow.shape[-1]


def flow_encode_reference(flow: torch.Tensor, params: torch.Tensor,
                          frames_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path. Args and returns as :func:`flow_encode`."""
    b, s = _check(flow, params, frames_per_sample)
    flow, params = flow.float(), params.float()
    p = params[:, :, None, None]
    scale, cos, sin, sign = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    u, v = flow[:, 0] * scale, flow[:, 1] * scale
    base = wheel_encode_255(sign * u, v)
    rot = wheel_encode_255(sign * (u * cos - v * sin), u * sin + v * cos)

    def layout(img: torch.Tensor) -> torch.Tensor:   # (B*F, S, S, 3) -> (B, 3, F, S, S)
        return (img / 255.0).reshape(b, frames_per_sample, s, s, 3).permute(0, 4, 1, 2, 3).contiguous()

    return layout(base), layout(rot)


if triton is not None:

    @triton.jit
    def _wheel_pos(u, v, PI: tl.constexpr, TAN_PI_8: tl.constexpr, NCOLS: tl.constexpr):
        # fk = (atan2(-v, -u) / pi + 1) / 2 * (NCOLS - 1). atan2 by octant reduction and an odd
        # minimax polynomial (|err| < 2e-8 on [-tan(pi/8), tan(pi/8)]): libdevice has no CPU
        # interpreter path. Signs come from the sign bits of u and v so -0.0 behaves like torch's
        # atan2(-v, -u) (negating in Triton may compute 0 - x, which loses the zero's sign).
        ax = tl.abs(u)
        ay = tl.abs(v)
        mn = tl.minimum(ax, ay)
        mx = tl.maximum(ax, ay)
        t = mn / tl.where(mx > 0, mx, 1.0)
        big = t > TAN_PI_8
        t = tl.where(big, (t - 1.0) / (t + 1.0), t)
        z = t * t
        p = -6.092697488e-02
        p = p * z + 1.060664679e-01
        p = p * z - 1.424662530e-01
        p = p * z + 1.999873961e-01
        p = p * z - 3.333332214e-01
        at = t + t * z * p
        at = tl.where(big, at + PI / 4, at)
        at = tl.where(ay > ax, PI / 2 - at, at)
        x_neg = u.to(tl.int32, bitcast=True) >= 0     # -u < 0 (or -0.0)  <=>  u has no sign bit
        y_neg = v.to(tl.int32, bitcast=True) >= 0
        at = tl.where(x_neg, PI - at, at)
        at = tl.where(y_neg, -at, at)
        a = at / PI
        return (a + 1.0) / 2.0 * (NCOLS - 1)

    @triton.jit
    def encode_store(u, v, wheel_ptr, out_ptr, chan_stride, mask,
                      PI: tl.constexpr, TAN_PI_8: tl.constexpr, NCOLS: tl.constexpr):
        fk = _wheel_pos(u, v, PI, TAN_PI_8, NCOLS)
        k0f = tl.floor(fk)
        f = fk - k0f
        k0 = tl.minimum(tl.maximum(k0f.to(tl.int32), 0), NCOLS - 1)   # guards NaN input only
        k1 = tl.where(k0 == NCOLS - 1, 0, k0 + 1)
        r = tl.sqrt(u * u + v * v)
        inside = r <= 1.0
        for c in tl.static_range(3):
            c0 = tl.load(wheel_ptr + k0 * 3 + c, mask=mask, other=0.0)
            c1 = tl.load(wheel_ptr + k1 * 3 + c, mask=mask, other=0.0)
            col = (1.0 - f) * c0 + f * c1
            col = tl.where(inside, 1.0 - r * (1.0 - col), col * 0.75)
            tl.store(out_ptr + c * chan_stride, tl.floor(255.0 * col) / 255.0, mask=mask)

    @triton.jit
    def _flow_encode_kernel(flow_ptr, params_ptr, wheel_ptr, base_ptr, rot_ptr, NF, SS,
                            PI: tl.constexpr, TAN_PI_8: tl.constexpr, NCOLS: tl.constexpr,
                            BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)            # flow frame = sample * NF + step
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = pix < SS
        scale = tl.load(params_ptr + n * 4)
        cos = tl.load(params_ptr + n * 4 + 1)
        sin = tl.load(params_ptr + n * 4 + 2)
        sign = tl.load(params_ptr + n * 4 + 3)
        u = tl.load(flow_ptr + n * 2 * SS + pix, mask=mask, other=0.0) * scale
        v = tl.load(flow_ptr + (n * 2 + 1) * SS + pix, mask=mask, other=0.0) * scale
        sample = n // NF
        # (B, 3, F, S, S): channel c of frame (sample, step) at ((sample*3 + c)*NF + step)*SS
        out_off = (sample * 3 * NF + (n - sample * NF)) * SS + pix
        chan_stride = NF * SS
        encode_store(sign * u, v, wheel_ptr, base_ptr + out_off, chan_stride, mask,
                      PI, TAN_PI_8, NCOLS)
        encode_store(sign * (u * cos - v * sin), u * sin + v * cos, wheel_ptr, rot_ptr + out_off,
                      chan_stride, mask, PI, TAN_PI_8, NCOLS)


def flow_encode_triton(flow: torch.Tensor, params: torch.Tensor,
                       frames_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path. Args and returns as :func:`flow_encode`."""
    if triton is None:
        raise UserError("flow_encode: backend 'triton' requested but triton does not import")
    b, s = _check(flow, params, frames_per_sample)
    flow = flow.float().contiguous()
    params = params.float().contiguous()
    wheel = wheel01(flow.device, torch.float32).contiguous()
    base = torch.empty((b, 3, frames_per_sample, s, s), device=flow.device, dtype=torch.float32)
    rot = torch.empty_like(base)
    ss = s * s
    grid = (flow.shape[0], triton.cdiv(ss, _BLOCK))
    _flow_encode_kernel[grid](flow, params, wheel, base, rot, frames_per_sample, ss,
                              PI=math.pi, TAN_PI_8=TAN_PI_8, NCOLS=WHEEL_SIZE, BLOCK=_BLOCK)
    return base, rot


def flow_encode(flow: torch.Tensor, params: torch.Tensor, frames_per_sample: int,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode base and rotated colour-wheel views of cropped flow in one pass.

    Args:
        flow: (B*F, 2, S, S) cropped/resized raw flow (frame n = sample * F + step).
        params: (B*F, 4) float per frame: (inverse max-magnitude scale, cos b, sin b, flip sign).
        frames_per_sample: F.
        backend: "auto" (Triton for CUDA tensors when it imports, else torch), "torch", "triton".
    Returns:
        (base, rot): each (B, 3, F, S, S) float32 in [0, 1], quantised to k / 255.
    """
    if backend == "auto":
        backend = "triton" if (flow.is_cuda and triton is not None) else "torch"
    if backend == "torch":
        return flow_encode_reference(flow, params, frames_per_sample)
    if backend == "triton":
        return flow_encode_triton(flow, params, frames_per_sample)
    raise UserError(f"flow_encode: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
