"""Fine-tuning's training state: R3D-18 from the pretrain checkpoint + dropout 0.5 + a linear head.

:class:`FinetuneLoop` is a :class:`~mscl_stream.train.run.TrainState`: the run machinery
(:class:`~mscl_stream.train.run.Run`: folder lock, resume, stop signals, checkpoints, progress, metrics)
checkpoints and restores it; :mod:`mscl_stream.eval.finetune_run` drives it.

Training views: clip sampling (one clip of ``data.frames_per_clip`` frames ``data.frame_stride`` apart at
a uniformly random position) or segment sampling (``eval.segments`` equal segments over the whole video,
one random frame each), decoded at ``data.frame_size`` in the pretraining loader's PyAV worker processes
as validation and test are (:mod:`mscl_stream.eval.decode`), then a random resized crop (area fraction
``eval.crop_scale``, aspect ratio ``eval.crop_ratio``, the torchvision / MMAction defaults) resized to
``eval.train_size`` and a horizontal flip with probability 0.5.

Exact resume: everything random in an epoch (its order, clip positions, crop boxes, flips) is drawn
up front from generators seeded by (seed, epoch) and (seed, epoch, rank), so a resumed run rebuilds the
epoch's plan and skips the batches already trained; dropout's torch RNG travels in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.distributed import DistInfo
from mscl_stream.errors import UserError
from mscl_stream.eval.decode import iter_decoded
from mscl_stream.eval.features import build_r3d, normalise_clip
from mscl_stream.train.checkpoint import rng_state, set_rng_state


def random_indices(rec: VideoRecord, frames: int, stride: int, rng: np.random.Generator) -> list[list[int]]:
    """One clip at a uniformly random start in the usable range (short videos: clamped at the end)."""
    lo, hi = rec.start, rec.frame_end
    room = hi - lo - ((frames - 1) * stride + 1)
    s = lo + (int(rng.integers(0, room + 1)) if room > 0 else 0)
    return [[min(s + k * stride, hi - 1) for k in range(frames)]]


def resized_crop_box(rng: np.random.Generator, h: int, w: int, scale: Sequence[float],
                     ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(y, x, height, width) of a random resized crop, torchvision's rule: up to 10 tries at a random area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the central crop of the whole
    frame clamped to ``ratio``."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_view(frames: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) normalised clip: the box resized (bilinear), optionally mirrored."""
    y, x, ch, cw = box
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, y:y + ch, x:x + cw])).permute(0, 3, 1, 2).float()
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    crop = crop.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if flip:
        crop = crop.flip(2)
    return normalise_clip(crop, size)


@dataclass
class Planned:
    """One training video of an epoch: its frames and its augmentation, drawn before any decoding."""

    record: VideoRecord
    indices: list[list[int]]
    box: tuple[int, int, int, int]
    flip: bool


def epoch_plan(records: Sequence[VideoRecord], cfg: Config, epoch: int, rank: int = 0,
               world: int = 1) -> list[Planned]:
    """This rank's videos of ``epoch`` in training order with their views.

    The order is one permutation shared by all ranks (padded by wrapping to a multiple of ``world``),
    each rank taking every ``world``-th video; the views come from a generator of (seed, epoch, rank).
    """
    seed = cfg.train.seed
    order = list(np.random.default_rng([seed, epoch]).permutation(len(records)))
    order += order[:(-len(order)) % world]
    mine = [records[i] for i in order[rank::world]]
    rng = np.random.default_rng([seed, epoch, rank + 1])
    d, e = cfg.data, cfg.eval
    h, w = d.frame_size
    if e.segments > 0:
        from mscl_stream.eval.views import segment_indices
    plan = []
    for rec in mine:
        if e.segments > 0:
            idx = [segment_indices(rec, e.segments, rng)]
        else:
            idx = random_indices(rec, d.frames_per_clip, d.frame_stride, rng)
        box = resized_crop_box(rng, h, w, e.crop_scale, e.crop_ratio)
        plan.append(Planned(rec, idx, box, bool(rng.random() < 0.5)))
    return plan


