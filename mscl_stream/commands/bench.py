"""`mscl-stream bench`: end-to-end training throughput, stream efficiency, stages and baselines.

(a) end-to-end pretraining steps through the streaming loader; (b) the same step fed from one
device-resident batch (no decode): stream efficiency = (a) / (b); (c) per-stage times of (a)
(``StageTimer``: CUDA events on a GPU, warm-up steps left out, shares of the measured step time with
the part outside every stage as "gap");
(d) with --baselines, the same flow + model fed by a PyAV + torch DataLoader (N workers), and the
authors' pipeline: flow precomputed to disk once and read back (its footprint and one-off cost
reported); (a') on a GPU, (a) again through DALI's NVDEC decoder (``data.decoder=dali``) for the
comparison behind ``auto``'s choice there; (e) every estimator listed in --estimators swapped into the
full loop; (f) the PyAV decode cost of one sample on one core (frames decoded per frame wanted, CPU-ms)
and the CPU cores per GPU that PyAV needs to feed the measured step (b). The sample data follow a data
profile (``--profile``: ``k400`` on a GPU host, ``toy`` on CPU) unless ``data.manifest`` names a dataset.
Throughput is
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
OPTIONAL_RUNS = ("pyav_dataloader", "end_to_end_nvdec", "precomputed_flow", "decode_cost")
DECODE_COST_SAMPLES = 16                  # samples timed one by one for the per-core PyAV cost (f)


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
    from mscl_stream.train.flops import mfu
    from mscl_stream.train.trainer import pretrain
    res = pretrain(cfg, loader=loader)
    rate = steady_rate(res, cfg.data.batch_size)
    stages = res.get("stage_seconds", {})          # per-stage totals over the timer's post-warm-up steps
    timing = res.get("stage_timing") or {}
    step_total = timing.get("step_total_s") or sum(stages.values()) or 1.0
    share = {k: v / step_total for k, v in stages.items()}
    share["gap"] = max(0.0, 1.0 - sum(share.values()))   # step time outside every stage
    if timing:
        med = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in timing["stage_median_s"].items())
        print(f"  stage medians (ms, {timing['method']}, {timing['steps']} steps after {timing['warmup_steps']} "
              f"warm-up): {med}; sum {1e3 * timing['stage_sum_median_s']:.1f} vs step "
              f"{1e3 * timing['step_median_s']:.1f}, gap {1e3 * timing['gap_median_s']:.1f} ms", flush=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"clips_per_s": rate, "steps_per_s": rate / cfg.data.batch_size,
            "stage_share": share, "stage_seconds": stages, "stage_timing": timing,
            "loss": res.get("loss/loss"), "loader": res.get("loader", {}),
            "flops_per_clip": res.get("flops_per_clip"), "gpu_mem_gb": res.get("gpu_mem_gb"),
            "mfu": mfu(res.get("flops_per_clip"), rate / world, res.get("peak_flops"))}


def bench_codec(codec: str, device_type: str) -> str:
    """The sample data's codec: ``auto`` is H.264 on CUDA (what real datasets hold; both PyAV and NVDEC
    decode it), else VP9 (one of DALI's CPU codecs)."""
    if codec == "auto":
        return "h264" if device_type == "cuda" else "vp9"
    return codec


def bench_profile(profile: str | None, device_type: str) -> str:
    """The sample data's profile: None is ``k400`` on CUDA (the data GPU hosts train on), else ``toy``."""
    return profile or ("k400" if device_type == "cuda" else "toy")


def _ensure_data(cfg: Config, workdir: Path, steps: int, codec: str | None, profile: str = "toy") -> Config:
    """Use the configured manifest, or make a sample dataset big enough for ``steps`` steps in one epoch.

    Each training video then gives several clips per epoch (different random windows, each decoded on
    its own), so an epoch boundary (pipeline restart) never falls inside the measured steps.
    """
    if cfg.data.manifest:
        return cfg
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.sampler import pretraining_records
    from mscl_stream.data.synthetic import make_sample_dataset
    data = workdir / "videos"
    workers = 1 if profile == "toy" else os.cpu_count() or 1     # ucf101/k400 videos take seconds each
    make_sample_dataset(data, videos=24, codec=codec, profile=profile, workers=workers, task="direction")
    build_manifest(data, workdir / "manifest.jsonl", data=cfg.data)
    n_train = len(pretraining_records(read_manifest(workdir / "manifest.jsonl", "train"), cfg.data))
    per_video = max(cfg.data.clips_per_video, math.ceil((steps + 1) * cfg.data.batch_size / max(n_train, 1)))
    return replace(cfg, data=replace(cfg.data, manifest=str(workdir / "manifest.jsonl"), split="train",
                                     clips_per_video=per_video))


def _first_batch(cfg: Config) -> ClipBatch:
    from mscl_stream.data.loader import build_loader
    from mscl_stream.data.sampler import read_pretraining_manifest
    loader = build_loader(cfg, read_pretraining_manifest(cfg.data), device=resolve_device(cfg.train.device))
    loader.set_epoch(0)
    batch = next(iter(loader))
    loader.close()                        # the batch is on the device; the decode workers can go
    return batch


def decode_cost(cfg: Config, step_clips_per_s: float | None, loader_stats: dict | None = None) -> dict:
    """(f): PyAV's cost per sample on one core, measured on :data:`DECODE_COST_SAMPLES` samples of the
    run's data in a fresh worker process (its CPU time is the decode's alone), and the cores per GPU it
    implies: ``step_clips_per_s / samples_per_cpu_s``. ``loader_stats`` (the end-to-end run's loader)
    adds the amplification and CPU-ms the training run itself paid in its PyAV workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mscl_stream.data.decode_cost import pyav_costs, summarize
    from mscl_stream.data.sampler import ClipSampler, read_pretraining_manifest
    records = read_pretraining_manifest(cfg.data)      # the rows the training run samples
    per_video = max(1, math.ceil(DECODE_COST_SAMPLES / len(records)))   # enough distinct samples
    sampler = ClipSampler(records, replace(cfg.data, clips_per_video=per_video), seed=cfg.data.seed + 1)
    sampler.set_epoch(0)
    specs = [s for _, s in zip(range(DECODE_COST_SAMPLES), sampler)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        rows = pool.submit(pyav_costs, records, specs, tuple(cfg.data.frame_size)).result()
    out = {"pyav_one_core": summarize(rows), "step_clips_per_s": step_clips_per_s}
    if step_clips_per_s:
        out["pyav_cores_per_gpu"] = step_clips_per_s / out["pyav_one_core"]["samples_per_cpu_s"]
    st = loader_stats or {}
    if st.get("pyav_samples"):
        out["end_to_end_pyav"] = {
            "samples": st["pyav_samples"],
            "amplification": st["pyav_frames_decoded"] / max(st["pyav_frames_wanted"], 1),
            "cpu_ms_per_sample": 1e3 * st["pyav_cpu_seconds"] / st["pyav_samples"]}
    return out


def _swapped_flow(flow: FlowConfig, name: str) -> FlowConfig:
    """``flow`` with another estimator: RAFT's knobs carry over between RAFT models only (a classical
    estimator given ``precision: bf16`` would rightly refuse it); ``chunk_size`` always carries over."""
    if name in RAFT_NAMES and flow.estimator in RAFT_NAMES:
        return replace(flow, estimator=name)
    return FlowConfig(estimator=name, chunk_size=flow.chunk_size)


def run_bench(cfg: Config, out: Path, steps: int = 20, baselines: bool = False,
              estimators: tuple[str, ...] = (), codec: str = "auto", skip: tuple[str, ...] = (),
              profile: str | None = None, repeat_samples: int = 1) -> dict:
    """Run the benchmark suite; writes JSON + PNG into ``out`` and returns the result dict.

    ``codec`` picks the sample data's codec when ``data.manifest`` is empty (see :func:`bench_codec`);
    ``skip`` leaves out some of :data:`OPTIONAL_RUNS`; ``profile`` picks the sample data's profile
    (see :func:`bench_profile`; ignored with ``data.manifest``); ``repeat_samples`` > 1 adds an
    end-to-end run with repeated sampling (``data.repeat_samples``), reported beside (a).
    """
    unknown = set(skip) - set(OPTIONAL_RUNS)
    if unknown:
        raise UserError(f"bench: cannot skip {sorted(unknown)}; optional runs are {', '.join(OPTIONAL_RUNS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mscl-bench-"))
    codec = None if cfg.data.manifest else bench_codec(codec, resolve_device(cfg.train.device).type)
    profile = None if cfg.data.manifest else bench_profile(profile, resolve_device(cfg.train.device).type)
    cfg = _bench_config(_ensure_data(cfg, work, steps, codec, profile or "toy"), work, steps)
    result = {"machine": machine_info(), "config": to_dict(cfg), "steps": steps,
              "sample_codec": codec, "profile": profile or "data.manifest", "runs": {}}
    tag = f"bench_{result['machine']['gpu'] or 'cpu'}".replace(" ", "_")
    path = out / f"{tag}_{profile or 'manifest'}_{_dt.date.today().isoformat()}.json"
    _run_suite(cfg, _Results(result, path), work, steps=steps, baselines=baselines, estimators=estimators,
               skip=skip, repeat_samples=repeat_samples)
    _plot(result, path.with_suffix(".png"))
    _print_summary(result, path)
    return result


def _bench_config(cfg: Config, work: Path, steps: int) -> Config:
    """``cfg`` for a bench run: ``steps`` steps into a fresh run folder below ``work``, no checkpoints,
    no TensorBoard."""
    return replace(cfg, train=replace(cfg.train, max_steps=steps, ckpt_every=0, out_dir=str(work / "run"),
                                      resume="", overwrite=True), log=replace(cfg.log, tensorboard=False))


class _Results:
    """The bench's result dict and its JSON file, saved after every run: a long suite cut short (a lease,
    a timeout) keeps what it measured."""

    def __init__(self, result: dict, path: Path):
        self.result, self.path, self.runs = result, path, result["runs"]
        self._started = time.perf_counter()

    def done(self, name: str, run: dict) -> None:
        """Record a finished run with its wall time (set-up, warm-up and steps) and the ratios it enables."""
        now = time.perf_counter()
        self.runs[name] = {**run, "wall_seconds": now - self._started}
        self._started = now
        rate = {n: r["clips_per_s"] for n, r in self.runs.items()}
        if "resident" in rate:
            self.result["stream_efficiency"] = rate["end_to_end"] / rate["resident"]
        if "pyav_dataloader" in rate:
            self.result["speedup_vs_pyav"] = rate["end_to_end"] / rate["pyav_dataloader"]
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=2, default=str))


def _run_suite(cfg: Config, results: _Results, work: Path, *, steps: int, baselines: bool,
               estimators: tuple[str, ...], skip: tuple[str, ...], repeat_samples: int) -> None:
    """(a), (b) and (f), then the optional runs that ``skip`` leaves in; each is saved as it finishes."""
    print(f"bench (a): end-to-end, {steps} steps of {cfg.data.batch_size} clips", flush=True)
    results.done("end_to_end", _run(cfg))
    print("bench (b): device-resident batches (no decode)", flush=True)
    results.done("resident", _run(cfg, loader=ResidentLoader(_first_batch(cfg), steps)))
    runs = results.runs
    if "decode_cost" not in skip:
        print("bench (f): PyAV decode cost per sample on one core", flush=True)
        results.result["decode_cost"] = decode_cost(cfg, runs["resident"]["clips_per_s"],
                                                    runs["end_to_end"].get("loader"))
        results.save()
    if repeat_samples > 1:
        print(f"bench (a''): end-to-end with repeated sampling, data.repeat_samples={repeat_samples}", flush=True)
        results.done(f"end_to_end_repeat{repeat_samples}",
                     _run(replace(cfg, data=replace(cfg.data, repeat_samples=repeat_samples))))
    if baselines and "pyav_dataloader" not in skip:
        from mscl_stream.commands.baseline import pyav_dataloader
        print(f"bench (d): PyAV DataLoader baseline, {cfg.data.decode_workers} workers", flush=True)
        results.done("pyav_dataloader", _run(cfg, loader=pyav_dataloader(cfg)))
    if resolve_device(cfg.train.device).type == "cuda" and cfg.data.decoder == "auto" and \
            "end_to_end_nvdec" not in skip:
        # `auto` decodes with PyAV on a GPU; the same run through DALI's NVDEC shows why
        print("bench (a'): end-to-end with data.decoder=dali (NVDEC)", flush=True)
        results.done("end_to_end_nvdec", _run(replace(cfg, data=replace(cfg.data, decoder="dali"))))
    if baselines and "precomputed_flow" not in skip:
        _run_precomputed_flow(cfg, results, work)
    for name in estimators:
        print(f"bench (e): flow estimator {name}", flush=True)
        results.done(f"flow={name}", _run(replace(cfg, flow=_swapped_flow(cfg.flow, name))))


def _run_precomputed_flow(cfg: Config, results: _Results, work: Path) -> None:
    """(d) the authors' pipeline: flow precomputed to disk once, then read back by DataLoader workers."""
    from mscl_stream.flow import estimator_from_config
    from mscl_stream.commands.baseline import precomputed_flow_loader
    print("bench (d): precomputed-flow baseline (flow to disk once, read back by DataLoader workers)",
          flush=True)
    est = estimator_from_config(cfg.flow, resolve_device(cfg.train.device))
    loader, cost = precomputed_flow_loader(cfg, est, work / "flow_cache")
    results.result["precomputed_flow_disk_mb"] = cost["bytes"] / 2**20
    results.done("precomputed_flow", {**_run(cfg, loader=loader), "precompute": cost})


