"""Evaluation inputs: the R3D-18 encoder from a pretrain checkpoint, deterministic clips, pooled features.

Evaluation decodes with PyAV (any codec, CPU) in worker processes (:mod:`mscl_stream.eval.decode`), so
it runs wherever the manifest's videos are readable. A clip is T = ``data.frames_per_clip`` frames
``data.frame_stride`` raw frames apart; its positions, the test geometry (by default the working size
``data.frame_size`` centre-cropped to ``augment.out_size``: what the RGB encoder saw in pretraining,
without the random augmentation), the short-video rule and the scoring of views live in
:mod:`mscl_stream.eval.views`.

Checkpoint contract (models/mscl.py): the pretrain checkpoint's ``"model"`` entry is the MSCL
``state_dict``; the query RGB encoder is ``MSCL.rgb_encoder`` (an ``R3DBackbone`` that keeps
torchvision's names ``stem``, ``layer1`` .. ``layer4``), so its keys are ``rgb_encoder.<torchvision
r3d_18 key>``. The prefix is a parameter; a DDP ``module.`` prefix is accepted too. A checkpoint that is a
bare r3d_18 state dict (prefix ``""``) also loads. The trunk's width (``model.rgb_width``, 64 = torchvision's
r3d_18) is read from the checkpoint's stem; the random-init baseline uses the configured width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.errors import UserError
from mscl_stream.eval.views import ViewPlan, normalise_views, run_views
from mscl_stream.models.r3d import WIDTH, r3d18, width_of
from mscl_stream.train.checkpoint import load_checkpoint, load_model_state

log = logging.getLogger(__name__)

ENCODER_PREFIX = "rgb_encoder."


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
    return normalise_views(frames[:, y:y + out_size, x:x + out_size])


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(encoder: nn.Module, records: Sequence[VideoRecord], cfg: Config,
                     device: torch.device | str, clips: int | None = None,
                     batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled R3D-18 features of deterministic clips, averaged over ``clips`` clips per video.

    The clips are :func:`mscl_stream.eval.views.clip_indices` at one centre crop of the test geometry
    (``ViewPlan``), decoded in the PyAV worker processes (:mod:`mscl_stream.eval.decode`).

    Args:
        encoder: maps (B, 3, T, S, S) -> (B, D) (e.g. :func:`build_r3d` without ``num_classes``).
        records: the videos; a video that fails to decode is logged, counted in one warning and left out.
        cfg: uses data.frames_per_clip, data.frame_stride, data.frame_size, data.decode_workers,
            data.pyav_workers, eval.test_short_side, eval.test_crop, eval.batch_size and augment.out_size.
        device: where the encoder runs (bf16 autocast on CUDA).
        clips: clips per video (evenly spread; their features are averaged); default eval.clips.
        batch_size: clips per forward (default ``max(eval.batch_size, 8)``).

    Returns:
        feats: (N, D) float32 on CPU; labels: (N,) int64; N = videos decoded (= len(records) unless
        some failed).
    """
    plan = ViewPlan.of(cfg, clips or cfg.eval.clips, crops=1)
    feats, labels, _ = run_views(encoder.to(device), records, cfg, device, plan, lambda f: f.float(),
                                 batch_size, desc="features", what="features")
    return feats, labels
