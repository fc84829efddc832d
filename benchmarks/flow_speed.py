"""Flow estimator speed: pairs/s per estimator x size x precision x batch, and peak device memory.

For RAFT it also compares inference loops with the same (random, seeded) weights: torchvision's own
forward ("tv", upsamples after every update), our lean loop ("lean"), and on a GPU the lean loop in
CUDA graphs ("lean+graph") and compiled ("lean+compile", full mode or --compile: cold compiles take
minutes). Each RAFT variant's output is compared with "tv" (max abs difference, pixels).

    python benchmarks/flow_speed.py --device cpu --quick      # a few minutes on 2 cores
    python benchmarks/flow_speed.py --device cuda --quick     # < 90 s on an H100
    python benchmarks/flow_speed.py --device cuda             # the full grid

Peak memory is the growth of torch's CUDA allocator peak over warm-up and timed calls (graph pools
included, weights excluded), scaled to 1,000 pairs; it is not measured on CPU.
Writes benchmarks/results/flow_speed_<device>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [(128, 128), (128, 176), (256, 340)]


def textured_pairs(n: int, h: int, w: int, device: torch.device, seed: int = 0):
    """(n, 3, h, w) uint8 frames of smooth random texture and the same shifted by (3, 1) px."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, h // 6 + 2, w // 6 + 2, generator=g), size=(h + 1, w + 3),
                         mode="bicubic", align_corners=False).clamp(0, 1) * 255
    a = base[..., 1:, 3:].round().to(torch.uint8)
    b = base[..., :-1, :-3].round().to(torch.uint8)
    return a.contiguous().to(device), b.contiguous().to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan(device: torch.device, quick: bool, compile_: bool, names: list[str] | None) -> list[dict]:
    """The list of cases: estimator name, variant label, options, size, batch, precision."""
    cuda = device.type == "cuda"
    cases: list[dict] = []

    def add(name, variant, size, batch, precision="fp32", **opts):
        cases.append({"estimator": name, "variant": variant, "size": list(size), "batch": batch,
                      "precision": precision, "options": opts})

    raft_variants = [("tv", {"loop": "torchvision"}), ("lean", {"loop": "lean"})]
    if cuda:
        raft_variants.append(("lean+graph", {"loop": "lean", "cuda_graph": True}))
        if compile_ or not quick:
            raft_variants.append(("lean+compile", {"loop": "lean", "compile": True}))
    if cuda and quick:
        for arch, batch in (("raft_small", 64), ("raft_large", 32)):
            for variant, opts in raft_variants:
                add(arch, variant, (128, 176), batch, "bf16", **opts)
        add("raft_small", "lean", (128, 176), 64, "fp32", loop="lean")
        for size in ((128, 128), (256, 340)):
            add("raft_small", "lean+graph", size, 64, "bf16", loop="lean", cuda_graph=True)
        for name in ("dis_fast", "farneback", "tvl1", "dali_of"):
            add(name, "default", (128, 176), 64)
    elif cuda:
        for arch in ("raft_small", "raft_large"):
            for size in SIZES:
                for precision in ("fp32", "bf16", "fp16"):
                    for batch in (16, 64, 256):
                        for variant, opts in raft_variants:
                            if variant != "lean" and (precision == "fp16" or batch == 16):
                                continue      # keep the grid tractable: variants at bf16/fp32, b>=64
                            add(arch, variant, size, batch, precision, **opts)
        for name in ("dis_fast", "dis_medium", "farneback", "tvl1", "dali_of"):
            for size in SIZES:
                add(name, "default", size, 64)
    else:
        sizes = SIZES[:2] if quick else SIZES
        for arch, batch in (("raft_small", 2), ("raft_large", 1)):
            for size in sizes:
                for variant, opts in raft_variants:
                    if arch == "raft_large" and size != (128, 176) and quick:
                        continue
                    add(arch, variant, size, batch, "fp32", **opts)
        for name in ("dis_fast", "dis_medium", "farneback"):
            for size in SIZES:
                add(name, "default", size, 8)
        add("tvl1", "default", (128, 176), 2)
    if names:
        cases = [c for c in cases if c["estimator"] in names]
    return cases


