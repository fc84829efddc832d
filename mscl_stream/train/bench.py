"""`mscl-stream bench`: end-to-end training throughput, stream efficiency, stages and baselines.

(a) end-to-end pretraining steps through the streaming loader; (b) the same step fed from one
device-resident batch (no decode): stream efficiency = (a) / (b); (c) per-stage times of (a);
(d) with --baselines, the same flow + model fed by a PyAV + torch DataLoader (N workers), and the
authors' pipeline: flow precomputed to disk once and read back (its footprint and one-off cost
reported); (a') on a GPU, (a) again through DALI's NVDEC decoder (``data.decoder=dali``) for the
comparison behind ``auto``'s choice there; (e) every estimator listed in --estimators swapped into the
full loop. Throughput is
measured on the second half of the steps (after warm-up: pipeline start, cuDNN autotuning,
allocator growth).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mscl_stream.config import Config, FlowConfig, to_dict
from mscl_stream.data.batch import ClipBatch
from mscl_stream.errors import UserError
from mscl_stream.machine import machine_info
from mscl_stream.machine import resolve_device

log = logging.getLogger(__name__)
RAFT_NAMES = ("raft_small", "raft_large")
# runs a user may leave out (``skip``); end_to_end and resident define stream efficiency and always run
OPTIONAL_RUNS = ("pyav_dataloader", "end_to_end_nvdec", "precomputed_flow")


class ResidentLoader:
    """Replays one decoded batch from device memory: the training step without decode."""

    def __init__(self, batch: ClipBatch, steps: int):
        self.batch, self.steps, self.stats = batch, steps, {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def steady_rate(result: dict, clips_per_step: int) -> float:
    """Clips/s over the second half of the steps (warm-up excluded)."""
    ends = result["step_end_seconds"]
    if len(ends) < 4:
        return result["clips_per_s"]
    half = len(ends) // 2
    return clips_per_step * (len(ends) - half) / max(ends[-1] - ends[half - 1], 1e-9)


def _run(cfg: Config, loader=None) -> dict:
    from mscl_stream.train.metrics import mfu
    from mscl_stream.train.trainer import pretrain
    res = pretrain(cfg, loader=loader)
    rate = steady_rate(res, cfg.data.batch_size)
    stages = res.get("stage_seconds", {})
    total = sum(stages.values()) or 1.0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"clips_per_s": rate, "steps_per_s": rate / cfg.data.batch_size,
            "stage_share": {k: v / total for k, v in stages.items()}, "stage_seconds": stages,
            "loss": res.get("loss/loss"), "loader": res.get("loader", {}),
            "flops_per_clip": res.get("flops_per_clip"), "gpu_mem_gb": res.get("gpu_mem_gb"),
            "mfu": mfu(res.get("flops_per_clip"), rate / world, res.get("peak_flops"))}


def bench_codec(codec: str, device_type: str) -> str:
    """The sample data's codec: ``auto`` is H.264 on CUDA (what real datasets hold; both PyAV and NVDEC
    decode it), else VP9 (one of DALI's CPU codecs)."""
    if codec == "auto":
        return "h264" if device_type == "cuda" else "vp9"
    return codec


def _ensure_data(cfg: Config, workdir: Path, steps: int, codec: str | None) -> Config:
    """Use the configured manifest, or make a sample dataset big enough for ``steps`` steps in one epoch.

    Each training video then gives several clips per epoch (different random windows, each decoded on
    its own), so an epoch boundary (pipeline restart) never falls inside the measured steps.
    """
    if cfg.data.manifest:
        return cfg
    from mscl_stream.data.manifest import build_manifest, read_manifest
    from mscl_stream.data.sample import make_sample_dataset
    data = workdir / "videos"
    make_sample_dataset(data, videos=24, codec=codec)
    build_manifest(data, workdir / "manifest.jsonl", data=cfg.data)
    n_train = len(read_manifest(workdir / "manifest.jsonl", "train"))
    per_video = max(cfg.data.clips_per_video, math.ceil((steps + 1) * cfg.data.batch_size / max(n_train, 1)))
    return replace(cfg, data=replace(cfg.data, manifest=str(workdir / "manifest.jsonl"), split="train",
                                     clips_per_video=per_video))


def _first_batch(cfg: Config) -> ClipBatch:
    from mscl_stream.data.loader import build_loader
    from mscl_stream.data.manifest import read_manifest
    loader = build_loader(cfg, read_manifest(cfg.data.manifest, cfg.data.split),
                          device=resolve_device(cfg.train.device))
    loader.set_epoch(0)
    batch = next(iter(loader))
    loader.close()                        # the batch is on the device; the decode workers can go
    return batch


def _swapped_flow(flow: FlowConfig, name: str) -> FlowConfig:
    """``flow`` with another estimator: RAFT's knobs carry over between RAFT models only (a classical
    estimator given ``precision: bf16`` would rightly refuse it); ``chunk_size`` always carries over."""
    if name in RAFT_NAMES and flow.estimator in RAFT_NAMES:
        return replace(flow, estimator=name)
    return FlowConfig(estimator=name, chunk_size=flow.chunk_size)


def run_bench(cfg: Config, out: Path, steps: int = 20, baselines: bool = False,
              estimators: tuple[str, ...] = (), codec: str = "auto", skip: tuple[str, ...] = ()) -> dict:
    """Run the benchmark suite; writes JSON + PNG into ``out`` and returns the result dict.

    ``codec`` picks the sample data's codec when ``data.manifest`` is empty (see :func:`bench_codec`);
    ``skip`` leaves out some of :data:`OPTIONAL_RUNS`.
    """
    unknown = set(skip) - set(OPTIONAL_RUNS)
    if unknown:
        raise UserError(f"bench: cannot skip {sorted(unknown)}; optional runs are {', '.join(OPTIONAL_RUNS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mscl-bench-"))
    codec = None if cfg.data.manifest else bench_codec(codec, resolve_device(cfg.train.device).type)
    cfg = _ensure_data(cfg, work, steps, codec)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=steps, ckpt_every=0, out_dir=str(work / "run"),
                                     resume=""), log=replace(cfg.log, tensorboard=False))
    result = {"machine": machine_info(), "config": to_dict(cfg), "steps": steps,
              "sample_codec": codec, "runs": {}}
    tag = f"bench_{result['machine']['gpu'] or 'cpu'}".replace(" ", "_")
    path = out / f"{tag}_{_dt.date.today().isoformat()}.json"
    runs = result["runs"]

    started = time.perf_counter()

    def done(name: str, run: dict) -> None:
        # saved after every run: a long suite cut short (a lease, a timeout) keeps what it measured
        nonlocal started
        now = time.perf_counter()
        runs[name] = {**run, "wall_seconds": now - started}   # set-up, warm-up and steps
        started = now
        rate = {n: r["clips_per_s"] for n, r in runs.items()}
        if "resident" in rate:
            result["stream_efficiency"] = rate["end_to_end"] / rate["resident"]
        if "pyav_dataloader" in rate:
            result["speedup_vs_pyav"] = rate["end_to_end"] / rate["pyav_dataloader"]
        path.write_text(json.dumps(result, indent=2, default=str))

    print(f"bench (a): end-to-end, {steps} steps of {cfg.data.batch_size} clips", flush=True)
    done("end_to_end", _run(cfg))
    print("bench (b): device-resident batches (no decode)", flush=True)
    done("resident", _run(cfg, loader=ResidentLoader(_first_batch(cfg), steps)))
    if baselines and "pyav_dataloader" not in skip:
        from mscl_stream.train.baseline import pyav_dataloader
        print(f"bench (d): PyAV DataLoader baseline, {cfg.data.num_threads} workers", flush=True)
        done("pyav_dataloader", _run(cfg, loader=pyav_dataloader(cfg)))
    if resolve_device(cfg.train.device).type == "cuda" and cfg.data.decoder == "auto" and \
            "end_to_end_nvdec" not in skip:
        # `auto` decodes with PyAV on a GPU; the same run through DALI's NVDEC shows why
        print("bench (a'): end-to-end with data.decoder=dali (NVDEC)", flush=True)
        done("end_to_end_nvdec", _run(replace(cfg, data=replace(cfg.data, decoder="dali"))))
    if baselines and "precomputed_flow" not in skip:
        from mscl_stream.flow import estimator_from_config
        from mscl_stream.train.baseline import precomputed_flow_loader
        print("bench (d): precomputed-flow baseline (flow to disk once, read back by DataLoader workers)",
              flush=True)
        est = estimator_from_config(cfg.flow, resolve_device(cfg.train.device))
        loader, cost = precomputed_flow_loader(cfg, est, work / "flow_cache")
        result["precomputed_flow_disk_mb"] = cost["bytes"] / 2**20
        done("precomputed_flow", {**_run(cfg, loader=loader), "precompute": cost})
    for name in estimators:
        print(f"bench (e): flow estimator {name}", flush=True)
        done(f"flow={name}", _run(replace(cfg, flow=_swapped_flow(cfg.flow, name))))

    _plot(result, path.with_suffix(".png"))
    print(f"\n{'run':<24}{'clips/s':>10}{'flow share':>12}{'MFU':>8}")
    for name, r in runs.items():
        m = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        print(f"{name:<24}{r['clips_per_s']:>10.2f}{r['stage_share'].get('flow', float('nan')):>12.2f}{m:>8}")
    print(f"stream efficiency (a)/(b): {result['stream_efficiency']:.3f}; results in {path}")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    names = list(runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.barh(names, [runs[n]["clips_per_s"] for n in names])
    ax1.set_xlabel("clips/s (steady state)")
    stages = sorted({s for n in names for s in runs[n]["stage_share"]})
    left = np.zeros(len(names))
    for s in stages:
        vals = np.array([runs[n]["stage_share"].get(s, 0.0) for n in names])
        ax2.barh(names, vals, left=left, label=s)
        left += vals
    ax2.set_xlabel("share of step time (sampled, synchronised)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"mscl-stream bench on {result['machine']['gpu'] or result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
