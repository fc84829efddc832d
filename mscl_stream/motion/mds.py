"""MDS, motion-based data sampling (docs/method.md, section 4): every score and start rule, in one place.

- clip scores of a video (:func:`mds_clip_scores`, from flows F_j = flow(raw 2j -> raw 2j + 8)) and
  the allowed starts above their median (:func:`mds_allowed_starts`, :func:`mds_video_starts`);
- ``index`` mode: the same per video file at index time (:func:`mds_starts_for_video`, wrapped as the
  picklable :class:`MDSScorer` that ``mscl-stream index --mds`` hands to the manifest builder);
- ``online`` mode: window scores of the K candidates of a sample on the training step's own flow
  (:func:`window_motion_scores`) and the pick of the best one (:func:`select_online_mds`).

Pure functions on tensors (any device), except the index-time part, which decodes files with PyAV.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.data.batch import ClipBatch
from mscl_stream.errors import UserError
from mscl_stream.motion.wheel import check_flow, compute_dtype, normalize_flow, wheel_encode_255

MDS_POOL = 28            # avgpool window and stride of the motion-boundary attention (section 4)
MDS_CLIP_STEPS = 8       # terms of a clip score, divisor of c_i
MDS_STEP = 4             # flow-index spacing of the terms of c_i


def motion_boundaries(flows: torch.Tensor) -> torch.Tensor:
    """Sobel motion boundary magnitude sqrt(Sx(u)^2 + Sy(u)^2 + Sx(v)^2 + Sy(v)^2), edge-replicated.

    Args:
        flows: (N, 2, H, W) raw flow.
    Returns:
        (N, H, W) float.
    """
    check_flow(flows, "flows", ndim=4)
    x = flows.to(compute_dtype(flows))
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
    check_flow(flows, "flows", ndim=4)
    h, w = flows.shape[-2:]
    if h < MDS_POOL or w < MDS_POOL:
        raise UserError(f"MDS needs flow frames of at least {MDS_POOL}x{MDS_POOL}, got {h}x{w}")
    pooled = F.avg_pool2d(motion_boundaries(flows).unsqueeze(1), MDS_POOL, MDS_POOL)
    att = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    peak = att.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, att / torch.where(peak > 0, peak, 1.0), 0.0)


def _weighted_wheel(flows: torch.Tensor) -> torch.Tensor:
    # W_j = A_j * V_j, V_j = integer colour wheel of the per-frame max-normalised flow: (N, 3, H, W)
    x = flows.to(compute_dtype(flows))
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
    check_flow(flows, "flows", ndim=4)
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


# ---------------------------------------------------------------------------------------------------
# MDS online: the candidate with the highest window score per sample.

@torch.no_grad()
def select_online_mds(batch: ClipBatch, flow_a: torch.Tensor) -> tuple[ClipBatch, torch.Tensor]:
    """Keep the candidate with the highest window motion score per sample (MDS ``online``).

    Args:
        batch: B*K rows, candidates of a sample adjacent (``batch.candidates`` = K).
        flow_a: (B*K, F, 2, H, W) raw pixel flow of window A of every row.
    Returns:
        (batch, flow_a) reduced to the kept rows: B rows, ``candidates`` = 1 (ties keep the first
        candidate). A batch with ``candidates`` = 1 comes back unchanged.
    """
    k = batch.candidates
    if k == 1:
        return batch, flow_a
    scores = window_motion_scores(flow_a).view(-1, k)           # (B, K)
    # torch.argmax returns the index of the first maximal value: ties keep the first candidate
    keep = scores.argmax(1) + torch.arange(0, batch.batch_size, k, device=scores.device)
    rows = {name: t if name == "flow_steps" else t.index_select(0, keep.to(t.device))
            for name, t in batch.tensors().items()}
    return ClipBatch(**rows, candidates=1), flow_a.index_select(0, keep)


# ---------------------------------------------------------------------------------------------------
# MDS at index time: flows F_j = flow(raw 2j -> raw 2j + 8), clip scores, allowed starts. Computed once
# per video with a cheap estimator; only the start list is kept.

MDS_SHORT_SIDE = 112      # flow resolution for scoring: both sides are multiples of 8
MDS_MAX_FRAMES = 9000     # longer ranges are not scored at index time (memory grows with the range)
_ESTIMATORS: dict[str, object] = {}


def mds_estimator(name: str):
    """The flow estimator used for MDS scoring, built once per process (CPU)."""
    if name not in _ESTIMATORS:
        from mscl_stream.flow import get_estimator   # imported where used: only indexing builds one here
        _ESTIMATORS[name] = get_estimator(name, device="cpu")
    return _ESTIMATORS[name]


def mds_size(height: int, width: int, short_side: int = MDS_SHORT_SIDE) -> tuple[int, int]:
    """(H, W) with the short side ``short_side`` and both sides rounded to multiples of 8."""
    scale = short_side / min(height, width)
    return (max(8, 8 * round(height * scale / 8)), max(8, 8 * round(width * scale / 8)))


def decode_resized(path: str | os.PathLike, start: int, end: int, size: tuple[int, int]) -> np.ndarray:
    """Raw frames start..end-1 resized to ``size`` = (H, W): (N, 3, H, W) uint8."""
    h, w = size
    out = []
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(st)):
            if i >= end:
                break
            if i >= start:
                out.append(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
    if not out:
        return np.zeros((0, 3, h, w), np.uint8)
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


def mds_starts_for_video(path: str | os.PathLike, estimator: str, start: int, end: int,
                         flow_gap: int = 8) -> list[int] | None:
    """Allowed MDS clip starts of one video as sorted absolute raw frame indices (``start`` + even).

    The range [start, end) is decoded at a small size (:func:`mds_size`) and scored by
    :func:`mds_video_starts` (flows F_j = flow(2j -> 2j + flow_gap), computed in batches). When
    every clip scores the same (a static video), no start is preferred and all scored starts are
    returned. The decoded range is held in memory, so ranges over ``MDS_MAX_FRAMES`` are not scored
    (returns None).
    """
    if end - start > MDS_MAX_FRAMES:
        return None
    with av.open(str(path)) as c:
        cc = c.streams.video[0].codec_context
        size = mds_size(cc.height, cc.width)
    frames = torch.from_numpy(decode_resized(path, start, end, size))
    starts = mds_video_starts(frames, mds_estimator(estimator), flow_gap=flow_gap)
    if not starts:      # all scores equal: the median rule prefers nothing, so every start is allowed
        starts = list(range(0, frames.shape[0] - flow_gap, 2))
    return [start + s for s in starts]


@dataclass(frozen=True)
class MDSScorer:
    """Index-time MDS of one video file, picklable so that probe worker processes can run it.

    ``scorer(path, start, end)`` is :func:`mds_starts_for_video` with this estimator and flow gap.
    """

    estimator: str = "dis_fast"
    flow_gap: int = 8

    @property
    def name(self) -> str:
        """What the index report records as the MDS estimator."""
        return self.estimator

    def prepare(self) -> None:
        """Build the estimator in this process now: an unknown name or a missing backend fails before probing."""
        mds_estimator(self.estimator)

    def __call__(self, path: str | os.PathLike, start: int, end: int) -> list[int] | None:
        return mds_starts_for_video(path, self.estimator, start, end, self.flow_gap)
