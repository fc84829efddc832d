"""Evaluation inputs: the R3D-18 encoder from a pretrain checkpoint, deterministic clips, pooled features.

Evaluation decodes with PyAV (any codec, CPU), so it runs wherever the manifest's videos are readable.
A clip is T = ``data.frames_per_clip`` frames ``data.frame_stride`` raw frames apart, decoded at the
working size ``data.frame_size``, centre-cropped to ``augment.out_size`` and ImageNet-normalised: the
same geometry and normalisation the RGB encoder saw in pretraining, without the random augmentation.

Checkpoint contract (models/mscl.py): the pretrain checkpoint's ``"model"`` entry is the MSCL
``state_dict``; the query RGB encoder is ``MSCL.rgb_encoder`` (an ``R3DBackbone`` that keeps
torchvision's names ``stem``, ``layer1`` .. ``layer4``), so its keys are ``rgb_encoder.<torchvision
r3d_18 key>``. The prefix is a parameter; a DDP ``module.`` prefix is accepted too. A checkpoint that is a
bare r3d_18 state dict (prefix ``""``) also loads. The trunk's width (``model.rgb_width``, 64 = torchvision's
r3d_18) is read from the checkpoint's stem; the random-init baseline uses the configured width.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from mscl_stream.augment import IMAGENET_MEAN, IMAGENET_STD
from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.errors import UserError
from mscl_stream.progress import Progress
from mscl_stream.models.r3d import WIDTH, r3d18, width_of
from mscl_stream.train.checkpoint import load_checkpoint, load_model_state

log = logging.getLogger(__name__)

ENCODER_PREFIX = "rgb_encoder."

# Clip index lists of one video: (clips, T) raw frame numbers.
IndexFn = Callable[[VideoRecord], list[list[int]]]


# ----------------------------------------------------------------------------- encoder


def encoder_state_from_checkpoint(path: str, prefix: str = ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """The query RGB encoder's weights from a pretrain checkpoint, as torchvision ``r3d_18`` keys (no fc).

    Raises:
        UserError: unreadable checkpoint, or no key under ``prefix`` (names the prefixes that exist).
    """
    state = load_checkpoint(path)
    sd = state.get("model", state)
    if not isinstance(sd, dict):
        raise UserError(f"{path}: checkpoint 'model' entry is not a state dict")
    for p in (prefix, "module." + prefix):
        sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and torch.is_tensor(v)}
        if sub:
            return {k: v for k, v in sub.items() if not k.startswith("fc.")}
    # Help the user: which prefixes hold an r3d stem?
    stems = sorted({k[: -len("stem.0.weight")] for k in sd if k.endswith("stem.0.weight")})
    raise UserError(f"{path}: no encoder weights under prefix {prefix!r} (r3d stems found under: "
                    f"{', '.join(repr(s) for s in stems) or 'none'})")


def check_finite_state(state: dict[str, torch.Tensor], where: str) -> None:
    """UserError naming the tensors of ``state`` that hold NaN or inf (weights of a diverged run)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{where}: {len(bad)} encoder tensors hold NaN/inf (e.g. {bad[0]}): the run diverged; "
                        f"evaluate an earlier checkpoint")


def build_r3d(checkpoint: str | None, prefix: str = ENCODER_PREFIX, seed: int = 0,
              num_classes: int | None = None, width: int = WIDTH) -> tuple[nn.Module, str]:
    """torchvision ``r3d_18`` with the checkpoint's trunk, or a seeded random init without one.

    Args:
        checkpoint: pretrain checkpoint path, or None for the random-init baseline.
        prefix: key prefix of the query RGB encoder inside ``state["model"]``.
        seed: seed of the random init (baseline, and the new head when ``num_classes`` is set).
        num_classes: None -> ``fc`` is an identity and the model returns (B, 8w) pooled features (512 at
            width 64); otherwise ``fc`` is dropout 0.5 + a fresh linear layer to ``num_classes`` (fine-tuning).
        width: trunk width of the random-init baseline (``model.rgb_width``); with a checkpoint the
            width is the checkpoint's own.

    Returns:
        (model on CPU, a short description for the results: "checkpoint:<path>" or "random-init(seed=N)").
    """
    torch.manual_seed(seed)
    state = encoder_state_from_checkpoint(checkpoint, prefix) if checkpoint else None
    if state is not None:
        check_finite_state(state, checkpoint)
    if state is not None and "stem.0.weight" in state:
        width = width_of(state)
    net = r3d18(width)
    net.fc = nn.Identity()
    if state is not None:
        load_model_state(net, state, what=f"{checkpoint} encoder")
        desc = f"checkpoint:{checkpoint}"
    else:
        desc = f"random-init(seed={seed})" + ("" if width == WIDTH else f", width {width}")
    if num_classes is not None:
        net.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(8 * width, num_classes))
    return net, desc


# ----------------------------------------------------------------------------- clips


