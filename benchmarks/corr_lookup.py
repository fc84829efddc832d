"""RAFT correlation lookup alone: grid_sample over the pyramid vs the Triton kernel (kernels/corr_lookup.py).

One lookup per RAFT update; raft_small has radius 3 and 4 levels, raft_large radius 4. Times the
lookup for ``--pairs`` pairs of (H/8, W/8) feature maps (default: 512 pairs = one training step at
batch 64, 128x176 frames), reports the max difference between the two, and writes
OUT/corr_lookup_<device>_<date>.json. On CPU the kernel runs only under TRITON_INTERPRET=1 (a parity
run; its timings say nothing about a GPU).

    python benchmarks/corr_lookup.py --device cuda
    TRITON_INTERPRET=1 python benchmarks/corr_lookup.py --device cpu --pairs 2 --reps 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

from mscl_stream.flow.raft_loop import corr_lookup, corr_pyramid, lookup_offsets
from mscl_stream.kernels import corr_lookup as kernel
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds per call over ``reps`` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--size", type=int, nargs=2, default=[128, 176], metavar=("H", "W"), help="frame size")
    ap.add_argument("--channels", type=int, default=128, help="feature channels (raft_small 128)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    h, w = a.size[0] // 8, a.size[1] // 8
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(a.pairs, a.channels, h, w, generator=g).to(device)
    f2 = torch.randn(a.pairs, a.channels, h, w, generator=g).to(device)
    pyr = corr_pyramid(f1, f2, 4)
    flat = kernel.flat_pyramid(pyr)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = (torch.stack([xs, ys])[None] + 3 * torch.randn(a.pairs, 2, h, w, generator=g)).to(device)
    rows = []
    for radius in (3, 4):
        offsets = lookup_offsets(radius, device)
        ref = corr_lookup(pyr, coords, offsets)
        out = kernel.corr_lookup(flat, coords, 4, radius)
        row = {"radius": radius, "max_abs_diff": float((out - ref).abs().max()), "scale": float(ref.abs().max())}
        for label, fn in (("grid_sample", lambda: corr_lookup(pyr, coords, offsets)),
                          ("grid_sample_channels_last", lambda: corr_lookup(pyr, coords, offsets, True)),
                          ("triton", lambda: kernel.corr_lookup(flat, coords, 4, radius)),
                          ("triton_channels_last", lambda: kernel.corr_lookup(flat, coords, 4, radius, True))):
            row[f"{label}_ms"] = 1000 * timed(fn, a.reps, device)
        row["speedup"] = row["grid_sample_ms"] / row["triton_ms"]
        rows.append(row)
        print(f"  radius {radius}: grid_sample {row['grid_sample_ms']:.3f} ms, triton {row['triton_ms']:.3f} ms "
              f"({row['speedup']:.2f}x), max |diff| {row['max_abs_diff']:.2e}", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "corr_lookup", "date": stamp.isoformat(timespec="seconds"), "device": str(device),
              "pairs": a.pairs, "feature_map": [h, w], "levels": 4, "reps": a.reps,
              "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "machine": machine_info(device),
              "flat_pyramid_ms": 1000 * timed(lambda: kernel.flat_pyramid(pyr), a.reps, device), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"corr_lookup_{device.type}_{stamp.strftime('%Y%m%d-%H%M%S')}"
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"{stem}.json")
    print(f"wrote {out / stem}.json")
    print("RESULT " + json.dumps({"corr_lookup_speedup_r3": rows[0]["speedup"]}))
    return result


if __name__ == "__main__":
    main()
