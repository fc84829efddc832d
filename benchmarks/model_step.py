"""Model-step variants on device-resident data: compiled encoders, optimizer kernels, flow one batch ahead.

One variant per call (``--variant``), so a runner can give each its own time limit:

* ``model_loop`` / ``model_foreach`` / ``model_fused``: the MSCL step alone (forward with autocast,
  backward, gradient clipping, SGD, momentum update, enqueue) on fixed random views, eager, with
  SGD's per-parameter, foreach and fused kernels (``optim.impl``).
* ``model_compiled``: the same with ``train.compile`` (``MSCL.compile_encoders``), fused SGD.
* ``flow_only``: RAFT on the step's 2*B*F pairs (what ``flow.*`` in configs/bench.yaml runs).
* ``seq`` / ``ahead``: flow + flow-to-views + model step through the trainer's ``FlowFeed``, without
  and with ``train.flow_ahead`` (the next batch's RAFT on a side stream). ``ahead`` < ``seq`` means
  the streams overlap; the overlap fraction is (seq - ahead) / min(flow_only, model step).

The views come from the flow with a crop and a magnitude channel instead of the project's
augmentation (which needs Kornia, absent on the torch-only GPU host); the model, optimizer, RAFT and
FlowFeed are the trainer's. Prints ``RESULT {json}`` (ms per step: the mean after warm-up)
and merges it into OUT/model_step_<device>.json.

    python benchmarks/model_step.py --device cuda --variant model_fused
    python benchmarks/model_step.py --device cpu --batch 2 --size 32 40 --crop 32 --rgb-width 8 --steps 2 \
        --warmup 1 --variant ahead --set flow.estimator=dis_fast flow.precision=auto flow.cuda_graph=false  # dry run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

from mscl_stream.config import load_config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.flow import estimator_from_config
from mscl_stream.machine import machine_info
from mscl_stream.models.mscl import MSCL, MSCLInputs
from mscl_stream.train.flow_ahead import FlowFeed
from mscl_stream.train.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("model_loop", "model_foreach", "model_fused", "model_compiled", "flow_only", "seq", "ahead")


class _Resident:
    """The same device batch every step (no decode)."""

    def __init__(self, batch: ClipBatch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}


def make_batch(b: int, t: int, f: int, h: int, w: int, device: torch.device) -> ClipBatch:
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8).to(device)   # noqa: E731
    ar = lambda n: torch.arange(n).repeat(b, 1).to(device)                               # noqa: E731
    return ClipBatch(rgb_a=u8(b, t, 3, h, w), rgb_b=u8(b, t, 3, h, w), partner_rgb_a=u8(b, f, 3, h, w),
                     partner_rgb_b=u8(b, f, 3, h, w), flow_steps=torch.arange(0, t, t // f).to(device),
                     frame_idx_a=ar(t), frame_idx_b=ar(t), partner_idx_a=ar(f), partner_idx_b=ar(f),
                     labels=torch.zeros(b, dtype=torch.long, device=device),
                     video_idx=torch.zeros(b, dtype=torch.long, device=device))


def flow_fn(batch: ClipBatch, est):
    """Both windows' flow in one estimator call (compute_flow without MDS, no Kornia import)."""
    src_a, dst_a = batch.flow_pairs("a")
    src_b, dst_b = batch.flow_pairs("b")
    flow = est(torch.cat([src_a, src_b]), torch.cat([dst_a, dst_b])).float()
    flow = flow.view(2, batch.batch_size, batch.partner_rgb_a.shape[1], *flow.shape[1:])
    return batch, flow[0], flow[1]


