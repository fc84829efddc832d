"""Motion ops of MSCL: flow normalisation, FRA rotation, colour-wheel encoding, view crops, MDS scores.

Pure functions on tensors (any device). The spec is docs/method.md, sections 2-4; flow convention:
channel 0 = u (right), channel 1 = v (down), in pixels.

The crop of a view (box, bilinear resize, flip) is ``mscl_stream.augment.crop_resize``, the same
call the RGB view uses, so a view's flow and frames align exactly (pixel-edge boxes,
``grid_sample(align_corners=False, padding_mode="border")``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.augment import crop_resize
from mscl_stream.errors import UserError

FLOW_EPS = 1e-5          # added to the per-frame max magnitude before dividing (section 2 step 1)
FRA_BINS = 8             # b = (0.2 + 0.2 c) pi, c in {0..7} (section 3)
MDS_POOL = 28            # avgpool window and stride of the motion-boundary attention (section 4)
MDS_CLIP_STEPS = 8       # terms of a clip score, divisor of c_i
MDS_STEP = 4             # flow-index spacing of the terms of c_i
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
def _wheel01(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # wheel / 255 once per device and dtype: the encoder gathers from it for every pixel
    return (colorwheel() / 255.0).to(device=device, dtype=dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def wheel_encode_255(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Colour-wheel code of flow vectors as integers 0..255 (section 2 step 5, before the /255).

    Args:
        u, v: (...,) flow components of the same shape (float; r > 1 takes the 0.75 branch).
    Returns:
        (..., 3) float tensor of integers in [0, 255] (float32, float64 for float64 input).
        NaN input gives NaN output (never a silent colour).
    """
    dt = _compute_dtype(u)
    u, v = u.to(dt), v.to(dt)
    wheel = _wheel01(u.device, dt)
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
    _check_flow(flow, "flow")
    return wheel_encode_255(flow[..., 0, :, :], flow[..., 1, :, :]).movedim(-1, -3) / 255.0


def normalize_flow(flow: torch.Tensor) -> torch.Tensor:
    """Divide each flow frame by its max vector magnitude over the frame, plus 1e-5.

    Args:
        flow: (..., 2, H, W) float, pixels.
    Returns:
        (..., 2, H, W), max magnitude per frame just below 1.
    """
    _check_flow(flow, "flow")
    mag = torch.linalg.vector_norm(flow, dim=-3, keepdim=True)
    return flow / (mag.amax(dim=(-2, -1), keepdim=True) + FLOW_EPS)


