"""Test views of a video and their scores: clip and segment positions, crops, probabilities averaged per video.

**Short videos (the one rule).** Evaluation never drops a video for being short. Frame indices that
would fall past the usable range ``[rec.start, rec.frame_end)`` are clamped to its last frame: a clip
longer than the video starts at the first usable frame and repeats the last one; S segments over fewer
than S frames take the frame under each segment's centre, so frames repeat. Nothing is black-padded,
nothing is drawn from a grid that skips short files. A video that decodes is evaluated however short
it is; one that does not decode is counted and logged (``counts["failed"]``), never silently dropped.

**Geometry.** Frames are decoded at ``eval.test_short_side`` on their short side with the aspect ratio
kept (0: at ``data.frame_size``, resized to cover and centre-cropped, as in pretraining), then cut into
``crops`` squares of side ``eval.test_crop`` (0: ``augment.out_size``): one centred, or three along the
longer side (both ends and the centre). A view is one clip (or the segment frames) at one crop,
ImageNet-normalised. :func:`score_views` averages the softmax probabilities of a video's views.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mscl_stream.augment import IMAGENET_MEAN, IMAGENET_STD
from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.errors import UserError
from mscl_stream.eval.decode import iter_decoded

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- positions and crops


def clip_indices(rec: VideoRecord, frames: int, stride: int, clips: int = 1) -> list[list[int]]:
    """Deterministic clip positions: ``clips`` clips evenly spread (one: centred) over the usable range.

    A clip spans ``(frames - 1) * stride + 1`` raw frames. In a video shorter than that every clip
    starts at the first usable frame and indices past the end are clamped to the last frame.

    Returns:
        ``clips`` lists of ``frames`` raw frame indices, each within ``[rec.start, rec.frame_end)``.
    """
    lo, hi = rec.start, rec.frame_end
    span = (frames - 1) * stride + 1
    room = hi - lo - span
    if room >= 0:
        starts = [lo + room // 2] if clips == 1 else [lo + round(c * room / (clips - 1)) for c in range(clips)]
    else:
        starts = [lo] * clips
    return [[min(s + k * stride, hi - 1) for k in range(frames)] for s in starts]


def segment_indices(rec: VideoRecord, segments: int, rng: np.random.Generator | None = None) -> list[int]:
    """One frame from each of ``segments`` equal segments over the whole usable range (TSN sampling).

    With ``n`` usable frames, segment ``i`` covers ``[i * n / S, (i + 1) * n / S)``. Without ``rng`` it
    gives the frame under its centre, ``floor((i + 0.5) * n / S)``; with ``rng`` a uniformly random frame
    of its integer range ``[floor(i * n / S), floor((i + 1) * n / S))``, or its first frame where that
    range is empty (fewer frames than segments). Indices never pass the last usable frame.

    Returns:
        ``segments`` raw frame indices, non-decreasing, within ``[rec.start, rec.frame_end)``.
    """
    lo, n = rec.start, rec.frame_end - rec.start
    if n < 1 or segments < 1:
        raise UserError(f"{rec.path}: segment sampling needs >= 1 frame and >= 1 segment "
                        f"(frames {rec.start}..{rec.frame_end}, segments {segments})")
    if rng is None:
        return [lo + min(n - 1, (2 * i + 1) * n // (2 * segments)) for i in range(segments)]
    edges = [i * n // segments for i in range(segments + 1)]
    return [lo + min(n - 1, a + int(rng.integers(0, max(1, b - a)))) for a, b in zip(edges, edges[1:])]


def crop_boxes(h: int, w: int, size: int, crops: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of square ``size`` crops of an ``h`` x ``w`` frame.

    ``crops=1``: the centre crop. ``crops=3``: along the longer side (width when ``w >= h``), the start,
    the centre and the end, centred on the shorter side. Centres round down, as :func:`normalise_views`'s
    callers and the fine-tune's centre crop do.
    """
    if size > min(h, w):
        raise UserError(f"test crop {size} is larger than the decoded frames ({h}x{w})")
    cy, cx = (h - size) // 2, (w - size) // 2
    if crops == 1:
        return [(cy, cx)]
    if crops != 3:
        raise UserError(f"crops={crops}: 1 (centre) or 3 (both ends and the centre)")
    if w >= h:
        return [(cy, 0), (cy, cx), (cy, w - size)]
    return [(0, cx), (cy, cx), (h - size, cx)]


