"""`mscl-stream pretrain`: the MSCL training loop, a :class:`Trainer` with a ``step()`` and a ``fit()``.

Config -> streaming loader -> in-batch flow -> augmentation + flow encoding -> MSCL -> SGD.
:func:`pretrain` opens a :class:`~mscl_stream.train.run.Run` (run folder and lock, resume point, stop
signals, checkpoints, metrics, progress: the machinery any training loop shares) and hands it a
:class:`Trainer`, which builds its parts once in its constructor, trains one batch in :meth:`Trainer.step`
and loops in :meth:`Trainer.fit`. The trainer is the run's :class:`~mscl_stream.train.run.TrainState`:
its checkpoints carry everything needed to resume exactly (model with momentum encoders and queues,
optimizer, scaler, every rank's loader position and RNGs, the counters). One process per GPU under
torchrun (DDP; gloo on CPU).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from mscl_stream.config import Config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import read_manifest
from mscl_stream.data.sampler import pretraining_records
from mscl_stream.distributed import DistInfo, init_distributed
from mscl_stream.errors import UserError
from mscl_stream.flow import estimator_from_config
from mscl_stream.train.checkpoint import CKPT_DIR, load_model_state, rng_state, set_rng_state
from mscl_stream.train.flops import estimate_flops_per_clip, mfu, peak_flops
from mscl_stream.train.flow_ahead import FlowFeed
from mscl_stream.train.guard import StepGuard
from mscl_stream.train.inputs import amp_dtype, autocast, make_inputs
from mscl_stream.train.metrics import Throughput
from mscl_stream.train.optim import build_optimizer
from mscl_stream.train.parts import Schedule, build_model, seed_everything, to_channels_last
from mscl_stream.train.run import Run
from mscl_stream.train.rundir import manifest_identity
from mscl_stream.train.timing import StageTimer

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses; a checkpoint was written before stopping."""


def pretrain(cfg: Config, loader=None, on_step=None) -> dict:
    """Run MSCL pretraining as configured; returns the final metrics (loss terms, throughput).

    Args:
        cfg: the validated configuration.
        loader: an iterable of ClipBatch to use instead of the streaming loader (benchmarks feed
            device-resident batches through it to measure the step without decode).
        on_step: optional ``on_step(step, model, batch)`` called after every optimiser step (tests,
            custom probes); ``model`` is the plain MSCL module.

    Raises:
        UserError: a problem with the configuration, the run folder, the data or a checkpoint (one line,
            before any training step), or a diverged run (after writing ``checkpoints/diverged.pt``).
        Interrupted: SIGINT/SIGTERM; a step checkpoint was written first.
    """
    dist = init_distributed(cfg.dist.backend, device=cfg.train.device)
    seed_everything(cfg.train.seed + dist.rank)
    if loader is None and not cfg.data.manifest:
        raise UserError("data.manifest: not set; pass data.manifest=PATH (a manifest written by `mscl-stream index`)")
    with Run(cfg, dist) as run:     # the folder is checked and locked before anything expensive
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        run.choose_resume(manifest_identity(cfg.data.manifest) if loader is None and dist.is_main else None)
        trainer = Trainer(cfg, dist, run, loader, on_step)
        try:
            return trainer.fit()
        finally:
            trainer.close()


class StepResult(NamedTuple):
    """What one step leaves for the bookkeeping after it (all device tensors: nothing read yet)."""

    batch: ClipBatch            # the batch trained on (online MDS keeps one of its candidate rows)
    losses: dict                # "loss" and the loss terms, 0-dim tensors without autograd graph
    ok: torch.Tensor            # 0-dim bool: the step was finite and changed the model
    grad_norm: torch.Tensor     # total gradient norm before clipping
    lr: float
    momentum: float


