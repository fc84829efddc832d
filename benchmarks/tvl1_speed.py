"""Benchmark batched TV-L1: eager torch inner loop vs the fused Triton kernels.

Pairs of 128x176 (the working size of the flow stage) with known smooth motion: a band-limited random
texture T (bicubic interpolation of coarse noise) sampled twice, frame b = T(x), frame a = T(x + f(x)),
so the forward flow of frame a is exactly f. Each backend is timed per batch size (pairs/s) and its mean
end-point error (EPE) is reported next to the zero-flow EPE; on CUDA the two backends' flows are also
compared with each other.

    python benchmarks/tvl1_speed.py --device cuda [--quick]     # eager vs fused, up to 1,000 pairs
    python benchmarks/tvl1_speed.py --device cpu --quick        # eager only, a few pairs

Writes benchmarks/results/tvl1_speed_<device>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mscl_stream.flow.tvl1 import TVL1
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def known_motion_pairs(n: int, h: int, w: int, device: torch.device, seed: int = 0, amplitude: float = 3.0):
    """Synthetic pairs with an exact smooth forward flow.

    Returns:
        frames_a, frames_b: (n, 3, h, w) float32 in [0, 255]; flow: (n, 2, h, w) float32 pixels.
    """
    g = torch.Generator().manual_seed(seed)
    cell, margin = 3.0, 4                    # texture feature ~3 px; margin covers |flow| <= 3*margin
    nh, nw = int(h / cell) + 2 * margin, int(w / cell) + 2 * margin
    noise = torch.rand(n, 1, nh, nw, generator=g).to(device)
    coef = (torch.rand(n, 8, generator=g) * 2 - 1).to(device)
    phase = (torch.rand(n, 4, generator=g) * 2 * math.pi).to(device)
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    c = coef.view(n, 8, 1, 1)
    ph = phase.view(n, 4, 1, 1)
    u = amplitude * (0.5 * c[:, 0] + 0.3 * c[:, 1] * torch.sin(2 * math.pi * ys / h + ph[:, 0])
                     + 0.2 * c[:, 2] * torch.cos(2 * math.pi * xs / w + ph[:, 1]))
    v = amplitude * (0.5 * c[:, 3] + 0.3 * c[:, 4] * torch.cos(2 * math.pi * xs / w + ph[:, 2])
                     + 0.2 * c[:, 5] * torch.sin(2 * math.pi * ys / h + ph[:, 3]))
    flow = torch.stack((u, v), dim=1)

    def texture(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        gx = (px / cell + margin) * (2.0 / (nw - 1)) - 1.0
        gy = (py / cell + margin) * (2.0 / (nh - 1)) - 1.0
        t = F.grid_sample(noise, torch.stack((gx, gy), -1), mode="bicubic", align_corners=True)
        return (20.0 + 215.0 * t).clamp(0.0, 255.0).expand(-1, 3, -1, -1).contiguous()

    frames_b = texture(xs.expand(n, h, w), ys.expand(n, h, w))
    frames_a = texture(xs + u, ys + v)
    return frames_a, frames_b, flow


def mean_epe(flow: torch.Tensor, gt: torch.Tensor) -> float:
    return float((flow - gt).norm(dim=1).mean())


def time_call(est: TVL1, a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int):
    """Best-of-``repeats`` seconds of one call, and the flow."""
    best, flow = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        flow = est(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, flow


def profile_blocks(n: int, h: int, w: int, device: torch.device, backends: list[str]) -> list[dict]:
    """Milliseconds of the building blocks at the finest level: one inner iteration, one median,
    one warp + linearisation (shared torch code), per backend."""
    from mscl_stream.flow.tvl1 import TVL1Params, _TorchLevel, _TritonLevel
    from mscl_stream.flow.tvl1_ops import centered_gradient, warp

    a, b, gt = known_motion_pairs(n, h, w, device, seed=7)
    prm = TVL1Params(epsilon=0.0)          # nobody stops: every iteration does full work
    i0, i1 = a[:, :1].contiguous(), b[:, :1].contiguous()
    gx, gy = centered_gradient(i1)
    src = torch.cat((i1, gx, gy), 1)
    u0 = (gt * 0.5).contiguous()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ms(fn, reps):
        fn()
        fn()            # a graph variant captures on its second run: keep that out of the timing
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - t0) / reps

    def linearise():
        i1w = warp(src, u0)
        rho = i1w[:, 0:1] - i1w[:, 1:2] * u0[:, 0:1] - i1w[:, 2:3] * u0[:, 1:2] - i0
        return torch.cat((i1w[:, 1:3], rho), 1)

    out = []
    for name in ("eager", "fused", "fused_graph"):
        if name != "eager" and "fused" not in backends:
            continue
        if name == "eager":
            lev = _TorchLevel(u0.clone(), prm)
        else:
            lev = _TritonLevel(u0.clone(), prm, cuda_graph=name == "fused_graph")
        lev.begin_warp(linearise())
        row = {"backend": name, "pairs": n, "iteration_ms": ms(lambda: lev.iterate(10), 3) / 10,
               "median_ms": ms(lev.median, 5), "warp_linearise_ms": ms(linearise, 5)}
        out.append(row)
        print(json.dumps({"profile": row}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 90 s on an H100)")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated batch sizes")
    ap.add_argument("--eager-max", type=int, default=None,
                    help="largest batch for the eager backend (default: all sizes)")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=176)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile", action="store_true",
                    help="also time one iteration / median / warp at the largest batch")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    elif cuda:
        sizes = [16, 128, 1000] if args.quick else [1, 16, 64, 256, 1000]
    else:
        sizes = [1, 2] if args.quick else [1, 4]
    repeats = 1 if args.quick else 2
    backends = ["eager", "fused", "fused_nograph"] if cuda else ["eager"]
    h, w = args.height, args.width

    ests = {"eager": TVL1(device=device, use_kernel=False)}
    if "fused" in backends:
        ests["fused"] = TVL1(device=device, use_kernel=True)                 # CUDA graphs on (auto)
        ests["fused_nograph"] = TVL1(device=device, use_kernel=True, cuda_graph=False)
    # warm-up: Triton compilation and cuDNN/allocator set-up stay out of the timings
    wa, wb, _ = known_motion_pairs(2, h, w, device, seed=99)
    for est in ests.values():
        est(wa, wb)

    rows = []
    for n in sizes:
        a, b, gt = known_motion_pairs(n, h, w, device, seed=n)
        zero = float(gt.norm(dim=1).mean())
        flows = {}
        for name in backends:
            if name == "eager" and args.eager_max is not None and n > args.eager_max:
                continue
            est = ests[name]
            sec, flow = time_call(est, a, b, device, repeats if n < 1000 else 1)
            flows[name] = flow
            row = {"backend": name, "pairs": n, "seconds": sec, "ms_per_pair": 1e3 * sec / n,
                   "pairs_per_s": n / sec, "mean_epe": mean_epe(flow, gt), "zero_flow_epe": zero,
                   "iterations": est.last_stats.get("iterations"), "medians": est.last_stats.get("medians")}
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "eager" in flows and "fused" in flows:
            diff = (flows["eager"] - flows["fused"]).norm(dim=1)
            rows.append({"backend": "eager_vs_fused", "pairs": n, "mean_diff": float(diff.mean()),
                         "max_diff": float(diff.max())})
            print(json.dumps(rows[-1]), flush=True)
        del a, b, gt, flows

    blocks = profile_blocks(max(sizes), h, w, device, backends) if args.profile else []

    speedup = {}
    for n in sizes:
        e = [r for r in rows if r["backend"] == "eager" and r["pairs"] == n]
        f = [r for r in rows if r["backend"] == "fused" and r["pairs"] == n]
        if e and f:
            speedup[str(n)] = e[0]["ms_per_pair"] / f[0]["ms_per_pair"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {"benchmark": "tvl1_speed", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "device": str(device), "machine": machine_info(device), "quick": args.quick,
              "size": [h, w], "params": ests["eager"].describe()["options"], "rows": rows,
              "blocks_finest_level": blocks,
              "speedup_fused_over_eager_per_pair": speedup,
              "notes": "seconds = best of repeats of one full call (pyramid, warps, iterations); "
                       "Triton kernels compiled in a warm-up call; flows from synthetic known motion"}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"tvl1_speed_{device.type}_{stamp}"
    tmp = base.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, base.with_suffix(".json"))
    plot(result, base.with_suffix(".png"), backends)
    print(json.dumps({"speedup_fused_over_eager_per_pair": speedup}))
    print(f"wrote {base.with_suffix('.json')}")


def plot(result: dict, path: Path, backends: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in backends:
        pts = sorted((r["pairs"], r["pairs_per_s"], r["mean_epe"]) for r in result["rows"]
                     if r["backend"] == name)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"{name} (EPE {pts[-1][2]:.2f} px)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pairs per call")
    ax.set_ylabel("pairs / s")
    dev = result["machine"].get("gpu") or result["machine"]["cpu"]
    h, w = result["size"]
    ax.set_title(f"TV-L1 {h}x{w}, {dev}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
