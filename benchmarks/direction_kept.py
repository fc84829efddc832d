"""Does an encoder keep the direction of motion? Within-class nearest neighbours on the `motion` task.

The `motion` task's classes are what a rotation of the flow keeps; the direction of motion is drawn per
video at random, independently of the class. FRA's clip terms teach the RGB encoder that the direction
is a nuisance. This measures how much of the direction each finished run of a `mscl-stream ablate
--task motion` study keeps:

- every run's RGB encoder (its final checkpoint; the seeded random init for ``random_init``) embeds the
  study's train and test videos with the study's own evaluation (one centred clip, as the rows);
- for each test video of a class with a signed direction (pan, steady, stop_go, pair_same), its nearest
  train video *of the same class* is found with retrieval's similarity (each set centred, L2-normalised,
  dot product), and the angle between the two videos' directions is measured
  (``mscl_stream.data.synthetic.motion_draws`` replays what the generator drew);
- angles are folded by the horizontal flip (the augmentation's flips make the sign of the horizontal
  component invisible: theta and 180 - theta count as one direction), so they lie in 0-180 degrees;
- chance: the mean folded angle from the query to every train video of its class (a neighbour picked
  blind to direction). Within one class the class cannot explain a small angle, only the direction can.

Per run: the mean nearest-neighbour angle and its chance; per variant: mean +- standard error over
seeds of (chance - nearest), how many degrees closer than chance the neighbour's direction is.

    python benchmarks/direction_kept.py --study benchmarks/results/ablation_motion_cpu

Writes benchmarks/results/direction_kept_cpu_<date>.json (+ .png) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_variance import RESULTS, find_runs, save_figure, study_config, write_json  # noqa: E402

SIGNED = ("pan", "steady", "stop_go", "pair_same")      # classes whose parts move with one signed direction


def folded_angle(a_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
    """Angle between directions ``a`` and ``b`` (degrees, broadcast), with ``b`` and its horizontal mirror
    (180 - b) counted as one direction: the smaller of the two circular distances, in [0, 180]."""
    def circ(x, y):
        d = np.abs((np.asarray(x, np.float64) - y) % 360.0)
        return np.minimum(d, 360.0 - d)
    return np.minimum(circ(a_deg, b_deg), circ(a_deg, 180.0 - np.asarray(b_deg, np.float64)))


def nearest_angles(q_feats, q_angles, q_classes, g_feats, g_angles, g_classes, classes=SIGNED) -> dict:
    """Per query of ``classes``: the folded angle to its most similar gallery video of the same class, and
    the mean folded angle to all of them (chance). Features are centred and normalised per set, as retrieval.

    Args: (N, D) features, (N,) angles in degrees and (N,) class names, for queries and gallery.

    Returns: {"nearest": [...], "chance": [...], "classes": [...]} over the queries kept, in order.
    """
    import torch

    from mscl_stream.eval.retrieval import _centre_normalise      # retrieval's own similarity

    q, g = (_centre_normalise(torch.as_tensor(np.asarray(x))).numpy() for x in (q_feats, g_feats))
    g_classes, g_angles = np.asarray(g_classes), np.asarray(g_angles, np.float64)
    out = {"nearest": [], "chance": [], "classes": []}
    for i, c in enumerate(q_classes):
        if c not in classes:
            continue
        same = np.flatnonzero(g_classes == c)
        if len(same) < 2:
            raise SystemExit(f"direction_kept: class {c} has {len(same)} train videos; need >= 2")
        j = same[int(np.argmax(g[same] @ q[i]))]
        out["nearest"].append(float(folded_angle(q_angles[i], g_angles[j])))
        out["chance"].append(float(folded_angle(q_angles[i], g_angles[same]).mean()))
        out["classes"].append(c)
    return out


def _key(path: str) -> str:
    """split/class/name without the suffix: the key of motion_draws."""
    p = Path(path)
    return f"{p.parent.parent.name}/{p.parent.name}/{p.stem}"


def embed(row: dict, run_dir: Path, draws: dict[str, dict]):
    """(train feats, angles, classes), (test ...) of one run's encoder, with the draw of every video checked
    against the manifest (frames, size, class) so a study made with other videos fails here."""
    from mscl_stream.eval import split_records
    from mscl_stream.eval.features import build_r3d, extract_features

    cfg = study_config(row, run_dir, ["data.decode_workers=1"])
    train, test, _ = split_records(cfg.data.manifest)
    ckpt = None if row["variant"] == "random_init" else str(run_dir / "pretrain" / "checkpoints" / "last.pt")
    encoder, _ = build_r3d(ckpt, seed=cfg.train.seed, width=cfg.model.rgb_width)
    encoder.eval()
    sets = []
    for records in (train, test):
        meta = []
        for r in records:
            d = draws.get(_key(r.path))
            if d is None or d["frames"] != r.num_frames or d["size"] != [r.height, r.width]:
                raise SystemExit(f"direction_kept: {r.path} is not the video the generator's replay describes "
                                 "(another seed or profile? see --data-seed, --profile)")
            meta.append(d)
        feats, labels = extract_features(encoder, records, cfg, "cpu", clips=1)
        if len(labels) != len(records):
            raise SystemExit(f"direction_kept: {len(records) - len(labels)} videos did not decode")
        sets.append((feats.numpy(), np.array([m["angle_deg"] for m in meta]), [m["class"] for m in meta]))
    return sets


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per variant: per seed mean nearest / chance angle and their gap; mean +- SE of the gap over seeds."""
    out = {}
    for variant, by_seed in runs.items():
        per = {s: {"nearest": float(np.mean(r["nearest"])), "chance": float(np.mean(r["chance"])),
                   "queries": len(r["nearest"])} for s, r in sorted(by_seed.items())}
        gaps = [p["chance"] - p["nearest"] for p in per.values()]
        n = len(gaps)
        sd = float(np.std(gaps, ddof=1)) if n > 1 else None
        out[variant] = {"per_seed": per, "gap_mean": float(np.mean(gaps)), "gap_se": sd / math.sqrt(n) if sd else None,
                        "nearest_mean": float(np.mean([p["nearest"] for p in per.values()])),
                        "chance_mean": float(np.mean([p["chance"] for p in per.values()]))}
    return out