def centred_indices(rec: VideoRecord, frames: int, stride: int, clips: int = 1) -> list[list[int]]:
    """Deterministic clip positions: ``clips`` clips evenly spread (one: centred) over the usable range.

    A clip spans ``(frames - 1) * stride + 1`` raw frames. In a video shorter than that the clip starts
    at the first usable frame and indices past the end are clamped to the last frame.

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


def normalise_clip(frames: torch.Tensor, out_size: int) -> torch.Tensor:
    """Centre crop and ImageNet normalisation.

    Args:
        frames: (T, H, W, 3) uint8 frames of one clip.
        out_size: side of the square centre crop.

    Returns:
        (3, T, out_size, out_size) float32 clip in R3D-18's input layout.
    """
    t, h, w, _ = frames.shape
    if min(h, w) < out_size:
        raise UserError(f"augment.out_size={out_size} is larger than the decoded frames ({h}x{w})")
    y, x = (h - out_size) // 2, (w - out_size) // 2
    crop = frames[:, y:y + out_size, x:x + out_size].permute(3, 0, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (crop - mean) / std


def _decode(decode_frames: Callable, rec: VideoRecord, clips: list[list[int]],
            size: tuple[int, int]) -> np.ndarray:
    """Decode every frame the clips need once; returns (clips, T, H, W, 3) uint8."""
    wanted = sorted({i for clip in clips for i in clip})
    # one FFmpeg thread per video: the pool already decodes several videos in parallel
    frames = np.asarray(decode_frames(rec.path, wanted, size=size, threads=1))
    if frames.shape[0] != len(wanted):
        raise UserError(f"{rec.path}: decoder returned {frames.shape[0]} of {len(wanted)} frames")
    pos = {f: j for j, f in enumerate(wanted)}
    return frames[[[pos[i] for i in clip] for clip in clips]]


def iter_decoded(records: Sequence[VideoRecord], index_fn: IndexFn, size: tuple[int, int],
                 threads: int = 2, lookahead: int = 16) -> Iterator[tuple[int, np.ndarray | None]]:
    """Decode clips of each record in a thread pool, yielding ``(row, frames)`` in record order.

    ``index_fn`` runs in the calling thread, in order, so seeded random clip positions stay
    deterministic. ``frames`` is (clips, T, H, W, 3) uint8, or None for a video that failed to decode
    (logged with its path; the caller counts it). At most ``lookahead`` videos are in flight.
    """
    # Imported here (not per video) so a broken install fails loudly instead of skipping every video.
    from mscl_stream.data.pyav_decode import decode_frames

    pending: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        rows = iter(range(len(records)))
        for i in rows:
            pending.append((i, pool.submit(_decode, decode_frames, records[i], index_fn(records[i]), size)))
            if len(pending) >= lookahead:
                break
        while pending:
            i, fut = pending.popleft()
            nxt = next(rows, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, decode_frames, records[nxt], index_fn(records[nxt]), size)))
            try:
                yield i, fut.result()
            except Exception as e:  # one bad video must not end an evaluation; it is counted
                log.warning("skipping %s: %s: %s", records[i].path, type(e).__name__,
                            (str(e).splitlines() or [""])[0][:200])
                yield i, None


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(encoder: nn.Module, records: Sequence[VideoRecord], cfg: Config,
                     device: torch.device | str, clips: int = 1,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled R3D-18 features of deterministic clips, averaged over ``clips`` clips per video.

    Args:
        encoder: maps (B, 3, T, S, S) -> (B, D) (e.g. :func:`build_r3d` without ``num_classes``).
        records: the videos; records that fail to decode are skipped with a warning.
        cfg: uses data.frames_per_clip, data.frame_stride, data.frame_size, data.decode_workers,
            data.batch_size and augment.out_size.
        device: where the encoder runs (bf16 autocast on CUDA).
        clips: clips per video (evenly spread; their features are averaged).
        batch_size: clips per forward (default ``max(data.batch_size, 8)``).

    Returns:
        feats: (N, D) float32 on CPU; labels: (N,) int64; N = videos decoded (= len(records) unless
        some were skipped).
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    d = cfg.data
    bs = max(1, batch_size or max(d.batch_size, 8))
    per_batch = max(1, bs // clips)
    index_fn = lambda r: centred_indices(r, d.frames_per_clip, d.frame_stride, clips)  # noqa: E731
    feats: list[torch.Tensor] = []
    labels: list[int] = []
    buf: list[torch.Tensor] = []
    buf_labels: list[int] = []
    progress = Progress(len(records), "features", unit="video", interval=10.0, plain=log.info)

    def flush() -> None:
        x = torch.stack(buf).to(device, non_blocking=True)          # (V*clips, 3, T, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = encoder(x)
        feats.append(f.float().view(-1, clips, f.shape[-1]).mean(1).cpu())
        labels.extend(buf_labels)
        buf.clear()
        buf_labels.clear()

    decoded = iter_decoded(records, index_fn, tuple(d.frame_size), d.decode_workers, lookahead=2 * bs)
    with progress:
        for done, (row, frames) in enumerate(decoded, 1):
            if frames is not None:
                buf.extend(normalise_clip(torch.from_numpy(c), cfg.augment.out_size) for c in frames)
                buf_labels.append(records[row].label)
                if len(buf_labels) >= per_batch:
                    flush()
            progress.update(done)
        if buf:
            flush()
    if not labels:
        raise UserError(f"none of {len(records)} videos could be decoded for evaluation")
    out = torch.cat(feats)
    bad = int((~torch.isfinite(out).all(dim=1)).sum())
    if bad:    # a NaN feature would rank and classify as if it were a number
        raise UserError(f"{bad} of {out.shape[0]} videos have non-finite (NaN/inf) features: the encoder's weights "
                        f"or BatchNorm statistics are not finite; evaluate an earlier checkpoint")
    return out, torch.tensor(labels, dtype=torch.int64)
