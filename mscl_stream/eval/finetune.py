"""Fine-tuning: R3D-18 from the pretrain checkpoint + dropout 0.5 + a linear head, trained end to end.

Recipe (docs/method.md, section 8; SSv2): SGD, step decay x0.1 at fixed epochs, gradient-norm clip.
Training clips are drawn at a random temporal position with a random spatial crop of
``augment.out_size`` from the working size and a random horizontal flip; testing uses the same
deterministic centred clips as the other evaluations (:mod:`mscl_stream.eval.features`), with the
logits averaged over ``test_clips`` clips. Everything random comes from one seeded generator drawn in
the main thread, so a run is repeatable on the same device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.errors import UserError
from mscl_stream.eval.features import ENCODER_PREFIX, build_r3d, extract_features, iter_decoded, normalise_clip
from mscl_stream.train.schedule import multistep_lr

log = logging.getLogger(__name__)


def random_indices(rec: VideoRecord, frames: int, stride: int, rng: np.random.Generator) -> list[list[int]]:
    """One clip at a uniformly random start in the usable range (short videos: clamped at the end)."""
    lo, hi = rec.start, rec.frame_end
    room = hi - lo - ((frames - 1) * stride + 1)
    s = lo + (int(rng.integers(0, room + 1)) if room > 0 else 0)
    return [[min(s + k * stride, hi - 1) for k in range(frames)]]


def _train_view(frames: np.ndarray, out_size: int, y: int, x: int, flip: bool) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, S, S) normalised clip cropped at (y, x), optionally mirrored."""
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, y:y + out_size, x:x + out_size]))
    if flip:
        crop = crop.flip(2)
    return normalise_clip(crop, out_size)


def finetune(checkpoint: str | None, train_records: Sequence[VideoRecord], test_records: Sequence[VideoRecord],
             cfg: Config, device: torch.device | str, *, epochs: int, lr: float, batch_size: int,
             momentum: float = 0.9, weight_decay: float = 1e-6, clip_grad: float = 40.0,
             milestones: Sequence[int] = (14, 18), gamma: float = 0.1, max_steps: int = 0,
             prefix: str = ENCODER_PREFIX, seed: int = 0, test_clips: int = 1) -> dict:
    """Fine-tune on ``train_records`` and report top-1 on ``test_records``.

    Args:
        checkpoint: pretrain checkpoint (None: random-init baseline).
        train_records, test_records: labelled videos (labels in [0, K), K = max train label + 1).
        cfg: clip geometry from data.frames_per_clip / frame_stride / frame_size / decode_workers and
            augment.out_size.
        device: where to train (bf16 autocast on CUDA, fp32 on CPU).
        epochs: passes over the training videos (one random clip per video per pass).
        lr: learning rate (already scaled for ``batch_size``).
        batch_size: clips per SGD step.
        momentum, weight_decay, clip_grad: SGD settings; ``clip_grad`` 0 disables clipping.
        milestones, gamma: lr is multiplied by ``gamma`` at each milestone epoch.
        max_steps: > 0 stops after that many steps (smoke runs).
        prefix: key prefix of the RGB encoder in the checkpoint's model state.
        seed: seeds the head init (and the trunk for the baseline) and all sampling.
        test_clips: centred clips per test video, logits averaged.

    Returns:
        ``{"top1": test accuracy, "train_top1": accuracy on the last epoch's training clips,
        "train_loss": its mean loss, "steps": SGD steps, "epochs": epochs run, "encoder": description}``.
    """
    device = torch.device(device)
    k = int(max(r.label for r in train_records)) + 1
    model, desc = build_r3d(checkpoint, prefix, seed=seed, num_classes=k, width=cfg.model.rgb_width)
    model.to(device)
    sgd = _SGDSteps(model, device, lr=lr, momentum=momentum, weight_decay=weight_decay, clip_grad=clip_grad)
    rng = np.random.default_rng(seed)
    epochs_run, train_acc, train_loss = 0, float("nan"), float("nan")
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if max_steps and sgd.steps >= max_steps:
            break
        sgd.set_lr(multistep_lr(lr, epoch, milestones, gamma))
        train_acc, train_loss = _train_epoch(sgd, train_records, cfg, rng, batch_size, max_steps)
        epochs_run += 1
        log.info("finetune epoch %d/%d: loss %.4f, train top-1 %.3f, lr %.4g, %d steps, %.0f s", epoch + 1,
                 epochs, train_loss, train_acc, sgd.lr, sgd.steps, time.perf_counter() - t0)

    model.eval()
    logits, test_labels = extract_features(model, test_records, cfg, device, clips=test_clips,
                                           batch_size=batch_size)
    top1 = float((logits.argmax(1) == test_labels).double().mean())
    return {"top1": top1, "train_top1": train_acc, "train_loss": train_loss, "steps": sgd.steps,
            "epochs": epochs_run, "encoder": desc}


class _SGDSteps:
    """The model, its SGD optimizer and the step count: one call of :meth:`step` is one SGD step."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, lr: float, momentum: float,
                 weight_decay: float, clip_grad: float):
        self.model, self.device, self.clip_grad = model, device, clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.use_bf16 = device.type == "cuda"
        self.steps = 0

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, clips: list[torch.Tensor], labels: list[int]) -> tuple[int, float]:
        """One step on a batch; returns (correct predictions, summed loss) of the batch."""
        x = torch.stack(clips).to(self.device, non_blocking=True)
        y = torch.tensor(labels, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.opt.step()
        self.steps += 1
        return int((logits.argmax(1) == y).sum()), float(loss.detach()) * len(labels)


def _train_epoch(sgd: _SGDSteps, records: Sequence[VideoRecord], cfg: Config, rng: np.random.Generator,
                 batch_size: int, max_steps: int) -> tuple[float, float]:
    """One pass over ``records`` in random order, one random view each; returns (train top-1, mean loss)."""
    d, out_size = cfg.data, cfg.augment.out_size
    h, w = d.frame_size
    order = [records[i] for i in rng.permutation(len(records))]
    # crop position and flip per video, drawn before decoding so the thread pool cannot reorder them
    ys = rng.integers(0, h - out_size + 1, len(order))
    xs = rng.integers(0, w - out_size + 1, len(order))
    flips = rng.random(len(order)) < 0.5
    index_fn = lambda r: random_indices(r, d.frames_per_clip, d.frame_stride, rng)  # noqa: E731
    sgd.model.train()
    clips, labels = [], []
    correct, seen, loss_sum = 0, 0, 0.0

    def step() -> None:
        nonlocal correct, seen, loss_sum, clips, labels
        right, loss = sgd.step(clips, labels)
        correct, seen, loss_sum = correct + right, seen + len(labels), loss_sum + loss
        clips, labels = [], []

    for row, frames in iter_decoded(order, index_fn, (h, w), d.decode_workers, lookahead=2 * batch_size):
        if frames is None:
            continue
        clips.append(_train_view(frames[0], out_size, int(ys[row]), int(xs[row]), bool(flips[row])))
        labels.append(order[row].label)
        if len(clips) == batch_size:
            step()
            if max_steps and sgd.steps >= max_steps:
                break
    if clips and not (max_steps and sgd.steps >= max_steps):
        step()
    if seen == 0:
        raise UserError(f"fine-tune: none of {len(order)} training videos could be decoded")
    return correct / seen, loss_sum / seen