def run_case(case: dict, device: torch.device, iters: int, min_time: float, max_calls: int,
             reference: dict) -> dict:
    name, (h, w), batch = case["estimator"], case["size"], case["batch"]
    opts = dict(case["options"], device=device)
    if name.startswith("raft"):
        opts.update(weights="none", iters=iters, precision=case["precision"])
    row = dict(case)
    try:
        torch.manual_seed(0)                       # identical random weights for every RAFT variant
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = get_estimator(name, **opts)
            a, b = textured_pairs(batch, h, w, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            out = est(a, b)                        # warm-up: cuDNN autotune, graph capture, compile
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            est(a, b)
            sync(device)
            calls, t0 = 0, time.perf_counter()
            while True:
                est(a, b)
                calls += 1
                if device.type == "cuda" and calls % 2:
                    continue
                sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= min_time or calls >= max_calls:
                    break
        row["notes"] = sorted({str(c.message).splitlines()[0][:160] for c in caught
                               if "RANDOM INITIALISATION" not in str(c.message)})
    except Exception as e:     # one failing case (missing hardware, an import) must not stop the run
        row["error"] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {name:<11} {case['variant']:<13} {h}x{w}: unavailable ({row['error']})")
        return row
    row["calls"] = calls
    row["pairs_per_s"] = batch * calls / elapsed
    row["ms_per_pair"] = 1000 * elapsed / (batch * calls)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        row["peak_mib_per_1000_pairs"] = peak / batch * 1000 / 2 ** 20
    if name.startswith("raft"):
        key = (name, h, w, batch, case["precision"])
        if case["variant"] == "tv":
            reference[key] = out.float()
        elif key in reference:
            row["max_abs_diff_vs_tv"] = (out.float() - reference[key]).abs().max().item()
    mem = f"{row['peak_mib_per_1000_pairs']:.0f} MiB/1k" if "peak_mib_per_1000_pairs" in row else ""
    diff = f"|d|max vs tv {row['max_abs_diff_vs_tv']:.2e}" if "max_abs_diff_vs_tv" in row else ""
    print(f"  {name:<11} {case['variant']:<13} {h}x{w} {case['precision']:<5} b={batch:<4} "
          f"{row['pairs_per_s']:9.1f} pairs/s {row['ms_per_pair']:8.2f} ms/pair {mem} {diff}", flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "pairs_per_s" in r]
    labels = [f"{r['estimator']} {r['variant']} {r['size'][0]}x{r['size'][1]} {r['precision']} b{r['batch']}"
              for r in ok]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(ok) + 1.2))
    ax.barh(range(len(ok)), [r["pairs_per_s"] for r in ok],
            color=["C0" if r["estimator"].startswith("raft") else "C1" for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("pairs / s (log)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="short grid (< 90 s on an H100)")
    ap.add_argument("--compile", action="store_true", help="include torch.compile variants in --quick")
    ap.add_argument("--estimators", nargs="*", help="restrict to these names")
    ap.add_argument("--iters", type=int, default=12, help="RAFT updates")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    min_time, max_calls = (0.5, 20) if a.quick else (2.0, 200)
    if device.type == "cpu":
        min_time, max_calls = (0.5, 3) if a.quick else (2.0, 20)
    cases = plan(device, a.quick, a.compile, a.estimators)
    print(f"flow_speed on {device} ({'quick' if a.quick else 'full'}): {len(cases)} cases, RAFT iters {a.iters}")
    started = time.perf_counter()
    reference: dict = {}
    rows = [run_case(c, device, a.iters, min_time, max_calls, reference) for c in cases]
    stamp = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "flow_speed", "date": stamp.isoformat(timespec="seconds"), "device": str(device),
              "quick": a.quick, "raft_iters": a.iters, "raft_weights": "random init (speed only)",
              "machine": machine_info(device), "wall_s": time.perf_counter() - started, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"flow_speed_{device.type}_{stamp.strftime('%Y%m%d-%H%M%S')}"
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"{stem}.json")
    plot(rows, out / f"{stem}.png", f"flow speed on {result['machine'].get('gpu') or result['machine']['cpu']} "
                                    f"(RAFT {a.iters} iters)")
    print(f"wrote {out / stem}.json/.png in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