def normalise_views(x: torch.Tensor) -> torch.Tensor:
    """(..., T, S, S, 3) uint8 -> (..., 3, T, S, S) float32, scaled to [0, 1] and ImageNet-normalised."""
    y = x.movedim(-1, -4).float().div_(255.0)
    shape = (3, 1, 1, 1)
    return (y - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(IMAGENET_STD).view(shape)


# ----------------------------------------------------------------------------- the views of a protocol


@dataclass(frozen=True)
class ViewPlan:
    """Which views of each video are scored: clips (or segments) x crops, at the test geometry."""

    frames: int            # frames per clip (data.frames_per_clip); segments: the segment count
    stride: int            # raw frames between a clip's frames
    clips: int             # clips per video (1 with segment sampling)
    crops: int
    segments: int          # > 0: segment sampling
    short_side: int        # > 0: decode at this short side, aspect kept; 0: at ``frame_size``
    frame_size: tuple[int, int]
    crop: int              # side of the square crops

    @classmethod
    def of(cls, cfg: Config, clips: int, crops: int, segments: int = 0) -> "ViewPlan":
        """The plan from ``cfg`` (data.frames_per_clip / frame_stride / frame_size, eval.test_short_side,
        eval.test_crop, augment.out_size); UserError for a geometry that cannot hold the crops."""
        d, e = cfg.data, cfg.eval
        if clips < 1 or crops not in (1, 3) or segments < 0:
            raise UserError(f"test views: clips={clips} (>= 1), crops={crops} (1 or 3), segments={segments} (>= 0)")
        crop = e.test_crop or cfg.augment.out_size
        short = e.test_short_side or min(d.frame_size)
        if crop > short:
            raise UserError(f"test crop {crop} is larger than the test frames' short side {short} "
                            f"(eval.test_crop / augment.out_size vs eval.test_short_side / data.frame_size)")
        return cls(segments or d.frames_per_clip, d.frame_stride, 1 if segments else clips, crops, segments,
                   e.test_short_side, tuple(d.frame_size), crop)

    @property
    def views(self) -> int:
        return self.clips * self.crops

    def describe(self) -> str:
        """``"10x3"`` (clips x crops) or ``"16seg x1"`` (segments, crops)."""
        return f"{self.segments}seg x{self.crops}" if self.segments else f"{self.clips}x{self.crops}"

    def indices(self, rec: VideoRecord) -> list[list[int]]:
        if self.segments:
            return [segment_indices(rec, self.segments)]
        return clip_indices(rec, self.frames, self.stride, self.clips)

    def size(self, rec: VideoRecord) -> tuple[int, int]:
        """(H, W) decode size of ``rec``: short side ``short_side`` with its aspect ratio (rounded half up)."""
        s, h, w = self.short_side, rec.height, rec.width
        if not s:
            return self.frame_size
        if h <= 0 or w <= 0:                 # size unknown to the index: a square (the crops still fit)
            return s, s
        return (s, max(s, int(w * s / h + 0.5))) if h <= w else (max(s, int(h * s / w + 0.5)), s)

    def cut(self, frames: np.ndarray) -> torch.Tensor:
        """(clips, T, H, W, 3) uint8 decoded -> (clips * crops, 3, T, S, S) normalised views, clip-major."""
        _, _, h, w, _ = frames.shape
        s = self.crop
        x = torch.from_numpy(frames)
        parts = [x[:, :, y:y + s, c:c + s] for y, c in crop_boxes(h, w, s, self.crops)]
        return normalise_views(torch.stack(parts, 1).flatten(0, 1))


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_views(model: nn.Module, records: Sequence[VideoRecord], cfg: Config, device: torch.device | str, *,
                clips: int, crops: int, segments: int = 0,
                batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Softmax probabilities averaged over each video's test views.

    Args:
        model: maps (B, 3, T, S, S) -> (B, C) logits; run in eval mode (its mode is restored).
        records: labelled videos.
        cfg: the geometry (:meth:`ViewPlan.of`), data.decode_workers / pyav_workers, eval.batch_size.
        device: where the model runs (bf16 autocast on CUDA).
        clips, crops: views = clips x crops per video (clip sampling).
        segments: > 0: segment sampling, ``segments`` frames as one clip, views = crops.
        batch_size: views per forward (default ``max(eval.batch_size, 8)``).

    Returns:
        probs (N, C) float32, labels (N,) int64 of the N videos that decoded, in record order, and counts:
        "videos" (asked), "evaluated" (N), "failed" (did not decode: logged, not in probs),
        "failed_files" ([{"path", "reason"}]), "views_per_video", "views" (scored) and "views_desc".
    """
    plan = ViewPlan.of(cfg, clips, crops, segments)
    return run_views(model, records, cfg, device, plan, lambda z: torch.softmax(z.float(), 1), batch_size,
                     desc="test")


def run_views(model: nn.Module, records: Sequence[VideoRecord], cfg: Config, device: torch.device | str,
              plan: ViewPlan, head: Callable[[torch.Tensor], torch.Tensor], batch_size: int | None = None,
              desc: str = "test", what: str = "scores") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``head(model(view))`` averaged over each video's views of ``plan``: (means (N, D) float32, labels
    (N,) int64, counts) as in :func:`score_views`; the shared core of scores and retrieval features.
    ``desc`` labels the progress, ``what`` names the outputs in errors.

    Raises:
        UserError: no video decoded, or non-finite outputs (the weights or BatchNorm statistics are).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    bs = max(1, batch_size or max(cfg.eval.batch_size, 8))
    d = cfg.data
    failed: list[dict] = []
    labels: list[int] = []
    buf: list[torch.Tensor] = []
    owners: list[int] = []
    sums: list[torch.Tensor] = []

    def flush() -> None:
        x = torch.cat(buf).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = head(model(x)).float().cpu()
        for k, row in zip(owners, out):
            if k == len(sums):
                sums.append(row.clone())
            else:
                sums[k] += row
        buf.clear()
        owners.clear()

    decoded = iter_decoded(records, plan.indices, plan.size, d.decode_workers, lookahead=max(4, 4 * d.decode_workers),
                           processes=d.pyav_workers != "threads", desc=desc, failed=failed)
    try:
        for row, frames in decoded:
            if frames is None:
                continue
            views = plan.cut(frames)
            owners.extend([len(labels)] * len(views))
            labels.append(records[row].label)
            buf.append(views)
            if len(owners) >= bs:
                flush()
        if buf:
            flush()
    finally:
        model.train(was_training)
    return _finish(sums, labels, failed, records, plan, what)


def _finish(sums: list[torch.Tensor], labels: list[int], failed: list[dict], records: Sequence[VideoRecord],
            plan: ViewPlan, what: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Means, labels and counts; the failures summarised in one line; UserError when nothing is usable."""
    if failed:
        log.warning("%d of %d videos failed to decode and are not scored (first: %s)", len(failed), len(records),
                    failed[0]["path"])
    if not labels:
        raise UserError(f"none of {len(records)} videos could be decoded for evaluation"
                        + (f" (first failure: {failed[0]['path']}: {failed[0]['reason']})" if failed else ""))
    out = torch.stack(sums) / plan.views
    bad = int((~torch.isfinite(out).all(dim=1)).sum())
    if bad:    # a NaN output would rank and classify as if it were a number
        raise UserError(f"{bad} of {out.shape[0]} videos have non-finite (NaN/inf) {what}: the encoder's weights "
                        f"or BatchNorm statistics are not finite; evaluate an earlier checkpoint")
    counts = {"videos": len(records), "evaluated": len(labels), "failed": len(failed), "failed_files": failed,
              "views_per_video": plan.views, "views": len(labels) * plan.views, "views_desc": plan.describe()}
    return out, torch.tensor(labels, dtype=torch.int64), counts
