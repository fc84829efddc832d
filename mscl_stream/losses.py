"""MSCL's contrastive losses as pure functions: clip-level InfoNCE with a queue, frame-level LMCL.

Both compute in float32 (float64 inputs stay float64) with autocast switched off inside: logits divided
by a temperature of 0.07 reach ~14, and bf16 would cost ~3 significant bits on the logsumexp.
Neither normalises its clip-level inputs nor checks their norms (that would sync the device): the
projection heads' outputs are L2-normalised by the caller. See docs/method.md, sections 5 and 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise UserError(f"losses: temperature must be > 0, got {temperature}")


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """MoCo InfoNCE: each query's positive is its own key, negatives are the queue.

    loss = mean_b [ -q_b.k_b / t + log( exp(q_b.k_b / t) + sum_j exp(q_b.queue_j / t) ) ],
    i.e. cross-entropy of the logits [q_b.k_b, q_b.queue^T] / t with target 0.

    Other keys of the batch are not negatives (they reach the queue after the step). For the released
    code's departure 3 (each positive key also among its negatives) the caller passes
    ``torch.cat([queue, k])`` (or the queue snapshot taken after enqueueing k) as ``queue``.

    Args:
        q: (B, D) L2-normalised queries (gradients flow here).
        k: (B, D) L2-normalised positive keys (usually from a momentum encoder, detached by the caller).
        queue: (K, D) negatives, K >= 1 (an empty queue would give a constant zero loss, so it is refused).
        temperature: softmax temperature t > 0.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    _check_temperature(temperature)
    if q.ndim != 2 or q.shape != k.shape or q.shape[0] == 0:
        raise UserError(f"infonce: q and k must both be (B, D) with B >= 1, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise UserError(f"infonce: queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    if queue.shape[0] == 0:
        raise UserError("infonce: the queue is empty; at least one negative is needed")
    dt = _compute_dtype(q, k, queue)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.to(dt), k.to(dt), queue.to(dt)
        pos = (q * k).sum(dim=1, keepdim=True)                                  # (B, 1)
        neg = q @ queue.t()                                                      # (B, K)
        logits = torch.cat([pos, neg], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


def lmcl(rgb_feats: torch.Tensor, flow_feats: torch.Tensor, rot_flow_feats: torch.Tensor,
         temperature: float = 0.07) -> torch.Tensor:
    """Local Motion Contrastive Learning: each RGB time step against the flow steps of its own sample.

    Features are L2-normalised over channels. For sample b and RGB step i, the logits are
    rgb[b, :, i] . [flow[b, :, 0..T-1], rot[b, :, 0..T-1]] / t (2T candidates); the positive is the
    base flow at the same step i; the negatives are the other base steps and every rotated step.
    loss = mean over (b, i) of the cross-entropy with target i. No queue, no projection head.

    Args:
        rgb_feats: (B, C, T) spatially pooled RGB frame features (T = 4 in MSCL).
        flow_feats: (B, C, T) pooled features of the base flow.
        rot_flow_feats: (B, C, T) pooled features of the rotated (FRA) flow; for the released code's
            departure 1 (docs/method.md) the caller passes window B's unrotated flow features here instead.
        temperature: softmax temperature t > 0.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    _check_temperature(temperature)
    if rgb_feats.ndim != 3 or rgb_feats.shape[0] == 0 or rgb_feats.shape[2] == 0:
        raise UserError(f"lmcl: rgb_feats must be (B, C, T) with B, T >= 1, got {tuple(rgb_feats.shape)}")
    if flow_feats.shape != rgb_feats.shape or rot_flow_feats.shape != rgb_feats.shape:
        raise UserError(f"lmcl: rgb, flow and rotated-flow features must share one (B, C, T) shape, got "
                        f"{tuple(rgb_feats.shape)}, {tuple(flow_feats.shape)}, {tuple(rot_flow_feats.shape)}")
    dt = _compute_dtype(rgb_feats, flow_feats, rot_flow_feats)
    b, _, t = rgb_feats.shape
    with torch.autocast(device_type=rgb_feats.device.type, enabled=False):
        rgb = F.normalize(rgb_feats.to(dt), dim=1)
        cand = F.normalize(torch.cat([flow_feats.to(dt), rot_flow_feats.to(dt)], dim=2), dim=1)  # (B, C, 2T)
        logits = torch.bmm(rgb.transpose(1, 2), cand) / temperature             # (B, T, 2T)
        target = torch.arange(t, device=logits.device).repeat(b)                # step i -> base flow i
        return F.cross_entropy(logits.reshape(b * t, 2 * t), target)
