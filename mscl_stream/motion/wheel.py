"""Flow as colour: per-frame max normalisation and the Middlebury colour wheel (docs/method.md, section 2).

Pure functions on tensors (any device). Flow convention: channel 0 = u (right), channel 1 = v (down), in
pixels. The wheel tables here are also what the fused kernels (``mscl_stream.kernels.flow_encode``,
``mscl_stream.kernels.flow_views``) gather from.
"""

from __future__ import annotations

import functools
import math

import torch

from mscl_stream.errors import UserError

FLOW_EPS = 1e-5          # added to the per-frame max magnitude before dividing (section 2 step 1)
# Middlebury / RAFT wheel: (segment, length, channel held at 255, ramped channel, ramp goes up)
WHEEL_SEGMENTS = (("RY", 15, 0, 1, True), ("YG", 6, 1, 0, False), ("GC", 4, 1, 2, True),
                  ("CB", 11, 2, 1, False), ("BM", 13, 2, 0, True), ("MR", 6, 0, 2, False))
WHEEL_SIZE = sum(s[1] for s in WHEEL_SEGMENTS)   # 55


def colorwheel() -> torch.Tensor:
    """The 55-colour Middlebury wheel. Returns (55, 3) float64 RGB values in 0..255."""
    rows = []
    for _, n, full, ramp, up in WHEEL_SEGMENTS:
        for i in range(n):
            step = math.floor(255 * i / n)
            rgb = [0.0, 0.0, 0.0]
            rgb[full] = 255.0
            rgb[ramp] = float(step if up else 255 - step)
            rows.append(rgb)
    return torch.tensor(rows, dtype=torch.float64)


@functools.lru_cache(maxsize=16)
def wheel01(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The wheel / 255 as (55, 3) on ``device`` in ``dtype``, cached: the encoders gather from it per pixel."""
    return (colorwheel() / 255.0).to(device=device, dtype=dtype)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype motion ops compute in: float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def wheel_encode_255(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Colour-wheel code of flow vectors as integers 0..255 (section 2 step 5, before the /255).

    Args:
        u, v: (...,) flow components of the same shape (float; r > 1 takes the 0.75 branch).
    Returns:
        (..., 3) float tensor of integers in [0, 255] (float32, float64 for float64 input).
        NaN input gives NaN output (never a silent colour).
    """
    dt = compute_dtype(u)
    u, v = u.to(dt), v.to(dt)
    wheel = wheel01(u.device, dt)
    a = torch.atan2(-v, -u) / math.pi
    fk = (a + 1) / 2 * (WHEEL_SIZE - 1)
    k0f = torch.floor(fk)
    f = (fk - k0f).unsqueeze(-1)
    # clamp only guards the gather against NaN input (NaN stays NaN through f)
    k0 = k0f.nan_to_num(0.0).long().clamp(0, WHEEL_SIZE - 1)
    k1 = torch.where(k0 == WHEEL_SIZE - 1, torch.zeros_like(k0), k0 + 1)
    col = (1 - f) * wheel[k0] + f * wheel[k1]
    r = torch.sqrt(u * u + v * v).unsqueeze(-1)
    col = torch.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    return torch.floor(255 * col)


def flow_to_color(flow: torch.Tensor) -> torch.Tensor:
    """Middlebury colour-wheel image of a flow field (|flow| <= 1 expected, larger is darkened).

    Args:
        flow: (..., 2, H, W) float.
    Returns:
        (..., 3, H, W) float in [0, 1], quantised to k / 255; zero motion is white.
    """
    check_flow(flow, "flow")
    return wheel_encode_255(flow[..., 0, :, :], flow[..., 1, :, :]).movedim(-1, -3) / 255.0


def normalize_flow(flow: torch.Tensor) -> torch.Tensor:
    """Divide each flow frame by its max vector magnitude over the frame, plus 1e-5.

    Args:
        flow: (..., 2, H, W) float, pixels.
    Returns:
        (..., 2, H, W), max magnitude per frame just below 1.
    """
    check_flow(flow, "flow")
    mag = torch.linalg.vector_norm(flow, dim=-3, keepdim=True)
    return flow / (mag.amax(dim=(-2, -1), keepdim=True) + FLOW_EPS)


def check_flow(flow: torch.Tensor, name: str, ndim: int | None = None) -> None:
    """Raise a UserError unless ``flow`` is a float (..., 2, H, W) tensor ((N, 2, H, W) with ``ndim=4``)."""
    if flow.dim() < 3 or flow.shape[-3] != 2 or (ndim is not None and flow.dim() != ndim):
        want = "(N,2,H,W)" if ndim == 4 else "(...,2,H,W)"
        raise UserError(f"{name} must be {want}, got shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise UserError(f"{name} must be a float tensor, got {flow.dtype}")