class Trainer:
    """MSCL pretraining: the parts of a run, built once; :meth:`step` trains a batch, :meth:`fit` loops.

    Implements :class:`~mscl_stream.train.run.TrainState` (``position``, ``state_dict``, ``rank_state``,
    ``load_state_dict``): ``run`` checkpoints and restores it.
    """

    def __init__(self, cfg: Config, dist: DistInfo, run: Run, loader=None, on_step=None) -> None:
        self.cfg, self.dist, self.run, self.on_step = cfg, dist, run, on_step
        self.device = device = dist.device
        # ---- data: the loader, and the flow of each batch
        # the index keeps videos shorter than one sample (evaluation uses them); pretraining skips them
        self.records = pretraining_records(read_manifest(cfg.data.manifest, cfg.data.split), cfg.data) \
            if loader is None else []
        self.own_loader = loader is None            # closed by close(): its threads / worker processes
        if loader is None:
            loader = build_loader(cfg, self.records, rank=dist.rank, world_size=dist.world_size, device=device)
        self.loader = loader
        self.estimator = estimator_from_config(cfg.flow, device)
        self.feed = FlowFeed(self.estimator, loader, device, ahead=cfg.train.flow_ahead)
        self.schedule = Schedule.from_config(cfg, len(loader), dist.world_size, len(self.records))
        # ---- model, optimizer, precision
        self.model, self.core, self.channels_last = build_model(cfg, dist)
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.opt = build_optimizer(cfg, self.params, self.schedule.base_lr)
        self.amp = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + dist.rank)
        # ---- counters, then the resume point's state (if any) over everything above
        self.global_step, self.epoch, self.bad_total, self.bad_streak = 0, 0, 0, 0
        run.restore(self)
        self.guard = StepGuard(self.core, self.opt if self.scaler is None else None, device, dist.world_size)
        # ---- measurement: stage times, model FLOPs (first step, GPU only), loss terms, throughput
        self.timer = StageTimer(device, warmup_steps=2)   # steps 0-1: captures, autotuning, the FLOP count
        self.peak = peak_flops(device)
        self.flops_per_clip: float | None = None
        self.last_terms: dict[str, float] = {}
        self._announce()
        run.begin(self.schedule.total, initial=self.global_step)
        self.meter = Throughput(self.schedule.global_batch)

    def step(self, batch: ClipBatch) -> StepResult:
        """One optimizer step on ``batch``: flow, views, forward + backward, the guarded update.

        Reads nothing back from the device: a non-finite loss or gradient skips the update on the
        device (:class:`StepGuard`), and the host learns of it a step or so later (:meth:`_account`).
        """
        cfg, guard, opt, timer = self.cfg, self.guard, self.opt, self.timer
        with timer("flow"):
            # MDS online keeps 1 of K rows; train.flow_ahead launches the next batch's flow here
            batch, flow_a, flow_b = self.feed.flow(batch, look_ahead=self.global_step + 1 < self.schedule.total)
        self.meter.wait(self.feed.take_ahead_wait())     # flow_ahead takes the next batch inside flow()
        with timer("motion_augment"):
            inputs = make_inputs(batch, flow_a, flow_b, cfg, self.aug_gen)
            if self.channels_last:
                inputs = to_channels_last(inputs)
        if self.flops_per_clip is None and self.peak is not None:
            self._count_flops(inputs)

        lr, m = self.schedule.lr(self.global_step), self.schedule.momentum(self.global_step)
        for g in opt.param_groups:
            g["lr"] = lr
        with timer("forward_backward"):
            guard.before_forward()
            with autocast(self.device, self.amp):
                terms = self.model(inputs)
            loss = terms["loss"]
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        with timer("optimizer"):
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            if cfg.optim.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.clip_grad)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            # one device-side verdict gates every update of this step (no host read here)
            ok = guard.check(loss, grad_norm if self.scaler is None else None)
            guard.optimizer_step(opt, ok, self.scaler)
            opt.zero_grad(set_to_none=True)
            self.core.momentum_update(m, ok)
            self.core.enqueue(terms["keys_rgb"], terms["keys_flow"], ok)
            guard.after_step(ok)
            # the loss terms without their autograd graph, freed here (not by whoever drops the result)
            losses = {k: v.detach() for k, v in terms.items() if torch.is_tensor(v) and v.dim() == 0}
            del terms, loss
        self.global_step += 1
        self.meter.step_done()
        return StepResult(batch, losses, ok, grad_norm, lr, m)

    def fit(self) -> dict:
        """Train from the resume point (or step 0) to the schedule's last step; ``last.pt``; the result.

        Per step: the batch (timed as data wait), :meth:`step`, the guard's late verdicts, ``on_step``,
        the metrics at logged steps, a stop request (checkpoint, Interrupted), periodic checkpoints.
        """
        total, every, ckpt_every = self.schedule.total, self.cfg.log.every, self.cfg.train.ckpt_every
        mid_epoch = self.run.resume_path is not None   # a resumed loader continues its epoch where it stopped
        while self.global_step < total:
            if not mid_epoch:
                self.loader.set_epoch(self.epoch)
            mid_epoch, epoch_done = False, False
            self.feed.start(iter(self.loader))
            while self.global_step < total:
                self.timer.begin_step()          # CUDA events, no device sync: every step is timed
                batch = self._next_batch()
                if batch is None:
                    self.timer.abandon_step()    # the end-of-epoch probe is no training step
                    epoch_done = True
                    break
                res = self.step(batch)
                self._account(self.guard.publish(res.ok, self.global_step))
                if self.on_step is not None:
                    self.on_step(self.global_step, self.core, res.batch)
                logged = self.global_step % every == 0 or self.global_step == total
                if logged:
                    self._log(res)
                else:
                    self.run.tick(self.global_step)
                if self.run.should_stop(logged):
                    raise self.run.interrupted(self.global_step, self.checkpoint("step"))
                if ckpt_every and self.global_step % ckpt_every == 0:
                    self.checkpoint("step")
            if epoch_done:
                self.epoch += 1
        return self._finish()

    # ---------------------------------------------------------------- the run's TrainState
    def position(self) -> dict:
        return {"step": self.global_step, "epoch": self.epoch, "bad_total": self.bad_total}

    def state_dict(self) -> dict:
        return {"model": self.core.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "flow": self.estimator.describe()}

    def rank_state(self) -> dict:
        # the loader's position as of the batch the last step trained on (flow_ahead reads one further)
        return {"loader": self.feed.loader_state(), "rng": rng_state(), "aug_rng": self.aug_gen.get_state()}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        load_model_state(self.core, state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        self.aug_gen.set_state(rank_state["aug_rng"])
        self.global_step, self.epoch, self.bad_total = state["step"], state["epoch"], state.get("bad_total", 0)

    def checkpoint(self, tag: str) -> Path | None:
        """Write checkpoint ``tag`` once the guard's pending verdicts are counted (collective; path on rank 0)."""
        self._account(self.guard.flush())
        return self.run.checkpoint(tag, self)

    def close(self) -> None:
        """Stop the loader this trainer built (threads, worker processes); idempotent."""
        if self.own_loader:
            self.own_loader = False
            self.loader.close()

    # ---------------------------------------------------------------- helpers of fit() and step()
    def _next_batch(self) -> ClipBatch | None:
        t0 = time.perf_counter()
        with self.timer("data_wait"):
            batch = self.feed.next_batch()
        self.meter.wait(time.perf_counter() - t0)
        return batch

    def _count_flops(self, inputs) -> None:
        """Model FLOPs of one clip (first step, where the peak is known): one extra forward + backward
        that leaves nothing behind."""
        self.guard.before_forward()     # the extra pass must not move BN statistics (exact resume)
        with torch.compiler.set_stance("force_eager"):   # count the modules, not a compile
            self.flops_per_clip = estimate_flops_per_clip(self.core, inputs, self.amp)
        self.guard.after_step(torch.zeros((), dtype=torch.bool, device=self.device))
        self.opt.zero_grad(set_to_none=True)

    def _account(self, results: list[tuple[int, bool]]) -> None:
        """Count the guard's verdicts as they reach the host; stop after too many bad steps in a row."""
        for at, good in results:
            if good:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            self.bad_total += 1
            log.warning("step %d: non-finite loss or gradients (%d in a row, %d total); step skipped, "
                        "weights kept", at, self.bad_streak, self.bad_total)
            if self.bad_streak >= self.cfg.train.max_bad_steps:
                self.checkpoint("diverged")
                raise TrainingDiverged(
                    f"{self.bad_streak} non-finite steps in a row at step {at}; the last finite weights are in "
                    f"{self.run.out / CKPT_DIR / 'diverged.pt'} (lower optim.lr or use train.amp=fp32)")

    def _log(self, res: StepResult) -> None:
        """A logged step's metrics record and progress line (the host reads the loss terms here)."""
        elapsed, rate, wait_share = self.meter.window()
        self.last_terms = {k: float(v) for k, v in res.losses.items()}
        rec = {"step": self.global_step, "epoch": self.epoch, "run_id": self.run.run_id, "lr": res.lr,
               "momentum": res.momentum, "clips_per_s": rate, "data_wait_share": wait_share,
               **{f"loss/{k}": v for k, v in self.last_terms.items()}, **self.timer.summary()}
        if res.grad_norm is not None:
            rec["grad_norm"] = float(res.grad_norm)
        if self.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.flops_per_clip and self.peak:
            rec["mfu"] = mfu(self.flops_per_clip, rate / self.dist.world_size, self.peak)
        loss = self.last_terms.get("loss", math.nan)
        self.run.report(self.global_step, rec, rate=rate, elapsed=elapsed,
                        notes=(f"data wait {100 * wait_share:.0f}%", f"loss {loss:.4f}"))

    def _announce(self) -> None:
        if not self.dist.is_main:
            return
        cfg, sch = self.cfg, self.schedule
        source = f"{len(self.records)} videos" if self.records else f"loader {type(self.loader).__name__}"
        log.info("pretrain run %s: %s, %d steps/epoch, %d steps, global batch %d, lr %.4g, flow %s, amp %s, "
                 "device %s", self.run.run_id, source, sch.steps_per_epoch, sch.total, sch.global_batch,
                 sch.base_lr, cfg.flow.estimator, self.amp or "fp32", self.device)

    def _finish(self) -> dict:
        """After the last step: ``last.pt``, the loader closed, the final record and picture; the result."""
        self.run.progress.close()
        self.checkpoint("last")
        elapsed = self.meter.elapsed()
        self.close()                    # before reading its stats: its producer's last counts are in
        result = {"steps": self.global_step, "epochs": self.epoch, "clips_per_s": self.meter.rate(elapsed),
                  "skipped_steps": self.bad_total, "loader": getattr(self.loader, "stats", {}),
                  "step_end_seconds": self.meter.step_ends, "stage_seconds": self.timer.totals(),
                  "stage_timing": self.timer.report(), **{f"loss/{k}": v for k, v in self.last_terms.items()},
                  # model FLOPs of one clip's forward + backward and the device's bf16 peak: callers that
                  # measure a steady-state rate (bench) turn them into MFU; None where unknown (CPU)
                  "flops_per_clip": self.flops_per_clip, "peak_flops": self.peak,
                  "gpu_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30
                  if self.device.type == "cuda" else None,
                  "run_id": self.run.run_id}
        self.run.finish(result)
        if self.dist.is_main:
            log.info("done: run %s, %d steps in %.1f s (%.2f clips/s); checkpoint %s", self.run.run_id,
                     self.global_step, elapsed, result["clips_per_s"], self.run.out / CKPT_DIR / "last.pt")
        return result
