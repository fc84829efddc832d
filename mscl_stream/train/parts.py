"""The pretraining run's parts that are built from the config: seeds, the model, the step schedule.

The trainer (:mod:`mscl_stream.train.trainer`) builds them once, in its constructor, with the loader,
the flow feed, the optimizer and the guard.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mscl_stream.config import Config
from mscl_stream.distributed import DistInfo
from mscl_stream.errors import UserError
from mscl_stream.models.mscl import MSCL, MSCLInputs, momentum_at
from mscl_stream.train.schedule import lr_at, scaled_lr


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, dist: DistInfo) -> tuple[torch.nn.Module, MSCL, bool]:
    """(the module the step calls, DDP-wrapped across ranks; the plain MSCL; whether inputs go channels-last).

    The plain module is the one for momentum updates, queues and checkpoints. ``train.compile`` compiles
    the encoders, neck and heads; losses, queues and EMA stay eager (``MSCL.compile_encoders``).
    """
    device = dist.device
    core = MSCL(cfg).to(device)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    if channels_last:
        core = core.to(memory_format=torch.channels_last_3d)
    model: torch.nn.Module = core
    if dist.world_size > 1:
        unused = any(w == 0 for w in cfg.loss.weights.values())
        model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=unused)
    if cfg.train.compile:
        core.compile_encoders()
    return model, core, channels_last


def to_channels_last(inputs: MSCLInputs) -> MSCLInputs:
    """The model inputs with every 5-d tensor in ``channels_last_3d`` memory format."""
    def cl(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x
    return type(inputs)(**{k: cl(v) for k, v in vars(inputs).items()})


@dataclass(frozen=True)
class Schedule:
    """How long the run is, and its learning rate and key-encoder momentum at each step.

    Both are plain functions of the step counter, so a resumed run follows the same schedule without
    any schedule state in its checkpoints.
    """

    steps_per_epoch: int
    total: int             # optimizer steps of the whole run
    warmup: int            # steps of linear learning-rate warm-up
    global_batch: int      # clips per step over all ranks
    base_lr: float         # the peak learning rate, scaled for the global batch
    base_momentum: float   # the key encoders' momentum at step 0 (model.momentum)

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, world_size: int, videos: int) -> "Schedule":
        """The schedule of ``cfg`` for a loader of ``steps_per_epoch`` batches (``videos`` for the error)."""
        if steps_per_epoch == 0:
            raise UserError(f"data.batch_size: {cfg.data.batch_size} is larger than this rank's share of "
                            f"{videos} videos x {cfg.data.clips_per_video} clips")
        total = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        global_batch = cfg.data.batch_size * world_size
        return cls(steps_per_epoch=steps_per_epoch, total=total,
                   warmup=int(cfg.optim.warmup_epochs * steps_per_epoch), global_batch=global_batch,
                   base_lr=scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch),
                   base_momentum=cfg.model.momentum)

    def lr(self, step: int) -> float:
        """Learning rate of the step about to be taken (0-based): warm-up, then half-cosine to 0."""
        return lr_at(step, self.total, self.base_lr, self.warmup)

    def momentum(self, step: int) -> float:
        """Key-encoder momentum of the step about to be taken, by clips seen (``models.mscl.momentum_at``)."""
        return momentum_at(step * self.global_batch, self.total * self.global_batch, self.base_momentum)