def _print_summary(result: dict, path: Path) -> None:
    """The table of runs (clips/s, flow share, MFU), the decode cost line and the stream efficiency."""
    print(f"\n{'run':<24}{'clips/s':>10}{'flow share':>12}{'MFU':>8}")
    for name, r in result["runs"].items():
        m = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        print(f"{name:<24}{r['clips_per_s']:>10.2f}{r['stage_share'].get('flow', float('nan')):>12.2f}{m:>8}")
    dc = result.get("decode_cost")
    if dc:
        one = dc["pyav_one_core"]
        print(f"decode ({result['profile']}): PyAV {one['median_cpu_ms']:.0f} CPU-ms per sample, "
              f"{one['median_decoded']:.0f} frames decoded for {one['median_wanted']:.0f} wanted "
              f"(amplification {one['median_amplification']:.1f}), {one['samples_per_cpu_s']:.1f} samples/s "
              f"per core; the step's {dc['step_clips_per_s']:.1f} clips/s need {dc['pyav_cores_per_gpu']:.1f} "
              "PyAV cores per GPU")
    print(f"stream efficiency (a)/(b): {result['stream_efficiency']:.3f}; results in {path}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    names = list(runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.55 * len(names)), sharey=True)
    rates = [runs[n]["clips_per_s"] for n in names]
    ax1.barh(names, rates, color="tab:blue")
    for y, r in enumerate(rates):
        ax1.text(r, y, f" {r:.1f}", va="center", fontsize=8)
    ax1.set_xlim(0, 1.15 * max(rates))
    ax1.set_xlabel("clips/s (steady state: the second half of the steps)")
    order = ["data_wait", "flow", "motion_augment", "forward_backward", "optimizer", "gap"]   # pipeline order
    present = {s for n in names for s in runs[n]["stage_share"]}
    stages = [s for s in order if s in present] + sorted(present - set(order))
    left = np.zeros(len(names))
    for s in stages:
        vals = np.array([runs[n]["stage_share"].get(s, 0.0) for n in names])
        ax2.barh(names, vals, left=left, label=s)
        left += vals
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of the step (after warm-up; gap: time outside every stage)")
    ax2.legend(fontsize=8, ncol=len(stages), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    where = result["machine"]["gpu"] or result["machine"]["cpu"]
    fig.suptitle(f"mscl-stream bench on {where}, profile {result.get('profile', '?')}, "
                 f"{result['machine'].get('date', '')[:10]}", y=0.99)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