def markdown(summary: dict[str, dict]) -> str:
    lines = ["| variant | seeds | nearest neighbour's angle (deg) | chance (deg) | closer than chance (deg) "
             "| per seed |", "| --- | --- | --- | --- | --- | --- |"]
    for v, e in summary.items():
        se = f" +- {e['gap_se']:.1f}" if e["gap_se"] is not None else ""
        per = ", ".join(f"{p['chance'] - p['nearest']:.1f}" for p in e["per_seed"].values())
        lines.append(f"| {v} | {len(e['per_seed'])} | {e['nearest_mean']:.1f} | {e['chance_mean']:.1f} "
                     f"| {e['gap_mean']:.1f}{se} | {per} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(summary)), 3.8))
    for i, (v, e) in enumerate(summary.items()):
        for j, (s, p) in enumerate(e["per_seed"].items()):
            ax.plot(i - 0.15 + 0.1 * j, p["chance"] - p["nearest"], "o", color=f"C{int(s) % 10}", ms=5,
                    label=f"seed {s}" if i == 0 else None)
        ax.errorbar(i + 0.3, e["gap_mean"], yerr=e["gap_se"] or 0, fmt="s", color="k", capsize=4,
                    label="mean +- SE" if i == 0 else None)
    ax.axhline(0, color="0.6", ls="--", lw=1)
    ax.set_xticks(range(len(summary)), list(summary), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("degrees closer than chance")
    fig.suptitle(f"direction kept by the RGB encoder: same-class nearest neighbour, {result['task']} task "
                 f"({result['machine'].get('cpu', 'cpu')})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, default=RESULTS / "ablation_motion_cpu")
    ap.add_argument("--variants", nargs="+", default=["random_init", "full", "no_fra", "rgb_only"])
    ap.add_argument("--videos", type=int, default=210, help="videos the study's data was made with")
    ap.add_argument("--data-seed", type=int, default=0, help="seed the study's videos were made with")
    ap.add_argument("--profile", default="toy")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.study / "runs").is_dir():
        raise SystemExit(f"--study {args.study}: not a study folder (no runs/ in it)")
    import torch

    from mscl_stream.data.synthetic import motion_draws
    from mscl_stream.machine import machine_info

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0, load0 = time.perf_counter(), os.getloadavg()
    draws = motion_draws(args.videos, seed=args.data_seed, profile=args.profile)
    runs: dict[str, dict[int, dict]] = {}
    for variant in args.variants:
        done, missing = find_runs(args.study, variant, None)
        print(f"{variant}: seeds {sorted(done)}" + (f" ({missing} not finished)" if missing else ""), flush=True)
        for seed, (run_dir, row) in sorted(done.items()):
            (gf, ga, gc), (qf, qa, qc) = embed(row, run_dir, draws)
            runs.setdefault(variant, {})[seed] = nearest_angles(qf, qa, qc, gf, ga, gc)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "study": str(args.study), "task": "motion",
              "classes": list(SIGNED), "summary": summarise(runs), "runs": runs,
              "machine": machine_info("cpu"), "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(),
              "seconds": round(time.perf_counter() - t0, 1), "versions": {"torch": torch.__version__,
                                                                          "numpy": np.__version__}}
    out = args.out_dir / f"direction_kept_cpu_{time.strftime('%Y%m%d')}.json"
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print("\n" + markdown(result["summary"]) + f"\nwrote {out} (+ .png)")


if __name__ == "__main__":
    main()