def views(batch: ClipBatch, flow_a: torch.Tensor, flow_b: torch.Tensor, crop: int, fmt) -> MSCLInputs:
    """Cheap stand-in for make_inputs: centre crops, flow + magnitude as 3 channels, rot = flipped."""
    def crop_(x):
        h, w = x.shape[-2:]
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        return x[..., y0:y0 + crop, x0:x0 + crop]

    def flow_view(f):                         # (B, F, 2, H, W) -> (B, 3, F, c, c)
        f = crop_(f) / 10.0
        return torch.cat([f, f.norm(dim=2, keepdim=True)], 2).transpose(1, 2).contiguous(memory_format=fmt)

    def rgb(x):                                # (B, T, 3, H, W) uint8 -> (B, 3, T, c, c)
        return (crop_(x).float() / 127.5 - 1).transpose(1, 2).contiguous(memory_format=fmt)
    fq, fk = flow_view(flow_a), flow_view(flow_b)
    return MSCLInputs(rgb_q=rgb(batch.rgb_a), rgb_k=rgb(batch.rgb_b), flow_q=fq, flow_k=fk,
                      rot_q=fq.flip(-1), rot_k=fk.flip(-1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--config", default="configs/bench.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: data.frame_size")
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--rgb-width", type=int, default=None, help="model.rgb_width (dry runs)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help=">= 1")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. flow.*)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    over = [f"data.batch_size={a.batch}", f"train.device={a.device}", f"augment.out_size={a.crop}"]
    if a.size:
        over.append(f"data.frame_size=[{a.size[0]}, {a.size[1]}]")
    if a.rgb_width:
        over += [f"model.rgb_width={a.rgb_width}", "model.queue_size=64"]
    impl = {"model_loop": "loop", "model_foreach": "foreach"}.get(a.variant, "fused")
    cfg = load_config(a.config, over + [f"optim.impl={impl}"] + a.set)
    t, f = cfg.data.frames_per_clip, cfg.data.frames_per_clip // 2
    h, w = cfg.data.frame_size
    cuda = device.type == "cuda"
    fmt = torch.channels_last_3d if cuda else torch.contiguous_format
    dtype = torch.bfloat16 if cuda else None
    torch.manual_seed(0)
    batch = make_batch(a.batch, t, f, h, w, device)
    est = estimator_from_config(cfg.flow, device) if a.variant in ("flow_only", "seq", "ahead") else None
    model = MSCL(cfg).to(device).to(memory_format=fmt)
    if a.variant == "model_compiled":
        model.compile_encoders()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, 0.01)
    fixed = views(batch, *flow_fn(batch, _ZeroFlow(h, w))[1:], a.crop, fmt)

    def model_step(inputs: MSCLInputs) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(inputs)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.momentum_update(0.995)
        model.enqueue(out["keys_rgb"], out["keys_flow"])

    feed = FlowFeed(est, _Resident(batch), device, ahead=a.variant == "ahead", flow_fn=flow_fn)
    feed.start(iter(_Resident(batch)))
    total = a.warmup + a.steps
    # Steady state without a sync per step (one would serialise the side stream with the main one):
    # the mean step over ``steps`` steps after ``warmup`` (captures, autotuning, compilation), synced
    # at both ends; the same timing for every variant.
    t_first = time.perf_counter()
    for step in range(total):
        if a.variant.startswith("model_"):
            model_step(fixed)
        elif a.variant == "flow_only":
            flow_fn(batch, est)
        else:
            b = feed.next_batch()
            b, fa, fb = feed.flow(b, look_ahead=step + 1 < total)
            model_step(views(b, fa, fb, a.crop, fmt))
        if step == 0:
            _sync(device)
            t_first = time.perf_counter() - t_first
        if step == a.warmup - 1:
            _sync(device)
            t_mark = time.perf_counter()
    _sync(device)
    step_s = (time.perf_counter() - t_mark) / a.steps
    row = {"variant": a.variant, "batch": a.batch, "frame_size": [h, w], "crop": a.crop, "optim_impl": opt.impl,
           "ms_per_step": 1000 * step_s, "steps": a.steps, "warmup": a.warmup,
           "first_step_s": t_first, "clips_per_s": a.batch / step_s,
           "flow": {"estimator": cfg.flow.estimator, "iters": cfg.flow.iters, "precision": cfg.flow.precision,
                    "cuda_graph": cfg.flow.cuda_graph, "options": cfg.flow.options,
                    "pairs_per_step": 2 * a.batch * f} if est else None,
           "overrides": a.set, "timing": "mean over the steps after warm-up, one device sync at each end"}
    if cuda:
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    _save(Path(a.out), device, row)
    print(f"  {a.variant:<15} {row['ms_per_step']:8.1f} ms/step  {row['clips_per_s']:7.1f} clips/s")
    print("RESULT " + json.dumps({k: row[k] for k in ("variant", "ms_per_step", "clips_per_s")}), flush=True)
    return row


class _ZeroFlow:
    """Stand-in estimator for the fixed views of the model-only variants."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.zeros(a.shape[0], 2, self.h, self.w, device=a.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save(out: Path, device: torch.device, row: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model_step_{device.type}.json"
    data = json.loads(path.read_text()) if path.is_file() else {
        "benchmark": "model_step", "machine": machine_info(device), "rows": {}}
    data["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data["rows"][row["variant"]] = row
    seq, ahead = data["rows"].get("seq"), data["rows"].get("ahead")
    flow, mod = data["rows"].get("flow_only"), data["rows"].get("model_fused")
    if seq and ahead and flow and mod:
        data["overlap_fraction"] = (seq["ms_per_step"] - ahead["ms_per_step"]) / min(flow["ms_per_step"],
                                                                                     mod["ms_per_step"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
