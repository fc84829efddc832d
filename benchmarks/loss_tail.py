"""Where a run's loss terms end against their chance values: which encoder a flat run lost.

A contrastive term whose logits do not tell the positive from the negatives scores its chance value:
ln(1 + queue) for the clip terms, ln(2 T) for LMCL. ``loss_tail`` reads a run's pretrain/metrics.jsonl
and gives each term's mean over the last steps next to that value; ``cross_margin`` does so for every
run of an ablation study that trains the four RGB-flow cross terms, with the run's R@1 and the rank
correlation of the two. benchmarks/seed_variance.py puts both in its JSON and tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml


def loss_tail(run_dir: Path, last: int = 500) -> dict:
    """Each logged loss term's mean over the run's last ``last`` steps (pretrain/metrics.jsonl), against its
    chance value, the loss of logits that do not tell the positive from the negatives: ln(1 + queue) for
    the clip terms, ln(2 T) for LMCL (T = ceil(frames / 2), the time steps of R3D-18's layer2, its level 0).
    A term near its chance value at the end of a run has not learned; which terms did says which encoder
    a flat run lost."""
    cfg = yaml.safe_load((run_dir / "pretrain" / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "step" in r and any(k.startswith("loss/") for k in r)]
    if not rows:
        raise SystemExit(f"loss_tail: {run_dir}/pretrain/metrics.jsonl has no logged loss")
    end = max(r["step"] for r in rows)
    tail = [r for r in rows if r["step"] > end - last]
    terms = sorted({k[5:] for r in tail for k in r if k.startswith("loss/") and k != "loss/loss"})
    clip_chance = math.log(1 + cfg["model"]["queue_size"])
    lmcl_chance = math.log(2 * math.ceil(cfg["data"]["frames_per_clip"] / 2))
    out = {"steps": [min(r["step"] for r in tail), end], "logs": len(tail), "terms": {}}
    for t in terms:
        vals = [r[f"loss/{t}"] for r in tail if f"loss/{t}" in r]
        chance = lmcl_chance if t == "lmcl" else clip_chance
        out["terms"][t] = {"mean": sum(vals) / len(vals), "chance": chance}
    return out


def loss_tail_markdown(tails: dict[int, dict], rows: dict[int, float]) -> str:
    """Per seed: its R@1 and each loss term's mean over the last logs / its chance value."""
    terms = list(dict.fromkeys(t for tl in tails.values() for t in tl["terms"]))
    lines = ["| seed | R@1 | " + " | ".join(terms) + " |", "|" + " --- |" * (len(terms) + 2)]
    for seed, tl in sorted(tails.items()):
        cells = [f"{tl['terms'][t]['mean']:.2f}" if t in tl["terms"] else "-" for t in terms]
        lines.append(f"| {seed} | {rows[seed]:.3f} | " + " | ".join(cells) + " |")
    chance = [f"{next(tl['terms'][t]['chance'] for tl in tails.values() if t in tl['terms']):.2f}" for t in terms]
    lines.append("| chance | | " + " | ".join(chance) + " |")
    return "\n".join(lines) + "\n"


CROSS = ("rgb_flow", "flow_rgb", "rgb_rot", "rot_rgb")


def cross_margin(study: Path) -> dict:
    """For every finished run of the study that trains all four RGB-flow cross terms: how far their mean
    over the last 500 steps ends below chance (loss_tail), next to the run's R@1, and the rank
    correlation of the two over the runs. Does the end of a run's loss already say whether its RGB
    encoder learned?"""
    from scipy.stats import spearmanr

    runs = []
    for row_path in sorted(study.glob("runs/*/seed*/row.json")):
        metrics = row_path.parent / "pretrain" / "metrics.jsonl"
        if not metrics.is_file():
            continue
        terms = loss_tail(row_path.parent)["terms"]
        if not all(t in terms for t in CROSS):
            continue
        row = json.loads(row_path.read_text())
        margin = sum(terms[t]["chance"] - terms[t]["mean"] for t in CROSS) / len(CROSS)
        runs.append({"variant": row["variant"], "seed": row["seed"], "margin": margin, "R@1": row["R@1"]})
    rho = spearmanr([r["margin"] for r in runs], [r["R@1"] for r in runs]) if len(runs) > 2 else None
    return {"runs": runs, "spearman": None if rho is None else {"rho": float(rho.statistic), "p": float(rho.pvalue)}}
