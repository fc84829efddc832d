"""The step's input path on a GPU: fused Triton kernels vs kornia/torch, and a profile of a steady step.

Two measurements (``--what``):

  make_inputs  ``train.inputs.make_inputs`` at the bench shape (batch 64, 8 frames of 128x176, 4 flow
               frames, out_size 112, bf16 + channels_last_3d on CUDA) for ``augment.backend`` triton and
               torch: median ms per call (CUDA events, after warm-up), CUDA kernels launched per call
               (torch.profiler), whether a steady call passes ``torch.cuda.set_sync_debug_mode("error")``,
               and the largest difference between the two backends' outputs (same generator state).
               Also the RGB view and the flow views alone (``augment_rgb`` vs ``apply_uploaded(torch)``,
               ``flow_views_fused`` vs ``motion.flow_views``).
  step         a steady training step (RAFT-small, model, optimiser) through ``pretrain`` on a
               device-resident batch, profiled with torch.profiler over --profile-steps steps after
               warm-up: CUDA kernels per step, synchronising runtime calls per step (cudaStreamSynchronize,
               cudaDeviceSynchronize, cudaEventSynchronize, blocking cudaMemcpy), device busy vs idle time
               on the kernel timeline (gaps between consecutive kernels), and the top kernels.

    python benchmarks/augment_kernels.py --device cuda [--what make_inputs step] [--batch 64]
    python benchmarks/augment_kernels.py --device cpu --batch 2 --quick   # checks this script on CPU

Writes benchmarks/results/augment_kernels_<device>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mscl_stream.config import load_config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D")


def bench_config(batch: int, device: str, backend: str = "auto", quick: bool = False):
    over = [f"data.batch_size={batch}", f"train.device={device}", f"augment.backend={backend}",
            "train.ckpt_every=0", "log.every=1000", "log.tensorboard=false"]
    if device == "cpu":
        over += ["train.amp=fp32", "flow.precision=fp32", "flow.cuda_graph=false"]
    if quick:
        over += ["data.frame_size=[128, 128]", "augment.out_size=32", "model.queue_size=64", "flow.iters=2",
                 "model.rgb_width=8"]
    return load_config(ROOT / "configs" / "bench.yaml", over)


def synthetic_batch(cfg, device: torch.device) -> ClipBatch:
    g = torch.Generator().manual_seed(0)
    b, t = cfg.data.batch_size, cfg.data.frames_per_clip
    h, w = cfg.data.frame_size
    steps = torch.arange(0, t, 2)
    nf = steps.numel()

    def u8(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (b, n, 3, h, w), generator=g, dtype=torch.uint8)

    idx = torch.arange(t).expand(b, t) * cfg.data.frame_stride
    part = idx[:, steps] + cfg.data.flow_gap
    return ClipBatch(rgb_a=u8(t), rgb_b=u8(t), partner_rgb_a=u8(nf), partner_rgb_b=u8(nf), flow_steps=steps,
                     frame_idx_a=idx, frame_idx_b=idx, partner_idx_a=part, partner_idx_b=part,
                     labels=torch.zeros(b, dtype=torch.long), video_idx=torch.arange(b)).to(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _profile(fn, device: torch.device) -> "torch.profiler.profile":
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def kernel_summary(prof, calls: int = 1) -> dict:
    """Kernels, syncing runtime calls and device idle gaps of a profile, per call."""
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    syncs: dict[str, int] = {}
    for e in events:
        if e.name in SYNC_CALLS:         # exact names: cudaMemcpyAsync is not among them
            syncs[e.name] = syncs.get(e.name, 0) + 1
    busy = sum(k.time_range.elapsed_us() for k in kernels)
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) if kernels else 0
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(kernels, kernels[1:])]
    top: dict[str, list] = {}
    for k in kernels:
        n, us = top.get(k.name, [0, 0.0])
        top[k.name] = [n + 1, us + k.time_range.elapsed_us()]
    return {"kernels_per_call": len(kernels) / calls, "sync_calls_per_call": {k: v / calls for k, v in syncs.items()},
            "kernel_busy_ms_per_call": busy / 1e3 / calls, "timeline_span_ms_per_call": span / 1e3 / calls,
            "idle_ms_per_call": max(0.0, span - busy) / 1e3 / calls,
            "gaps_over_10us_per_call": sum(g > 10 for g in gaps) / calls,
            "top_kernels": {n: {"count": c / calls, "ms": us / 1e3 / calls}
                            for n, (c, us) in sorted(top.items(), key=lambda kv: -kv[1][1])[:15]}}


def measure_make_inputs(args, device: torch.device) -> dict:
    from mscl_stream import augment as A
    from mscl_stream import motion
    from mscl_stream.kernels.augment_rgb import augment_rgb
    from mscl_stream.kernels.flow_views import flow_views_fused
    from mscl_stream.train.inputs import make_inputs
    out = {}
    base = bench_config(args.batch, device.type, quick=args.quick)
    batch = synthetic_batch(base, device)
    b, nf = batch.batch_size, batch.partner_rgb_a.shape[1]
    h, w = base.data.frame_size
    flow = (torch.randn((2, b, nf, 2, h, w), generator=torch.Generator().manual_seed(1)) * 3).to(device)
    outs = {}
    backends = ["triton", "torch"] if (device.type == "cuda" or args.interpret) else ["torch"]
    try:
        import kornia  # noqa: F401 - the torch backend's colour ops
    except ImportError:
        backends.remove("torch")
        out["torch"] = "not measured: kornia does not import on this host"
        print("make_inputs torch: kornia does not import here, fused kernels only", flush=True)
    for be in backends:
        cfg = bench_config(args.batch, device.type, be, args.quick)
        gen = torch.Generator().manual_seed(0)

        def call():
            return make_inputs(batch, flow[0], flow[1], cfg, gen)

        ms = timed(call, device, args.warmup, args.iters)
        sync_ok = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
                sync_ok = True
            except RuntimeError as e:
                sync_ok = f"sync: {str(e).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        prof = kernel_summary(_profile(call, device))
        outs[be] = make_inputs(batch, flow[0], flow[1], cfg, torch.Generator().manual_seed(7))
        out[be] = {"ms": ms, "clips_per_s": b / ms * 1e3, "no_sync": sync_ok, **prof}
        print(f"make_inputs {be}: {ms:.2f} ms, {prof['kernels_per_call']:.0f} kernels, syncs "
              f"{prof['sync_calls_per_call']}, sync-debug {sync_ok}", flush=True)
    if len(outs) == 2:
        out["max_abs_diff"] = {k: (getattr(outs["triton"], k).float() - getattr(outs["torch"], k).float()).abs().max().item()
                               for k in ("rgb_q", "rgb_k", "flow_q", "flow_k", "rot_q", "rot_k")}
        out["speedup"] = out["torch"]["ms"] / out["triton"]["ms"]

    # the RGB view and the flow views alone, fp32 contiguous
    cfg = bench_config(args.batch, device.type, "torch", args.quick)
    p = A.sample_params(b, h, w, cfg.augment, torch.Generator().manual_seed(2))
    (v,), _ = A.upload_views([p], None, device, subsets=True)
    k = A.blur_kernel_size(cfg.augment)
    s = cfg.augment.out_size
    ang = torch.full((b,), 1.0, device=device)
    parts = {"flow_torch_ms": lambda: motion.flow_views(flow[0], v.table[:, :4], v.table[:, 4] > 0.5, ang, s,
                                                        backend="torch")}
    if "torch" in backends:
        parts["rgb_torch_ms"] = lambda: A.apply_uploaded(batch.rgb_a, v, cfg.augment, "torch")
    if "triton" in backends:
        parts.update({"rgb_fused_ms": lambda: augment_rgb(batch.rgb_a, v.table, s, k),
                      "flow_fused_ms": lambda: flow_views_fused(flow[0], v.table, ang, s)})
    out["parts"] = {name: timed(fn, device, args.warmup, args.iters) for name, fn in parts.items()}
    print("parts (ms):", {k_: round(v_, 3) for k_, v_ in out["parts"].items()}, flush=True)
    return out


def measure_step(args, device: torch.device) -> dict:
    """Profile steady training steps: the profiler runs between on_step calls after warm-up."""
    from torch.profiler import ProfilerActivity, profile
    from mscl_stream.commands.bench import ResidentLoader
    from mscl_stream.train.trainer import pretrain
    warm, n = args.step_warmup, args.profile_steps
    total = warm + n + 1
    cfg = bench_config(args.batch, device.type, quick=args.quick)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=total,
                                                             out_dir=tempfile.mkdtemp(prefix="mscl-prof-")))
    batch = synthetic_batch(cfg, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    state = {}

    def on_step(step, model, b):
        if step == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            state["t0"] = time.perf_counter()
            prof.__enter__()
        elif step == warm + n:
            if device.type == "cuda":
                torch.cuda.synchronize()
            state["wall_ms"] = (time.perf_counter() - state["t0"]) * 1e3 / n
            prof.__exit__(None, None, None)

    res = pretrain(cfg, loader=ResidentLoader(batch, total), on_step=on_step)
    summ = kernel_summary(prof, calls=n)
    out = {"steps_profiled": n, "warmup_steps": warm, "wall_ms_per_step_profiled": state.get("wall_ms"),
           "stage_timing": res.get("stage_timing"), **summ}
    print(f"step: {summ['kernels_per_call']:.0f} kernels/step, syncs/step {summ['sync_calls_per_call']}, "
          f"busy {summ['kernel_busy_ms_per_call']:.1f} ms, idle {summ['idle_ms_per_call']:.1f} ms "
          f"of {summ['timeline_span_ms_per_call']:.1f} ms per step (profiler on)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--what", nargs="+", default=["make_inputs", "step"], choices=["make_inputs", "step"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--step-warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small shapes (checks the script on CPU)")
    ap.add_argument("--interpret", action="store_true", help="CPU: also run the Triton backend (TRITON_INTERPRET=1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"machine": machine_info(device), "device": str(device), "batch": args.batch, "quick": args.quick,
              "shape": "configs/bench.yaml (8x128x176 frames, 4 flow frames, out 112, raft_small 12 updates, bf16)"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"augment_kernels_{device.type}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    for what in args.what:
        result[what] = (measure_make_inputs if what == "make_inputs" else measure_step)(args, device)
        path.write_text(json.dumps(result, indent=2, default=str))      # after each: a cut lease keeps it
    _plot(result, path.with_suffix(".png"))
    print(f"results in {path}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mi = result.get("make_inputs")
    if not mi:
        return
    names = [k for k in ("triton", "torch") if isinstance(mi.get(k), dict)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.bar(names, [mi[n]["ms"] for n in names])
    ax1.set_ylabel("ms per make_inputs (median)")
    ax2.bar(names, [mi[n]["kernels_per_call"] for n in names])
    ax2.set_ylabel("CUDA kernels per call")
    fig.suptitle(f"make_inputs at batch {result['batch']} on {result['machine'].get('gpu') or 'cpu'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
