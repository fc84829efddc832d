"""ClipBatch: the typed hand-off between the loader and everything that runs on the device."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class ClipBatch:
    """One batch of MSCL training samples, frames already decoded and resized to the working size.

    Shapes (B = batch, T = frames per clip, F = flow frames per clip, H x W = working size):
        rgb_a, rgb_b:                 (B, T, 3, H, W) uint8   pixels of windows A (query) and B (key)
        partner_rgb_a, partner_rgb_b: (B, F, 3, H, W) uint8   pixels of frame r + flow_gap per flow step
        flow_steps:                   (F,) long               which of the T sampled frames has a flow pair
        frame_idx_a, frame_idx_b:     (B, T) long             raw frame indices of the sampled frames
        partner_idx_a, partner_idx_b: (B, F) long             raw frame indices of the flow partners
        labels:                       (B,) long               class label, -1 where unknown
        video_idx:                    (B,) long               row of the manifest
        candidates:                   int                     K: rows per sample (MDS online), else 1
        flow_a, flow_b:               (B, F, 2, H, W) float or None   flow read from disk (the
                                      precomputed-flow benchmark baseline only; normally computed in-batch)
    Flow pair j of window A is (rgb_a[:, flow_steps[j]], partner_rgb_a[:, j]). With K > 1 the rows are
    K candidate windows per sample, adjacent (sample s at rows s*K .. s*K + K-1), and B counts rows;
    ``mscl_stream.motion.select_online_mds`` keeps one row per sample.
    """

    rgb_a: torch.Tensor
    rgb_b: torch.Tensor
    partner_rgb_a: torch.Tensor
    partner_rgb_b: torch.Tensor
    flow_steps: torch.Tensor
    frame_idx_a: torch.Tensor
    frame_idx_b: torch.Tensor
    partner_idx_a: torch.Tensor
    partner_idx_b: torch.Tensor
    labels: torch.Tensor
    video_idx: torch.Tensor
    candidates: int = 1
    flow_a: torch.Tensor | None = None
    flow_b: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.rgb_a.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rgb_a.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (everything but ``candidates`` and absent flows)."""
        return {f.name: v for f in fields(self) if f.name != "candidates" and (v := getattr(self, f.name)) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "ClipBatch":
        return replace(self, **{k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors().items()})

    def flow_pairs(self, window: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame pairs of one window for the flow estimator: two (B*F, 3, H, W) uint8 tensors."""
        rgb, partner = (self.rgb_a, self.partner_rgb_a) if window == "a" else (self.rgb_b, self.partner_rgb_b)
        src = rgb.index_select(1, self.flow_steps.to(rgb.device))
        return src.flatten(0, 1), partner.flatten(0, 1)
