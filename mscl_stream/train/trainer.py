"""`mscl-stream pretrain`: the MSCL training loop, one readable function.

Config -> streaming loader -> in-batch flow -> augmentation + flow encoding -> MSCL -> SGD.
One process per GPU under torchrun (DDP; gloo on CPU); checkpoints carry everything needed to resume
exactly (model with momentum encoders and queues, optimizer, scaler, loader/sampler position, RNGs).
Which checkpoint a start resumes from is decided in :mod:`mscl_stream.train.resume`; SIGINT/SIGTERM
are turned into a checkpoint at a step boundary by :mod:`mscl_stream.train.signals`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from mscl_stream.config import Config, dump_config, to_dict
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import read_manifest
from mscl_stream.errors import Interrupted, UserError
from mscl_stream.progress import Progress
from mscl_stream.models.mscl import MSCL, momentum_at
from mscl_stream.train.checkpoint import (link_checkpoint, load_model_state, rng_state, save_checkpoint,
                                          save_step_checkpoint, set_rng_state)
from mscl_stream.train.guard import StepGuard
from mscl_stream.train.resume import changed_settings, resume_point
from mscl_stream.train.rundir import manifest_identity, new_run_id, open_run_dir
from mscl_stream.train.signals import StopSignals, should_stop
from mscl_stream.distributed import all_gather_objects, cleanup, init_distributed
from mscl_stream.train.flops import estimate_flops_per_clip, mfu, peak_flops
from mscl_stream.train.metrics import MetricsLogger, format_progress
from mscl_stream.train.timing import StageTimer
from mscl_stream.train.schedule import lr_at, scaled_lr
from mscl_stream.flow import estimator_from_config
from mscl_stream.train.flow_ahead import FlowFeed
from mscl_stream.train.optim import build_optimizer
from mscl_stream.train.plot import plot_run_or_warn
from mscl_stream.train.inputs import amp_dtype, autocast, make_inputs

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses; a checkpoint was written before stopping."""


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    if cfg.train.overwrite and cfg.train.resume:
        raise UserError("train.overwrite: cannot be combined with --resume (overwrite starts the run anew)")
    # The run folder is checked and locked before anything expensive; a refusal on rank 0 stops every rank.
    run, err = None, None
    if dist.is_main:
        try:
            run = open_run_dir(cfg.train.out_dir, resume=bool(cfg.train.resume), overwrite=cfg.train.overwrite)
        except UserError as e:
            err = str(e)
    errors = [e for e in all_gather_objects(err) if e]
    if errors:
        cleanup()
        raise UserError(errors[0])
    try:
        with StopSignals() as signals:
            return _pretrain(cfg, dist, run, loader, on_step, signals)
    finally:
        if run is not None:
            run.release()


