"""`mscl-stream pretrain`: the MSCL training loop, one readable function.

Config -> streaming loader -> in-batch flow -> augmentation + flow encoding -> MSCL -> SGD.
One process per GPU under torchrun (DDP; gloo on CPU); checkpoints carry everything needed to resume
exactly (model with momentum encoders and queues, optimizer, scaler, loader/sampler position, RNGs).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from mscl_stream.config import Config, dump_config, to_dict
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import read_manifest
from mscl_stream.errors import UserError
from mscl_stream.models.mscl import MSCL, momentum_at
from mscl_stream.train.checkpoint import (expect_from_config, find_latest, load_checkpoint, load_model_state,
                                          rng_state, save_checkpoint, set_rng_state)
from mscl_stream.train.distributed import all_gather_objects, cleanup, init_distributed
from mscl_stream.train.metrics import MetricsLogger, StageTimer, estimate_flops_per_clip, format_progress, mfu, peak_flops
from mscl_stream.train.schedule import lr_at, scaled_lr
from mscl_stream.flow import estimator_from_config
from mscl_stream.train.step import amp_dtype, autocast, compute_flow, make_inputs

log = logging.getLogger(__name__)

# Config sections that must match between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = ("data.frames_per_clip", "data.frame_stride", "data.flow_gap", "data.flow_frames",
                     "data.batch_size", "data.frame_size", "augment.out_size", "model", "loss")


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses; a checkpoint was written before stopping."""


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def pretrain(cfg: Config, loader=None, on_step=None) -> dict:
    """Run MSCL pretraining as configured; returns the final metrics (loss terms, throughput).

    Args:
        cfg: the validated configuration.
        loader: an iterable of ClipBatch to use instead of the streaming loader (benchmarks feed
            device-resident batches through it to measure the step without decode).
        on_step: optional ``on_step(step, model, batch)`` called after every optimiser step (tests,
            custom probes); ``model`` is the plain MSCL module.
    """
    dist = init_distributed(cfg.dist.backend, device=cfg.train.device)
    device = dist.device
    torch.manual_seed(cfg.train.seed + dist.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.train.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    # ---- data, flow, model, optimiser
    records = read_manifest(cfg.data.manifest, cfg.data.split) if loader is None else []
    own_loader = loader is None           # closed here at the end (its threads / worker processes)
    if own_loader:
        loader = build_loader(cfg, records, rank=dist.rank, world_size=dist.world_size, device=device)
    estimator = estimator_from_config(cfg.flow, device)
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
    if cfg.train.compile:
        model = torch.compile(model)
    params = [p for p in core.parameters() if p.requires_grad]
    global_batch = cfg.data.batch_size * dist.world_size
    base_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch)
    opt = torch.optim.SGD(params, lr=base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
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
    ckpt_path = find_latest(out) if cfg.train.resume == "auto" else (Path(cfg.train.resume) if cfg.train.resume else None)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, expect=expect_from_config(to_dict(cfg), RESUME_MUST_MATCH))
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
            log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, epoch)
    elif cfg.train.resume == "auto" and dist.is_main:
        log.info("resume=auto: no checkpoint in %s, starting fresh", out)

    def checkpoint(tag: str) -> None:
        # Every rank contributes its loader position and RNG states (one list entry per rank); rank 0 writes.
        per_rank = all_gather_objects({"loader": loader.state_dict(), "rng": rng_state(),
                                       "aug_rng": aug_gen.get_state()})
        if dist.is_main:
            save_checkpoint(out / "checkpoints" / f"{tag}.pt", {
                "model": core.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "ranks": per_rank,
                "step": step, "epoch": epoch, "bad_total": bad_total, "config": to_dict(cfg),
                "flow": estimator.describe()})

    metrics = MetricsLogger(out, is_main=dist.is_main, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl)
    timer = StageTimer(device)
    peak = peak_flops(device)
    flops_per_clip = None
    if dist.is_main:
        source = f"{len(records)} videos" if records else f"loader {type(loader).__name__}"
        log.info("pretrain: %s, %d steps/epoch, %d steps, global batch %d, lr %.4g, flow %s, amp %s, device %s",
                 source, steps_per_epoch, total, global_batch, base_lr, cfg.flow.estimator,
                 dtype or "fp32", device)
    t_start, clips_done, last_terms, step_ends = time.perf_counter(), 0, {}, []

    # ---- the loop
    mid_epoch = ckpt_path is not None  # a resumed loader continues its epoch where it stopped
    while step < total:
        if not mid_epoch:
            loader.set_epoch(epoch)
        mid_epoch, epoch_done = False, False
        it = iter(loader)
        while step < total:
            timer.enabled = step % cfg.log.every == 0  # synchronising timers only on logged steps
            with timer("data_wait"):
                batch = next(it, None)
            if batch is None:
                epoch_done = True
                break
            with timer("flow"):
                batch, flow_a, flow_b = compute_flow(batch, estimator)  # MDS online: keeps 1 of K rows
            with timer("motion_augment"):
                inputs = make_inputs(batch, flow_a, flow_b, cfg, aug_gen)
                if use_cl:
                    inputs = type(inputs)(**{k: _channels_last(v) for k, v in vars(inputs).items()})
            if flops_per_clip is None and peak is not None:
                flops_per_clip = estimate_flops_per_clip(core, inputs, dtype)  # one extra fwd+bwd
                opt.zero_grad(set_to_none=True)

            lr = lr_at(step, total, base_lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            m = momentum_at(step * global_batch, total * global_batch, cfg.model.momentum)
            with timer("forward_backward"):
                with autocast(device, dtype):
                    out_terms = model(inputs)
                loss = out_terms["loss"]
                finite = torch.isfinite(loss.detach()).float()
                if dist.world_size > 1:
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if finite.item() == 0:
                    bad_streak += 1
                    bad_total += 1
                    opt.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss (%d in a row, %d total); step skipped",
                                step, bad_streak, bad_total)
                    if bad_streak >= cfg.train.max_bad_steps:
                        checkpoint("diverged")
                        raise TrainingDiverged(
                            f"{bad_streak} non-finite losses in a row at step {step}; checkpoint "
                            f"{out / 'checkpoints' / 'diverged.pt'} written (lower optim.lr or use amp=fp32)")
                    step += 1
                    continue
                bad_streak = 0
                (scaler.scale(loss) if scaler is not None else loss).backward()
            with timer("optimizer"):
                if scaler is not None:
                    scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad) if cfg.optim.clip_grad > 0 else None
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                core.momentum_update(m)
                core.enqueue(out_terms["keys_rgb"], out_terms["keys_flow"])
            step += 1
            clips_done += global_batch
            step_ends.append(time.perf_counter() - t_start)
            if on_step is not None:
                on_step(step, core, batch)

            if step % cfg.log.every == 0 or step == total:
                elapsed = time.perf_counter() - t_start
                rate = clips_done / max(elapsed, 1e-9)
                last_terms = {k: float(v.detach()) for k, v in out_terms.items() if torch.is_tensor(v) and v.dim() == 0}
                rec = {"step": step, "epoch": epoch, "lr": lr, "momentum": m, "clips_per_s": rate,
                       **{f"loss/{k}": v for k, v in last_terms.items()}, **timer.summary()}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if device.type == "cuda":
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if flops_per_clip and peak:
                    rec["mfu"] = mfu(flops_per_clip, rate / dist.world_size, peak)
                metrics.log(rec)
                if dist.is_main:
                    print(format_progress(step, total, elapsed, rate) + f" loss {last_terms.get('loss', math.nan):.4f}",
                          flush=True)
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                checkpoint(f"step_{step:08d}")
        if epoch_done:
            epoch += 1

    checkpoint("last")
    elapsed = time.perf_counter() - t_start
    if own_loader:
        loader.close()
    result = {"steps": step, "epochs": epoch, "clips_per_s": clips_done / max(elapsed, 1e-9),
              "skipped_steps": bad_total, "loader": getattr(loader, "stats", {}),
              "step_end_seconds": step_ends, "stage_seconds": timer.totals(), **{f"loss/{k}": v for k, v in last_terms.items()},
              # model FLOPs of one clip's forward + backward and the device's bf16 peak: callers that
              # measure a steady-state rate (bench) turn them into MFU; None where unknown (CPU)
              "flops_per_clip": flops_per_clip, "peak_flops": peak,
              "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    metrics.log({"final": True, **result})
    metrics.close()
    if dist.is_main:
        log.info("done: %d steps in %.1f s (%.2f clips/s); checkpoint %s", step, elapsed,
                 result["clips_per_s"], out / "checkpoints" / "last.pt")
    cleanup()
    return result
