"""RAFT speed variants: pairs/s and EPE against the reference loop, one variant per call.

The reference is the production loop (raft_small, lean loop in CUDA graphs, 12 updates, bf16 on a
GPU). Each variant (VARIANTS) adds speed options: the Triton correlation lookup, channels_last, a
compiled update block, fewer updates, warm start along chains of 4 pairs. Every variant gets the same
seeded random weights (speed does not depend on their values), is timed on ``--batch`` textured pairs
(warm-up excluded: cuDNN autotuning, graph capture, compilation), and its flow is compared on chains
of known-flow pairs (benchmarks/flow_accuracy.py's synthetic chains) with the reference's flow on the
same pairs (saved by the reference run in OUT/raft_variants_ref_<device>.pt; a variant run without it
computes it) and with the ground truth. With random weights, the EPE against the reference tells
whether a variant computes the same function; the accuracy of fewer updates or warm start needs
real weights (--weights).

    python benchmarks/raft_variants.py --device cuda --variant reference   # then each other variant
    python benchmarks/raft_variants.py --device cpu --size 128 128 --batch 4 --iters 2 --variant all  # dry run

OUT/raft_variants_<device>.json collects one row per variant (rewritten after each); the last line
printed is ``RESULT {json}`` with the row (gpu_check collects it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_accuracy import CHAIN, MARGIN, MOTIONS, build_chains, epe, synthetic_images  # noqa: E402
from flow_speed import sync, textured_pairs  # noqa: E402

from mscl_stream.flow import get_estimator  # noqa: E402
from mscl_stream.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "reference"
# name -> options on top of the reference's (lean loop, cuda_graph on, iters from --iters)
VARIANTS = {
    REFERENCE: {},
    "eager": {"cuda_graph": False},
    "triton": {"corr": "triton"},
    "channels_last": {"channels_last": True},
    "triton_channels_last": {"corr": "triton", "channels_last": True},
    "triton_compile_update": {"corr": "triton", "compile_update": True},
    "compile_update_eager": {"compile_update": True, "cuda_graph": False},
    "iters_8": {"iters": 8},
    "warm_start_6": {"warm_start": CHAIN, "warm_iters": 6},
    "triton_warm_start_6": {"corr": "triton", "warm_start": CHAIN, "warm_iters": 6},
}


def estimator(name: str, args, device: torch.device):
    opts = {"device": device, "weights": args.weights, "iters": args.iters, "precision": args.precision,
            "cuda_graph": device.type == "cuda", **VARIANTS[name]}
    torch.manual_seed(0)                    # identical random weights for every variant
    return get_estimator("raft_small", **opts)


def known_flow_pairs(args) -> dict:
    h, w = args.size
    rng = np.random.default_rng(args.seed)
    images = synthetic_images(args.epe_chains + 1, h + 2 * MARGIN, w + 2 * MARGIN, rng)
    return build_chains(images, args.epe_chains, h, w, args.seed + 7)


def run_variant(name: str, args, device: torch.device, out: Path) -> dict:
    h, w = args.size
    row: dict = {"variant": name, "options": VARIANTS[name], "size": [h, w], "batch": args.batch,
                 "iters": VARIANTS[name].get("iters", args.iters), "precision": args.precision,
                 "weights": args.weights}
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = estimator(name, args, device)
        row["describe"] = est.describe()["options"]
        a, b = textured_pairs(args.batch, h, w, device)
        t0 = time.perf_counter()
        est(a, b)                               # warm-up: autotune, capture, compile
        sync(device)
        row["first_call_s"] = time.perf_counter() - t0
        est(a, b)
        sync(device)
        calls, t0 = 0, time.perf_counter()
        while True:
            est(a, b)
            calls += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= args.min_time or calls >= args.max_calls:
                break
        row.update(calls=calls, pairs_per_s=args.batch * calls / elapsed, ms_per_call=1000 * elapsed / calls)
        # accuracy on chains of known-flow pairs, against the reference's flow on the same pairs
        cases = known_flow_pairs(args)
        ref_path = out / f"raft_variants_ref_{device.type}.pt"
        ref = torch.load(ref_path, weights_only=True) if (name != REFERENCE and ref_path.is_file()) else None
        if ref is None and name != REFERENCE:
            ref_est = estimator(REFERENCE, args, device)
            ref = {m: ref_est(c[0].to(device), c[1].to(device)).cpu() for m, c in cases.items()}
        preds = {m: est(c[0].to(device), c[1].to(device)).cpu() for m, c in cases.items()}
        if name == REFERENCE:
            ref = preds
            tmp = ref_path.with_suffix(".tmp")
            torch.save(preds, tmp)
            os.replace(tmp, ref_path)
        row["epe_vs_reference"] = {m: epe(preds[m], ref[m]) for m in MOTIONS}
        row["epe_vs_truth"] = {m: epe(preds[m], cases[m][2]) for m in MOTIONS}
        for key in ("epe_vs_reference", "epe_vs_truth"):
            row[key]["mean"] = float(np.mean([row[key][m] for m in MOTIONS]))
        row["ref_mean_magnitude"] = float(np.mean([torch.linalg.vector_norm(ref[m], dim=1).mean() for m in MOTIONS]))
    row["notes"] = sorted({str(c.message).splitlines()[0][:160] for c in caught
                           if "RANDOM INITIALISATION" not in str(c.message)})
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    row["wall_s"] = time.perf_counter() - t_start
    return row


def save(out: Path, device: torch.device, row: dict) -> None:
    """Merge ``row`` into OUT/raft_variants_<device>.json (atomic rewrite)."""
    path = out / f"raft_variants_{device.type}.json"
    data = json.loads(path.read_text()) if path.is_file() else {
        "benchmark": "raft_variants", "machine": machine_info(device), "rows": {}}
    data["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data["rows"][row["variant"]] = row
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", nargs="+", default=["all"], choices=[*VARIANTS, "all"], metavar="NAME",
                    help=f"names from {list(VARIANTS)} or all")
    ap.add_argument("--size", type=int, nargs=2, default=[128, 176], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=64, help="pairs per call (timing)")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--weights", default="none", help="raft_small weights (file or enum name); none = random")
    ap.add_argument("--epe-chains", type=int, default=16, help="chains of 4 known-flow pairs per motion")
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--max-calls", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = list(VARIANTS) if args.variant == ["all"] else args.variant
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        try:
            row = run_variant(name, args, device, out)
        except Exception as e:       # one failing variant must not stop the others
            row = {"variant": name, "options": VARIANTS[name], "error": f"{type(e).__name__}: {str(e)[:300]}"}
        save(out, device, row)
        if "error" in row:
            failed.append(name)
            print(f"  {name:<24} failed: {row['error']}", flush=True)
        else:
            print(f"  {name:<24} {row['pairs_per_s']:9.1f} pairs/s  EPE vs reference "
                  f"{row['epe_vs_reference']['mean']:.4f} px (truth {row['epe_vs_truth']['mean']:.3f})  "
                  f"first call {row['first_call_s']:.1f} s", flush=True)
        print("RESULT " + json.dumps({k: row.get(k) for k in ("variant", "pairs_per_s", "error")}
                                     | {"epe_vs_reference": (row.get("epe_vs_reference") or {}).get("mean")}),
              flush=True)
    if failed:
        raise SystemExit(f"raft_variants: {len(failed)} variant(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