def _pretrain(cfg: Config, dist, run, loader, on_step, signals: StopSignals) -> dict:
    device = dist.device
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.train.out_dir)
    manifest_id = manifest_identity(cfg.data.manifest) if loader is None and dist.is_main else None

    # ---- which checkpoint to resume (rank 0 decides; every rank loads the same file)
    ckpt_path, state = resume_point(cfg, dist, run, out, manifest_id)
    run_id = ((state or {}).get("run_id") or new_run_id()) if dist.is_main else None

    # ---- data, flow, model, optimiser
    records = read_manifest(cfg.data.manifest, cfg.data.split) if loader is None else []
    own_loader = loader is None           # closed here at the end (its threads / worker processes)
    if own_loader:
        loader = build_loader(cfg, records, rank=dist.rank, world_size=dist.world_size, device=device)
    estimator = estimator_from_config(cfg.flow, device)
    feed = FlowFeed(estimator, loader, device, ahead=cfg.train.flow_ahead)   # batches with their flow
    model = MSCL(cfg).to(device)
    use_cl = cfg.train.channels_last and device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=torch.channels_last_3d)
    core = model  # the plain module: momentum updates, queues, checkpoints
    if dist.world_size > 1:
        unused = any(w == 0 for w in cfg.loss.weights.values())
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=unused)
    if cfg.train.compile:     # encoders, neck, heads; losses, queues, EMA stay eager (MSCL.compile_encoders)
        core.compile_encoders()
    params = [p for p in core.parameters() if p.requires_grad]
    global_batch = cfg.data.batch_size * dist.world_size
    base_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch)
    opt = build_optimizer(cfg, params, base_lr)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    aug_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + dist.rank)

    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} is larger than this rank's share of "
                        f"{len(records)} videos x {cfg.data.clips_per_video} clips")
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    step, epoch, bad_streak, bad_total = 0, 0, 0, 0

    # ---- resume
    if state is not None:
        load_model_state(core, state["model"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if len(state["ranks"]) != dist.world_size:
            raise UserError(f"train.resume: checkpoint was written by {len(state['ranks'])} ranks, this run has "
                            f"{dist.world_size}; resume with the same number of processes")
        mine = state["ranks"][dist.rank]
        loader.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
        aug_gen.set_state(mine["aug_rng"])
        step, epoch, bad_total = state["step"], state["epoch"], state.get("bad_total", 0)
        if dist.is_main:
            log.info("resumed from %s at step %d (epoch %d), run %s", ckpt_path, step, epoch,
                     state.get("run_id", "(unrecorded)"))
    elif cfg.train.resume == "auto" and dist.is_main:
        log.info("resume=auto: no checkpoint in %s, starting run %s", out, run_id)
    guard = StepGuard(core, opt if scaler is None else None, device, dist.world_size)

    step_file: dict = {}      # the latest step checkpoint: its (step, epoch, bad_total) and path

    def checkpoint(tag: str) -> Path | None:
        # Every rank contributes its loader position and RNG states (one list entry per rank); rank 0 writes.
        per_rank = all_gather_objects({"loader": feed.loader_state(), "rng": rng_state(),
                                       "aug_rng": aug_gen.get_state()})
        if not dist.is_main:
            return None
        named = out / "checkpoints" / f"{tag}.pt"
        if tag == "last" and step_file.get("at") == (step, epoch, bad_total) and \
                link_checkpoint(step_file["path"], named):
            return named      # the run ended on a step checkpoint: the same state, not written twice
        ckpt = {"model": core.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "ranks": per_rank,
                "step": step, "epoch": epoch, "bad_total": bad_total, "config": to_dict(cfg),
                "flow": estimator.describe(), "run_id": run_id, "manifest": manifest_id}
        if tag == "step":
            path = save_step_checkpoint(out, step, ckpt, keep=cfg.train.keep_checkpoints)
            step_file.update(at=(step, epoch, bad_total), path=path)
            return path
        return save_checkpoint(named, ckpt)

    def account(results: list[tuple[int, bool]]) -> None:
        # Host view of the guard's verdicts (a step or so late on a GPU); stop after too many in a row.
        nonlocal bad_streak, bad_total
        for at, good in results:
            if good:
                bad_streak = 0
                continue
            bad_streak += 1
            bad_total += 1
            log.warning("step %d: non-finite loss or gradients (%d in a row, %d total); step skipped, "
                        "weights kept", at, bad_streak, bad_total)
            if bad_streak >= cfg.train.max_bad_steps:
                account(guard.flush())
                checkpoint("diverged")
                raise TrainingDiverged(
                    f"{bad_streak} non-finite steps in a row at step {at}; the last finite weights are in "
                    f"{out / 'checkpoints' / 'diverged.pt'} (lower optim.lr or use train.amp=fp32)")

    if dist.is_main:   # the folder becomes this run's only now: a start that failed above left it empty
        run.claim(run_id, cfg.train.seed, manifest_id)
        dump_config(cfg, out / "config.yaml")
    metrics = MetricsLogger(out, is_main=dist.is_main, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl)
    timer = StageTimer(device, warmup_steps=2)   # steps 0-1: captures, autotuning, the FLOP count
    peak = peak_flops(device)
    flops_per_clip = None
    if dist.is_main:
        source = f"{len(records)} videos" if records else f"loader {type(loader).__name__}"
        log.info("pretrain run %s: %s, %d steps/epoch, %d steps, global batch %d, lr %.4g, flow %s, amp %s, "
                 "device %s", run_id, source, steps_per_epoch, total, global_batch, base_lr, cfg.flow.estimator,
                 dtype or "fp32", device)
        if state is not None:
            changed = changed_settings(state, cfg)
            if changed:
                log.warning("resume: settings changed since the checkpoint: %s", "; ".join(changed))
                metrics.log({"step": step, "run_id": run_id, "resume_changes": changed})
    t_start, clips_done, last_terms, step_ends = time.perf_counter(), 0, {}, []
    t_window, wait_window = t_start, 0.0   # data-wait share of the steps since the last logged one
    # a bar on a terminal (stderr), else the step line below at logged steps (stdout)
    progress = Progress(total, "pretrain", unit="step", initial=step, interval=None,
                        plain=lambda s: print(s, flush=True), enabled=dist.is_main)

    # ---- the loop
    mid_epoch = ckpt_path is not None  # a resumed loader continues its epoch where it stopped
    while step < total:
        if not mid_epoch:
            loader.set_epoch(epoch)
        mid_epoch, epoch_done = False, False
        feed.start(iter(loader))
        while step < total:
            timer.begin_step()   # CUDA events, no device sync: every step is timed
            t_wait = time.perf_counter()
            with timer("data_wait"):
                batch = feed.next_batch()
            wait_window += time.perf_counter() - t_wait
            if batch is None:
                timer.abandon_step()          # the end-of-epoch probe is no training step
                epoch_done = True
                break
            with timer("flow"):
                # MDS online keeps 1 of K rows; train.flow_ahead launches the next batch's flow here
                batch, flow_a, flow_b = feed.flow(batch, look_ahead=step + 1 < total)
            wait_window += feed.take_ahead_wait()   # flow_ahead takes the next batch inside flow()
            with timer("motion_augment"):
                inputs = make_inputs(batch, flow_a, flow_b, cfg, aug_gen)
                if use_cl:
                    inputs = type(inputs)(**{k: _channels_last(v) for k, v in vars(inputs).items()})
            if flops_per_clip is None and peak is not None:
                guard.before_forward()     # the extra pass must not move BN statistics (exact resume)
                with torch.compiler.set_stance("force_eager"):   # count the modules, not a compile
                    flops_per_clip = estimate_flops_per_clip(core, inputs, dtype)  # one extra fwd+bwd
                guard.after_step(torch.zeros((), dtype=torch.bool, device=device))
                opt.zero_grad(set_to_none=True)

            lr = lr_at(step, total, base_lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            m = momentum_at(step * global_batch, total * global_batch, cfg.model.momentum)
            with timer("forward_backward"):
                guard.before_forward()
                with autocast(device, dtype):
                    out_terms = model(inputs)
                loss = out_terms["loss"]
                (scaler.scale(loss) if scaler is not None else loss).backward()
            with timer("optimizer"):
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.optim.clip_grad > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                # one device-side verdict gates every update of this step (no host read here)
                ok = guard.check(loss, grad_norm if scaler is None else None)
                guard.optimizer_step(opt, ok, scaler)
                opt.zero_grad(set_to_none=True)
                core.momentum_update(m, ok)
                core.enqueue(out_terms["keys_rgb"], out_terms["keys_flow"], ok)
                guard.after_step(ok)
            step += 1
            clips_done += global_batch
            step_ends.append(time.perf_counter() - t_start)
            account(guard.publish(ok, step))
            if on_step is not None:
                on_step(step, core, batch)

            logged = step % cfg.log.every == 0 or step == total
            if logged:
                now = time.perf_counter()
                elapsed = now - t_start
                rate = clips_done / max(elapsed, 1e-9)
                wait_share = wait_window / max(now - t_window, 1e-9)
                t_window, wait_window = now, 0.0
                last_terms = {k: float(v.detach()) for k, v in out_terms.items() if torch.is_tensor(v) and v.dim() == 0}
                rec = {"step": step, "epoch": epoch, "run_id": run_id, "lr": lr, "momentum": m,
                       "clips_per_s": rate, "data_wait_share": wait_share,
                       **{f"loss/{k}": v for k, v in last_terms.items()}, **timer.summary()}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if device.type == "cuda":
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if flops_per_clip and peak:
                    rec["mfu"] = mfu(flops_per_clip, rate / dist.world_size, peak)
                metrics.log(rec)
                wait_pct, loss_now = f"{100 * wait_share:.0f}%", last_terms.get("loss", math.nan)
                progress.update(step, postfix=f"{rate:.1f} clips/s, data wait {wait_pct}, loss {loss_now:.4f}",
                                line=format_progress(step, total, elapsed, rate, start=progress.initial)
                                + f" | data wait {wait_pct} | loss {loss_now:.4f}")
            else:
                progress.update(step)
            if should_stop(signals, dist.world_size, logged, device):
                account(guard.flush())
                path = checkpoint("step")
                if own_loader:
                    loader.close()
                metrics.close()
                progress.close()
                cleanup()
                raise Interrupted(f"stopped by {signals.name} at step {step}; checkpoint "
                                  f"{path or out / 'checkpoints'} written (continue with --resume auto)",
                                  signals.number)
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                account(guard.flush())
                checkpoint("step")
        if epoch_done:
            epoch += 1

    progress.close()
    account(guard.flush())
    checkpoint("last")
    elapsed = time.perf_counter() - t_start
    if own_loader:
        loader.close()
    result = {"steps": step, "epochs": epoch, "clips_per_s": clips_done / max(elapsed, 1e-9),
              "skipped_steps": bad_total, "loader": getattr(loader, "stats", {}),
              "step_end_seconds": step_ends, "stage_seconds": timer.totals(), "stage_timing": timer.report(), **{f"loss/{k}": v for k, v in last_terms.items()},
              # model FLOPs of one clip's forward + backward and the device's bf16 peak: callers that
              # measure a steady-state rate (bench) turn them into MFU; None where unknown (CPU)
              "flops_per_clip": flops_per_clip, "peak_flops": peak,
              "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "run_id": run_id}
    metrics.log({"final": True, **result})
    metrics.close()
    if dist.is_main and cfg.log.jsonl:   # RUN_DIR/metrics.png; a failure is a warning, never an error
        plot_run_or_warn(out)
    if dist.is_main:
        log.info("done: run %s, %d steps in %.1f s (%.2f clips/s); checkpoint %s", run_id, step, elapsed,
                 result["clips_per_s"], out / "checkpoints" / "last.pt")
    cleanup()
    return result

