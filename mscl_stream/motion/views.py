"""Flow views of a clip window: FRA rotation and its angles, and the crop/flip/encode of a view's flow.

docs/method.md, sections 2 and 3. The crop of a view (box, bilinear resize, flip) is
:func:`mscl_stream.geometry.crop_resize`, the same call the RGB view uses, so a view's flow and frames
align exactly (pixel-edge boxes, ``grid_sample(align_corners=False, padding_mode="border")``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mscl_stream.errors import UserError
from mscl_stream.geometry import crop_resize
from mscl_stream.motion.wheel import FLOW_EPS, check_flow

FRA_BINS = 8             # b = (0.2 + 0.2 c) pi, c in {0..7} (section 3)


def rotate_flow(flow: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotate flow vectors (not the image): u' = u cos b - v sin b, v' = u sin b + v cos b.

    Args:
        flow: (B, ..., 2, H, W).
        angle: (B,) radians (broadcast over the dims between B and the vector dim) or a scalar.
    Returns:
        (B, ..., 2, H, W).
    """
    check_flow(flow, "flow")
    b = torch.as_tensor(angle, dtype=flow.dtype, device=flow.device)
    if b.dim() == 1:
        if b.shape[0] != flow.shape[0]:
            raise UserError(f"rotate_flow: {b.shape[0]} angles for a batch of {flow.shape[0]}")
        b = b.reshape(-1, *([1] * (flow.dim() - 2)))      # (B, 1, ..., 1) against u: (B, ..., H, W)
    elif b.dim() != 0:
        raise UserError(f"rotate_flow: angle must be (B,) or a scalar, got shape {tuple(b.shape)}")
    c, s = torch.cos(b), torch.sin(b)
    u, v = flow[..., 0, :, :], flow[..., 1, :, :]
    return torch.stack((u * c - v * s, u * s + v * c), dim=-3)


def fra_angles(batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """FRA angles: b = (0.2 + 0.2 c) pi with c uniform in {0..7}, one per sample.

    Args:
        batch_size: B.
        generator: optional torch.Generator (its device is used for the draw).
        device: where the result goes (default: the generator's device, else CPU).
    Returns:
        (B,) float32 radians in [0.2 pi, 1.6 pi].
    """
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    c = torch.randint(0, FRA_BINS, (batch_size,), generator=generator, device=gen_dev)
    b = (0.2 + 0.2 * c.to(torch.float64)) * math.pi
    return b.to(device=device or gen_dev, dtype=torch.float32)


def fra_angles_from_uniforms(u: np.ndarray) -> np.ndarray:
    """FRA angles from uniforms u (B,) in [0, 1): c = floor(8 u), b = (0.2 + 0.2 c) pi. Returns (B,) float32."""
    c = np.minimum(np.floor(u * FRA_BINS), FRA_BINS - 1)
    return ((0.2 + 0.2 * c) * math.pi).astype(np.float32)


def flow_views(flow: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, angles: torch.Tensor,
               out_size: int = 112, compat: str = "default",
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Base and FRA-rotated colour-wheel flow views of one window (docs/method.md, section 2).

    Equivalent to, per flow frame: normalise by the max over the whole frame -> rotate (rotated
    copy) -> crop with the view's box and resize (vectors not rescaled) -> flip (mirror, negate u)
    -> encode. Computed as: max over the frame, one crop/resize of the raw flow (linear, so it
    commutes with scaling and rotation), then one fused pass that scales, rotates, applies the flip
    sign (P R(b) = R(-b) P) and encodes both images (Triton on CUDA, torch otherwise).

    Args:
        flow: (B, F, 2, H, W) raw flow in pixels.
        boxes: (B, 4) relative crop boxes (x0, y0, x1, y1) of the window's RGB view.
        flips: (B,) bool horizontal flips of the view.
        angles: (B,) FRA angles in radians (shared by both windows of a sample).
        out_size: S.
        compat: "default", or "released" (flips mirror the image without negating u).
        backend: "auto" (Triton for CUDA tensors when importable), "torch" or "triton".
    Returns:
        (base, rot): each (B, 3, F, S, S) float32 in [0, 1].
    """
    if flow.dim() != 5 or flow.shape[2] != 2:
        raise UserError(f"flow_views: flow must be (B,F,2,H,W), got {tuple(flow.shape)}")
    b, nf = flow.shape[:2]
    for name, t, shape in (("boxes", boxes, (b, 4)), ("flips", flips, (b,)), ("angles", angles, (b,))):
        if tuple(t.shape) != shape:
            raise UserError(f"flow_views: {name} must have shape {shape}, got {tuple(t.shape)}")
    if compat not in ("default", "released"):
        raise UserError(f"flow_views: compat must be 'default' or 'released', got {compat!r}")
    from mscl_stream.kernels.flow_encode import flow_encode   # lazy: the kernel module imports triton

    dev = flow.device
    flow = flow.float()
    flips = flips.to(device=dev, dtype=torch.bool)
    inv = 1.0 / (torch.linalg.vector_norm(flow, dim=2).amax(dim=(-2, -1)) + FLOW_EPS)   # (B, F)
    crops = crop_resize(flow.flatten(0, 1), boxes.repeat_interleave(nf, 0), out_size,
                        flips.repeat_interleave(nf, 0))
    ang = angles.to(device=dev, dtype=torch.float32)
    sign = torch.where(flips & (compat == "default"), -1.0, 1.0)
    per_sample = torch.stack((torch.cos(ang), torch.sin(ang), sign), -1)           # (B, 3)
    params = torch.cat((inv.reshape(-1, 1), per_sample.repeat_interleave(nf, 0)), -1)
    return flow_encode(crops, params.contiguous(), nf, backend=backend)
