"""Aten ops, host reads and host-device copies per training step: the CPU proxy for launches and syncs.

Counts with ``mscl_stream.train.opcount.OpCounter`` (a TorchDispatchMode that also tells would-be
syncs apart, see its doc) at the demo's shapes (configs/demo.yaml: 8 frames of 48x64, 4 flow frames,
out_size 32, dis_fast flow) at batch 64 on CPU:

  make_inputs: one call of ``mscl_stream.train.inputs.make_inputs`` (both RGB views, both flow views),
               median of --calls calls after one warm-up call, for each augmentation backend asked for
               (``torch`` = kornia/torch, the CPU path; ``triton`` = the fused kernels the CUDA path runs,
               forced on CPU under TRITON_INTERPRET=1 in a child process: one counted call after a
               one-clip warm-up, since the interpreter takes minutes per call at batch 64).
  step:        the training thread's whole step (flow, make_inputs, forward, backward, NaN guard,
               optimiser, momentum update, enqueue) through ``pretrain`` on a device-resident batch,
               median over the steps after the first two.

    python benchmarks/step_ops.py [--backends torch triton] [--batch 64] [--no-step]

Writes benchmarks/results/step_ops_<device>_<date>.json (+ .png). The JSON's ``make_inputs.<backend>.ops``
is the aten op count per call that the op target bounds (benchmarks/README.md, "Step input path");
``...host_reads`` and ``...blocking_copies`` are the host syncs, whose target is zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mscl_stream.config import load_config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.machine import machine_info
from mscl_stream.train.opcount import Counts, OpCounter

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def demo_config(batch: int, backend: str = "auto", device: str = "cpu"):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.batch_size={batch}", f"train.device={device}",
                                                             f"model.queue_size={2 * batch}"])
    if hasattr(cfg.augment, "backend"):
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, backend=backend))
    return cfg


def synthetic_batch(cfg, device: torch.device, seed: int = 0) -> ClipBatch:
    """A ClipBatch of random frames at the config's shapes (B, T, 3, H, W), flow pairs for even frames."""
    g = torch.Generator().manual_seed(seed)
    b, t = cfg.data.batch_size, cfg.data.frames_per_clip
    h, w = cfg.data.frame_size
    steps = torch.arange(0, t, 2)
    nf = steps.numel()

    def frames(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (b, n, 3, h, w), generator=g, dtype=torch.uint8)

    idx = torch.arange(t).expand(b, t) * cfg.data.frame_stride
    part = idx[:, steps] + cfg.data.flow_gap
    return ClipBatch(rgb_a=frames(t), rgb_b=frames(t), partner_rgb_a=frames(nf), partner_rgb_b=frames(nf),
                     flow_steps=steps, frame_idx_a=idx, frame_idx_b=idx + 2, partner_idx_a=part, partner_idx_b=part + 2,
                     labels=torch.zeros(b, dtype=torch.long), video_idx=torch.arange(b)).to(device)


def _summary(counts: list[Counts]) -> dict:
    med = {k: statistics.median(getattr(c, k) for c in counts)
           for k in ("ops", "host_reads", "blocking_copies", "async_uploads", "triton_launches")}
    return {**med, "calls": len(counts), "per_call_ops": [c.ops for c in counts],
            "detail_last_call": counts[-1].as_dict()}


def count_make_inputs(cfg, device: torch.device, calls: int, warmup_clips: int = 0) -> dict:
    """Median counts of ``calls`` make_inputs calls after one warm-up call (on the first ``warmup_clips``
    clips when > 0: the caches it fills depend on the device and dtype only, and the Triton interpreter
    takes minutes per call at batch 64)."""
    from mscl_stream.train.inputs import make_inputs
    batch = synthetic_batch(cfg, device)
    b, nf = batch.batch_size, batch.partner_rgb_a.shape[1]
    h, w = cfg.data.frame_size
    flow = torch.randn((2, b, nf, 2, h, w), generator=torch.Generator().manual_seed(1)).mul_(3).to(device)
    gen = torch.Generator().manual_seed(0)
    counts = []
    with OpCounter() as counter:
        if warmup_clips:
            small = ClipBatch(**{k: v if k == "flow_steps" else v[:warmup_clips] for k, v in batch.tensors().items()})
            make_inputs(small, flow[0, :warmup_clips], flow[1, :warmup_clips], cfg, gen)
        else:
            make_inputs(batch, flow[0], flow[1], cfg, gen)           # warm-up: caches, first launches
        for _ in range(calls):
            with counter.region() as c:
                make_inputs(batch, flow[0], flow[1], cfg, gen)
            counts.append(c)
    return _summary(counts)


