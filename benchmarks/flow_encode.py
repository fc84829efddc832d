"""Benchmark the flow-view stage: fused Triton encode kernel vs the torch reference.

Two measurements per batch size, each for the "torch" and (on CUDA) "triton" backends:
  encode: ``flow_encode`` alone on cropped flow (B*F, 2, 112, 112) -> base + rotated images;
  views:  the whole ``motion.flow_views`` (per-frame max, crop/resize, encode) from raw
          (B, F, 2, H, W) flow at the working size.
On CUDA the backends' outputs are also compared (max quantisation levels apart).

    python benchmarks/flow_encode.py --device cuda [--quick]
    python benchmarks/flow_encode.py --device cpu --quick

Writes benchmarks/results/flow_encode_<device>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

from mscl_stream import motion
from mscl_stream.kernels import flow_encode as fe
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def make_inputs(b: int, nf: int, h: int, w: int, s: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(b, nf, 2, h, w, generator=g) * 4).to(device)
    x0 = torch.rand(b, generator=g) * 0.4
    y0 = torch.rand(b, generator=g) * 0.4
    boxes = torch.stack((x0, y0, x0 + 0.5 + 0.1 * torch.rand(b, generator=g),
                         y0 + 0.5 + 0.1 * torch.rand(b, generator=g)), -1).to(device)
    flips = (torch.rand(b, generator=g) < 0.5).to(device)
    angles = motion.fra_angles(b, generator=g).to(device)
    crops = (torch.randn(b * nf, 2, s, s, generator=g) * 4).to(device)
    params = torch.rand(b * nf, 4, generator=g)
    params[:, 1], params[:, 2] = torch.cos(params[:, 1] * 6.28), torch.sin(params[:, 1] * 6.28)
    params[:, 3] = torch.where(params[:, 3] < 0.5, -1.0, 1.0)
    params[:, 0] = 1.0 / (crops.cpu().norm(dim=1).amax((-2, -1)) + 1e-5)
    return raw, boxes, flips, angles, crops, params.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations (< 60 s on a GPU)")
    ap.add_argument("--frames", type=int, default=4, help="flow frames per window (F)")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 176), help="working size H W of the flow")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backends = ["torch"] + (["triton"] if cuda and fe.triton_available() else [])
    batches = ([8, 64] if args.quick else [8, 32, 64, 128, 256]) if cuda else ([4, 16] if args.quick else [4, 16, 32])
    warmup, iters = (3, 10) if args.quick else (5, 30)
    if not cuda:
        warmup, iters = 1, 3 if args.quick else 5
    s, nf = 112, args.frames
    rows = []
    for b in batches:
        raw, boxes, flips, angles, crops, params = make_inputs(b, nf, *args.size, s, device)
        row = {"batch": b, "frames": nf, "pixels_out": 2 * b * nf * s * s}
        for be in backends:
            row[f"encode_ms_{be}"] = timed(lambda: fe.flow_encode(crops, params, nf, backend=be),
                                           device, warmup, iters)
            row[f"views_ms_{be}"] = timed(lambda: motion.flow_views(raw, boxes, flips, angles, s, backend=be),
                                          device, warmup, iters)
        if "triton" in backends:
            ref = fe.flow_encode(crops, params, nf, backend="torch")
            tri = fe.flow_encode(crops, params, nf, backend="triton")
            lv = torch.cat([(a - c).abs().flatten() for a, c in zip(ref, tri)]) * 255
            row["max_levels_apart"] = round(lv.max().item())
            row["frac_differing"] = (lv > 0.5).float().mean().item()
            row["encode_speedup"] = row["encode_ms_torch"] / row["encode_ms_triton"]
            row["views_speedup"] = row["views_ms_torch"] / row["views_ms_triton"]
        # effective bandwidth of the fused encode: read 2 floats, write 6 floats per output pixel pair
        best = min(row[f"encode_ms_{be}"] for be in backends)
        row["encode_GBps_best"] = (b * nf * s * s * 4 * (2 + 6)) / (best * 1e-3) / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)

    stamp = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "flow_encode", "date": stamp.isoformat(timespec="seconds"),
              "device": str(device), "machine": machine_info(device), "quick": args.quick,
              "frame_size": list(args.size), "out_size": s, "warmup": warmup, "iters": iters,
              "timing": "median ms per call" + (" (CUDA events)" if cuda else " (perf_counter)"),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"flow_encode_{device.type}_{stamp.strftime('%Y%m%d-%H%M%S')}"
    tmp = base.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, base.with_suffix(".json"))
    plot(result, base.with_suffix(".png"), backends)
    print(f"wrote {base.with_suffix('.json')}")


def plot(result: dict, path: Path, backends: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for be in backends:
        ax.plot(xs, [r[f"encode_ms_{be}"] for r in rows], "o-", label=f"encode ({be})")
        ax.plot(xs, [r[f"views_ms_{be}"] for r in rows], "s--", label=f"flow_views ({be})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"batch (x {rows[0]['frames']} flow frames, 112x112 out)")
    ax.set_ylabel("ms per call (median)")
    gpu = result["machine"].get("gpu") or result["machine"]["cpu"]
    ax.set_title(f"flow views: {gpu}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