class FinetuneLoop:
    """The fine-tuned network, its SGD optimizer and where training stands (a ``TrainState``).

    Args:
        cfg: data geometry, ``eval`` (batch, lr, weight decay, clip, crop), ``optim.momentum``, ``train.seed``.
        dist: this process's place in the job; the network is DDP-wrapped when there are several ranks.
        checkpoint: pretrain checkpoint (None: the seeded random-init baseline).
        records: the training videos; ``num_classes`` the head's width.
        lr: the learning rate at epoch 0 (already scaled for ``eval.batch_size``).
    """

    def __init__(self, cfg: Config, dist: DistInfo, checkpoint: str | None, records: Sequence[VideoRecord],
                 num_classes: int, lr: float, prefix: str) -> None:
        e = cfg.eval
        if e.batch_size % dist.world_size:
            raise UserError(f"eval.batch_size={e.batch_size}: must be a multiple of the {dist.world_size} ranks")
        self.cfg, self.dist, self.records, self.device = cfg, dist, list(records), dist.device
        self.batch = e.batch_size // dist.world_size            # clips per rank per step
        self.size = e.train_size or cfg.augment.out_size
        core, self.desc = build_r3d(checkpoint, prefix, seed=cfg.train.seed, num_classes=num_classes,
                                    width=cfg.model.rgb_width)
        self.core = core.to(self.device)
        self.model = self.core if dist.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=cfg.optim.momentum, weight_decay=e.weight_decay)
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.stats = {"correct": 0, "seen": 0, "loss_sum": 0.0}      # this epoch's training clips so far
        self.best = {"top1": -1.0, "epoch": 0}
        self.history: list[dict] = []                              # one record per finished epoch

    @property
    def steps_per_epoch(self) -> int:
        per_rank = -(-len(self.records) // self.dist.world_size)
        return -(-per_rank // self.batch)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ TrainState
    def position(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch_index}

    def state_dict(self) -> dict:
        return {"model": self.core.state_dict(), "optimizer": self.opt.state_dict(), "stats": dict(self.stats),
                "best": dict(self.best), "history": list(self.history)}

    def rank_state(self) -> dict:
        return {"rng": rng_state()}          # dropout draws from torch's global generator

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        self.core.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.stats, self.best, self.history = dict(state["stats"]), dict(state["best"]), list(state["history"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch"]
        set_rng_state(rank_state["rng"])

    # ------------------------------------------------------------------ training
    def train_batches(self) -> Iterator[int]:
        """Train this epoch's remaining batches, yielding the step count after each SGD step."""
        plan = epoch_plan(self.records, self.cfg, self.epoch, self.dist.rank, self.dist.world_size)
        plan = plan[self.batch_index * self.batch:]
        todo = iter(p.indices for p in plan)
        d = self.cfg.data
        # the validation and test passes' decode path: the loader's PyAV worker processes (or threads)
        decoded = iter_decoded([p.record for p in plan], lambda _r: next(todo), tuple(d.frame_size),
                               d.decode_workers, lookahead=2 * self.batch, processes=d.pyav_workers != "threads")
        self.model.train()
        clips, labels = [], []
        for row, frames in decoded:
            if frames is not None:      # a video that fails to decode is logged by iter_decoded and left out
                p = plan[row]
                clips.append(train_view(frames[0], p.box, self.size, p.flip))
                labels.append(p.record.label)
            if (row + 1) % self.batch == 0 or row + 1 == len(plan):
                self._sgd_step(clips, labels)
                clips, labels = [], []
                yield self.step

    def _sgd_step(self, clips: list[torch.Tensor], labels: list[int]) -> None:
        if not clips:
            raise UserError(f"fine-tune: no video of batch {self.batch_index} of epoch {self.epoch} could be decoded")
        x = torch.stack(clips).to(self.device, non_blocking=True)
        y = torch.tensor(labels, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.eval.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.eval.clip_grad)
        self.opt.step()
        self.step += 1
        self.batch_index += 1
        self.stats["correct"] += int((logits.argmax(1) == y).sum())
        self.stats["seen"] += len(labels)
        self.stats["loss_sum"] += float(loss.detach()) * len(labels)

    def end_epoch(self, lr: float) -> dict:
        """Close the epoch: its training record (top-1, mean loss, lr), counters reset for the next."""
        s = self.stats
        rec = {"epoch": self.epoch + 1, "step": self.step, "lr": lr,
               "train_top1": s["correct"] / max(1, s["seen"]), "train_loss": s["loss_sum"] / max(1, s["seen"])}
        self.epoch, self.batch_index = self.epoch + 1, 0
        self.stats = {"correct": 0, "seen": 0, "loss_sum": 0.0}
        return rec
