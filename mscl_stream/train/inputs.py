"""From a decoded ClipBatch to the model's inputs, on the device: flow, FRA, crops, colour encoding.

This is the part of a training step between the loader and the model (docs/performance.md, "The
step's input path"). Both windows' flow pairs go through the estimator in one call, so a
batch of B clips with F flow frames per window is one estimator batch of 2*B*F pairs.

MDS ``online`` (docs/method.md, section 4): the batch carries K candidate rows per sample. Window A's
flow of all B*K rows is computed first, the candidates are scored on it, the best one per sample is
kept, and window B's flow is computed for the kept rows only: (K + 1)*B*F pairs in two calls.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mscl_stream.augment import N_UNIFORMS, apply_uploaded, augment_backend, params_from_uniforms, upload_views
from mscl_stream.config import Config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.models.mscl import MSCLInputs
from mscl_stream.motion import flow_views, fra_angles_from_uniforms, select_online_mds


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the model (None = fp32): auto is bf16 on CUDA, fp32 on CPU."""
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def window_flow(batch: ClipBatch, window: str, estimator) -> torch.Tensor:
    """Forward flow of one window ("a" or "b") of every row, one estimator call: (B, F, 2, H, W) float32."""
    src, dst = batch.flow_pairs(window)
    flow = estimator(src, dst).float()
    return flow.view(batch.batch_size, batch.partner_rgb_a.shape[1], *flow.shape[1:])


@torch.no_grad()
def compute_flow(batch: ClipBatch, estimator) -> tuple[ClipBatch, torch.Tensor, torch.Tensor]:
    """Forward flow of both windows, choosing the MDS ``online`` candidates on the way.

    One estimator call for both windows when ``batch.candidates`` = 1; otherwise window A's flow of
    every candidate, :func:`mscl_stream.motion.select_online_mds`, then window B's flow of the kept rows only.

    Returns:
        batch: the batch the flows belong to (reduced to one row per sample when K > 1).
        flow_a, flow_b: (B, F, 2, H, W) float32 pixel flow of windows A and B.
    """
    if batch.flow_a is not None:          # the precomputed-flow baseline brings its flow from disk
        return batch, batch.flow_a.float(), batch.flow_b.float()
    if batch.candidates > 1:
        batch, flow_a = select_online_mds(batch, window_flow(batch, "a", estimator))
        return batch, flow_a, window_flow(batch, "b", estimator)
    src_a, dst_a = batch.flow_pairs("a")
    src_b, dst_b = batch.flow_pairs("b")
    flow = estimator(torch.cat([src_a, src_b]), torch.cat([dst_a, dst_b])).float()
    b, f = batch.batch_size, batch.partner_rgb_a.shape[1]
    flow = flow.view(2, b, f, *flow.shape[1:])
    return batch, flow[0], flow[1]


@torch.no_grad()
def make_inputs(batch: ClipBatch, flow_a: torch.Tensor, flow_b: torch.Tensor, cfg: Config,
                generator: torch.Generator) -> MSCLInputs:
    """Augment both RGB views and turn each window's flow into base and FRA-rotated colour images.

    The crop box and flip of a view are shared exactly by its RGB frames and its flow; one FRA angle
    per sample is shared by both windows (docs/method.md, section 3). All random choices come from one
    ``torch.rand`` draw on the host ``generator`` and reach the device as one upload; nothing is read
    back. ``augment.backend`` picks kornia/torch or the fused Triton kernels (the CUDA default), which
    write the model's dtype (the autocast dtype) and memory format (channels_last_3d on CUDA) directly.
    """
    dev, acfg = batch.device, cfg.augment
    backend = augment_backend(acfg.backend, dev)
    b, h, w = batch.batch_size, batch.rgb_a.shape[3], batch.rgb_a.shape[4]
    u = torch.rand((b, 2 * N_UNIFORMS + 1), generator=generator, dtype=torch.float64).numpy()
    pq = params_from_uniforms(u[:, :N_UNIFORMS], h, w, acfg, as_numpy=True)
    pk = params_from_uniforms(u[:, N_UNIFORMS:2 * N_UNIFORMS], h, w, acfg, as_numpy=True)
    angles = fra_angles_from_uniforms(u[:, -1])
    (uq, uk), ang = upload_views([pq, pk], angles, dev, subsets=backend == "torch")
    size, compat = acfg.out_size, cfg.model.compat
    if backend == "triton":
        dtype = amp_dtype(cfg, dev) or torch.float32
        fmt = torch.channels_last_3d if (cfg.train.channels_last and dev.type == "cuda") else torch.contiguous_format
        from mscl_stream.kernels.flow_views import flow_views_fused
        rgb_q = apply_uploaded(batch.rgb_a, uq, acfg, "triton", dtype, fmt == torch.channels_last_3d).frames
        rgb_k = apply_uploaded(batch.rgb_b, uk, acfg, "triton", dtype, fmt == torch.channels_last_3d).frames
        flow_q, rot_q = flow_views_fused(flow_a, uq.table, ang, size, compat, dtype, fmt)
        flow_k, rot_k = flow_views_fused(flow_b, uk.table, ang, size, compat, dtype, fmt)
    else:
        view_q = apply_uploaded(batch.rgb_a, uq, acfg, "torch")
        view_k = apply_uploaded(batch.rgb_b, uk, acfg, "torch")
        rgb_q, rgb_k = view_q.frames, view_k.frames
        flow_q, rot_q = flow_views(flow_a, view_q.boxes, view_q.flips, ang, out_size=size, compat=compat)
        flow_k, rot_k = flow_views(flow_b, view_k.boxes, view_k.flips, ang, out_size=size, compat=compat)
    return MSCLInputs(rgb_q=rgb_q, rgb_k=rgb_k, flow_q=flow_q, flow_k=flow_k, rot_q=rot_q, rot_k=rot_k)