def count_step(cfg, device: torch.device, steps: int) -> dict:
    """Ops per training step through the real trainer on a device-resident batch."""
    from mscl_stream.commands.bench import ResidentLoader
    from mscl_stream.train.trainer import pretrain
    work = Path(tempfile.mkdtemp(prefix="mscl-step-ops-"))
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=steps, ckpt_every=0, out_dir=str(work), resume=""),
        log=dataclasses.replace(cfg.log, every=10_000, tensorboard=False))
    batch = synthetic_batch(cfg, device)
    counts: list[Counts] = []
    with OpCounter() as counter:
        state = {"region": None}

        def on_step(step, model, b):
            if state["region"] is not None:
                state["region"].__exit__(None, None, None)
                counts.append(state["c"])
                state["region"] = None
            if 2 <= step < steps:                     # steps 0 and 1 are warm-up
                state["region"] = counter.region()
                state["c"] = state["region"].__enter__()

        pretrain(cfg, loader=ResidentLoader(batch, steps), on_step=on_step)
    return _summary(counts)


def _child(backend: str, args) -> dict:
    """Run the count for one backend in a child process (TRITON_INTERPRET must be set before import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if backend == "triton" else dict(os.environ)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    interp = backend == "triton"
    cmd = [sys.executable, __file__, "--child", backend, "--child-out", out, "--batch", str(args.batch),
           "--calls", str(1 if interp else args.calls), "--steps", str(args.steps)]
    if args.no_step or (interp and not args.interpreted_step):
        cmd.append("--no-step")
    if interp:
        cmd += ["--warmup-clips", "1"]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-step", action="store_true", help="count make_inputs only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--interpreted-step", action="store_true",
                    help="also count the whole step with the Triton backend (interpreter: very slow)")
    ap.add_argument("--warmup-clips", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.child:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        cfg = demo_config(args.batch, args.child, args.device)
        res = {"make_inputs": count_make_inputs(cfg, device, args.calls, args.warmup_clips)}
        res["make_inputs"]["interpreted"] = os.environ.get("TRITON_INTERPRET") == "1"
        res["make_inputs"]["warmup_clips"] = args.warmup_clips or args.batch
        if not args.no_step:
            res["step"] = count_step(cfg, device, args.steps)
        Path(args.child_out).write_text(json.dumps(res))
        return

    result = {"machine": machine_info(device), "device": str(device), "batch": args.batch,
              "shapes": "configs/demo.yaml (8x48x64 frames, 4 flow frames, out_size 32, dis_fast)",
              "counter": "mscl_stream.train.opcount.OpCounter (TorchDispatchMode)",
              "make_inputs": {}, "step": {}}
    for be in args.backends:
        print(f"step_ops: backend {be}", flush=True)
        res = _child(be, args) if device.type == "cpu" else None
        if res is None:
            cfg = demo_config(args.batch, be, args.device)
            res = {"make_inputs": count_make_inputs(cfg, device, args.calls)}
            if not args.no_step:
                res["step"] = count_step(cfg, device, args.steps)
        result["make_inputs"][be] = res["make_inputs"]
        if "step" in res:
            result["step"][be] = res["step"]
        m = res["make_inputs"]
        print(f"  make_inputs: {m['ops']} ops, {m['host_reads']} host reads, {m['blocking_copies']} blocking "
              f"copies, {m['async_uploads']} async uploads, {m['triton_launches']} Triton launches", flush=True)
        if "step" in res:
            s = res["step"]
            print(f"  step: {s['ops']} ops, {s['host_reads']} host reads, {s['blocking_copies']} blocking copies",
                  flush=True)

    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"step_ops_{device.type}_{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    _plot(result, path.with_suffix(".png"))
    print(f"results in {path}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, ("make_inputs", "step")):
        runs = result[part]
        names = list(runs)
        if not names:
            ax.set_visible(False)
            continue
        keys = ("ops", "host_reads", "blocking_copies")
        for i, k in enumerate(keys):
            vals = [runs[n][k] for n in names]
            bars = ax.bar([j + 0.27 * i for j in range(len(names))], vals, width=0.27, label=k)
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks([j + 0.27 for j in range(len(names))], names)
        ax.set_yscale("symlog")
        ax.set_title(f"{part}: per call, batch {result['batch']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"aten ops and would-be syncs on {result['device']} ({result['shapes']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