def rotate_flow(flow: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotate flow vectors (not the image): u' = u cos b - v sin b, v' = u sin b + v cos b.

    Args:
        flow: (B, ..., 2, H, W).
        angle: (B,) radians (broadcast over the dims between B and the vector dim) or a scalar.
    Returns:
        (B, ..., 2, H, W).
    """
    _check_flow(flow, "flow")
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
    from mscl_stream.kernels.flow_encode import flow_encode   # lazy: the kernel module imports us

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


# ---------------------------------------------------------------- MDS (section 4)

def motion_boundaries(flows: torch.Tensor) -> torch.Tensor:
    """Sobel motion boundary magnitude sqrt(Sx(u)^2 + Sy(u)^2 + Sx(v)^2 + Sy(v)^2), edge-replicated.

    Args:
        flows: (N, 2, H, W) raw flow.
    Returns:
        (N, H, W) float.
    """
    _check_flow(flows, "flows", ndim=4)
    x = flows.to(_compute_dtype(flows))
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    deriv = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    kx = torch.outer(smooth, deriv)                  # d/dx: smooth along y, derivative along x
    kernels = torch.stack((kx, kx.T)).unsqueeze(1)   # (2, 1, 3, 3)
    n, _, h, w = x.shape
    padded = F.pad(x.reshape(n * 2, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels)                # (2N, 2, H, W): Sx, Sy of u and v
    return grads.reshape(n, 4, h, w).square().sum(1).sqrt()


def motion_attention(flows: torch.Tensor) -> torch.Tensor:
    """MDS attention A_j: 28x28/28 avgpool of the motion boundaries, bilinear back up, over its max.

    Args:
        flows: (N, 2, H, W) raw flow, H and W >= 28.
    Returns:
        (N, H, W) in [0, 1]; a frame without motion boundaries (max 0) gets zero attention.
    """
    _check_flow(flows, "flows", ndim=4)
    h, w = flows.shape[-2:]
    if h < MDS_POOL or w < MDS_POOL:
        raise UserError(f"MDS needs flow frames of at least {MDS_POOL}x{MDS_POOL}, got {h}x{w}")
    pooled = F.avg_pool2d(motion_boundaries(flows).unsqueeze(1), MDS_POOL, MDS_POOL)
    att = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    peak = att.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, att / torch.where(peak > 0, peak, 1.0), 0.0)


def _weighted_wheel(flows: torch.Tensor) -> torch.Tensor:
    # W_j = A_j * V_j, V_j = integer colour wheel of the per-frame max-normalised flow: (N, 3, H, W)
    x = flows.to(_compute_dtype(flows))
    wheel = wheel_encode_255(*normalize_flow(x).unbind(1)).movedim(-1, 1)
    return motion_attention(x).unsqueeze(1) * wheel


def _frame_scores(chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    # s_j = mean_x ||W_j(x) - W_{j+1}(x)||_2, s_{N-1} = 0; chunked so long videos fit in memory
    scores, prev = [], None
    for chunk in chunks:
        if chunk.shape[0] == 0:
            continue
        w = _weighted_wheel(chunk)
        if prev is not None:
            w = torch.cat((prev, w))
        scores.append(torch.linalg.vector_norm(w[:-1] - w[1:], dim=1).mean(dim=(-2, -1)))
        prev = w[-1:]
    if prev is None:
        raise UserError("MDS needs at least one flow frame")
    scores.append(torch.zeros(1, dtype=prev.dtype, device=prev.device))
    return torch.cat(scores)


def _clip_scores(s: torch.Tensor) -> torch.Tensor:
    # c_i = (1/8) sum_{k=0..7, i+4k<N} s_{i+4k}: zero-padding past the end keeps the divisor at 8
    n = s.shape[0]
    span = MDS_STEP * (MDS_CLIP_STEPS - 1)
    padded = torch.cat((s, s.new_zeros(span)))
    idx = torch.arange(n, device=s.device).unsqueeze(1) + MDS_STEP * torch.arange(
        MDS_CLIP_STEPS, device=s.device)
    return padded[idx].sum(1) / MDS_CLIP_STEPS


def mds_clip_scores(flows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """MDS clip scores c_i of one video (docs/method.md, section 4, steps 1-5).

    Args:
        flows: (N, 2, H, W) raw flows F_j = flow(2j -> 2j + 8), H, W >= 28.
        chunk: frames processed at once (memory bound only; the result does not depend on it).
    Returns:
        (N,) float scores (float32, float64 for float64 input).
    """
    _check_flow(flows, "flows", ndim=4)
    step = max(int(chunk), 1)
    return _clip_scores(_frame_scores(flows[i:i + step] for i in range(0, flows.shape[0], step)))


def window_motion_scores(flows: torch.Tensor) -> torch.Tensor:
    """MDS motion score of candidate windows, for MDS ``online`` (section 4, steps 1-4 per window).

    Each window's score is the mean of s_j over j < F-1, with s_j = spatial mean of ||W_j - W_{j+1}||
    as in :func:`mds_clip_scores`. The flow frames here are the training window's own flows, one per
    flow step: ``frame_stride`` raw frames apart times the step spacing (32 raw frames with MSCL's
    defaults and ``flow_frames: even``), not 2 raw frames apart as in the offline/index score, so
    the values are not comparable with ``mds_clip_scores``; only their order within a sample is used.

    Args:
        flows: (N, F, 2, H, W) raw pixel flow of N windows, F >= 2, H, W >= 28.
    Returns:
        (N,) float scores (float32, float64 for float64 input).
    """
    if flows.dim() != 5 or flows.shape[2] != 2:
        raise UserError(f"window_motion_scores: flows must be (N,F,2,H,W), got {tuple(flows.shape)}")
    n, nf = flows.shape[:2]
    if nf < 2:
        raise UserError(f"window_motion_scores: needs at least 2 flow frames per window, got {nf}")
    w = _weighted_wheel(flows.flatten(0, 1)).unflatten(0, (n, nf))            # (N, F, 3, H, W)
    d = torch.linalg.vector_norm(w[:, :-1] - w[:, 1:], dim=2).mean(dim=(-2, -1))   # (N, F-1): s_j
    return d.mean(1)


def mds_allowed_starts(scores: torch.Tensor) -> torch.Tensor:
    """Allowed clip starts { i : c_i > median(c) }, median as numpy defines it.

    Args:
        scores: (N,) clip scores.
    Returns:
        LongTensor of allowed start indices (flow indices), ascending; empty when all scores are
        equal (e.g. a static video): callers fall back to all starts.
    """
    if scores.dim() != 1 or scores.numel() == 0:
        raise UserError(f"mds_allowed_starts: need a non-empty (N,) tensor, got {tuple(scores.shape)}")
    srt = scores.sort().values
    n = srt.shape[0]
    median = (srt[(n - 1) // 2] + srt[n // 2]) / 2   # numpy: mean of the two middle values
    return torch.nonzero(scores > median).flatten()


def mds_video_starts(frames: torch.Tensor, estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     flow_gap: int = 8, batch: int = 32) -> list[int]:
    """Allowed raw-frame clip starts of one video, for MDS `index`/`online` modes.

    Computes F_j = estimator(frames[2j], frames[2j + flow_gap]) for every j with 2j + flow_gap < N
    (in batches, never all flows at once), scores them with :func:`mds_clip_scores` and maps the
    allowed flow indices i to raw starts 2i.

    Args:
        frames: (N, 3, H, W) uint8 (or float 0..255) consecutive raw frames of the video, H, W >= 28.
        estimator: a FlowEstimator: (M,3,H,W), (M,3,H,W) -> (M,2,H,W) pixel flow.
        flow_gap: raw frames between the two frames of a flow pair (8 in MSCL).
        batch: flow pairs per estimator call.
    Returns:
        Sorted raw start frames (even integers); empty when all clip scores are equal.
    Raises:
        UserError: the video is too short for one flow pair.
    """
    n = frames.shape[0]
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise UserError(f"mds_video_starts: frames must be (N,3,H,W), got {tuple(frames.shape)}")
    count = (n - 1 - flow_gap) // 2 + 1 if n > flow_gap else 0
    if count <= 0:
        raise UserError(f"MDS: video has {n} frames, needs at least {flow_gap + 1} for one flow pair")
    step = max(int(batch), 1)

    def flow_chunks() -> Iterator[torch.Tensor]:
        for j0 in range(0, count, step):
            src = torch.arange(j0, min(j0 + step, count), device=frames.device) * 2
            with torch.no_grad():
                yield estimator(frames[src], frames[src + flow_gap]).float()

    allowed = mds_allowed_starts(_clip_scores(_frame_scores(flow_chunks())))
    return [2 * int(i) for i in allowed.tolist()]


def _check_flow(flow: torch.Tensor, name: str, ndim: int | None = None) -> None:
    if flow.dim() < 3 or flow.shape[-3] != 2 or (ndim is not None and flow.dim() != ndim):
        want = "(N,2,H,W)" if ndim == 4 else "(...,2,H,W)"
        raise UserError(f"{name} must be {want}, got shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise UserError(f"{name} must be a float tensor, got {flow.dtype}")
