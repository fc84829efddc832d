"""`mscl-stream eval KIND --splits 1,2,3`: one evaluation per numbered split, then their mean and spread.

``data.manifest`` holds the placeholder ``{split}`` (``ucf101_split{split}.jsonl``, as ``mscl-stream
index --split 1,2,3`` writes them). Each split runs in full on its own manifest: a fine-tune gets its own
run folder ``<eval.out_dir>/split<N>`` (so each split resumes on its own), and its results file is
``--out`` with ``{split}`` filled in (or ``_split<N>`` added before the extension). The summary gives,
per view count and metric, the values per split, their mean, the sample standard deviation (n - 1;
0 for a single split) and the minimum and maximum; it is written beside the per-split files
(``<out>_summary.json``) or, without ``--out``, as ``<eval.out_dir>/summary_<kind>.json``. Under torchrun
every split's fine-tune runs in one process group, which this command joins first and leaves last.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mscl_stream.config import Config
from mscl_stream.distributed import barrier, init_distributed, release
from mscl_stream.errors import UserError

METRIC_KEYS = ("top1", "top5", "R@1", "R@5", "R@10", "R@20", "R@50")


def parse_splits(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3]; a one-line UserError for anything else."""
    try:
        splits = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--splits {text!r}: expected numbers separated by commas, e.g. 1,2,3") from None
    if not splits or min(splits) < 0 or len(set(splits)) != len(splits):
        raise UserError(f"--splits {text!r}: expected distinct split numbers, e.g. 1,2,3")
    return splits


def split_path(path: str, split: int) -> str:
    """``path`` for one split: its ``{split}`` filled in, else ``_split<N>`` before the extension."""
    if "{split}" in path:
        return path.replace("{split}", str(split))
    p = Path(path)
    return str(p.with_name(f"{p.stem}_split{split}{p.suffix}"))


def summary_path(path: str) -> str:
    """Where the summary of the per-split files ``path`` goes: ``<stem>_summary<ext>`` without ``{split}``."""
    p = Path(path.replace("{split}", ""))
    return str(p.with_name(f"{p.stem.rstrip('_-')}_summary{p.suffix or '.json'}"))


def spread(values: Sequence[float]) -> dict:
    """{"values", "mean", "std" (sample, n - 1; 0 for one value), "min", "max"} of one metric over splits."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"values": list(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def summarise(kind: str, per_split: dict[int, dict]) -> dict:
    """The summary of one kind's results per split (each a run_eval result; fine-tune's "by_views" too)."""
    by_views: dict[str, dict[str, list[float]]] = {}
    for split in sorted(per_split):
        res = per_split[split]
        views = res.get("by_views") or {res["views"]: res}
        for label, metrics in views.items():
            for key in METRIC_KEYS:
                if isinstance(metrics.get(key), float):
                    by_views.setdefault(label, {}).setdefault(key, []).append(metrics[key])
    first = per_split[min(per_split)]
    return {"kind": kind, "dataset": first.get("dataset", ""), "splits": sorted(per_split),
            "summary": True, "views": {label: {k: spread(v) for k, v in m.items()} for label, m in by_views.items()},
            "encoder": first.get("encoder"), "per_split": {str(s): per_split[s].get("info", {}).get("run_dir")
                                                          for s in sorted(per_split)}}


def run_splits(kind: str, splits: Sequence[int], checkpoint: str | None, cfg: Config, out: str | None,
               prefix: str) -> dict:
    """Evaluate ``kind`` on each split's manifest; returns (and writes) the summary."""
    from mscl_stream.eval import check_writable, run_eval, write_json
    manifest = cfg.data.manifest
    if "{split}" not in manifest:
        raise UserError(f"--splits: data.manifest={manifest or '(unset)'} needs the placeholder {{split}}, "
                        f"e.g. data.manifest=ucf101_split{{split}}.jsonl")
    missing = [manifest.replace("{split}", str(s)) for s in splits
               if not Path(manifest.replace("{split}", str(s))).is_file()]
    if missing:
        raise UserError(f"--splits: no manifest {missing[0]} ({len(missing)} of {len(splits)} splits missing)")
    where = summary_path(out) if out else str(Path(cfg.eval.out_dir) / f"summary_{kind}.json")
    check_writable(where)
    # under torchrun the fine-tunes share one process group, joined here and left at the end: a group left
    # and re-joined between splits meets the old rendezvous's keys (ranks arriving out of step fail or hang)
    dist = init_distributed(cfg.dist.backend, device=cfg.train.device) if kind == "finetune" else None
    per_split = {}
    try:
        for s in splits:
            scfg = dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, manifest=manifest.replace("{split}", str(s))),
                eval=dataclasses.replace(cfg.eval, out_dir=str(Path(cfg.eval.out_dir) / f"split{s}")))
            per_split[s] = run_eval(kind, checkpoint, scfg, split_path(out, s) if out else None, prefix, split=s)
            barrier()       # every rank ends split s (its results written by rank 0) before the next begins
    finally:
        if dist is not None:
            release(dist)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:            # under torchrun rank 0 summarises, writes and prints (it alone has retrieval results)
        return {"kind": kind, "splits": list(splits), "rank": rank}
    summary = summarise(kind, per_split)
    write_json(where, summary)
    for label, metrics in summary["views"].items():
        shown = ", ".join(f"{k} {100 * m['mean']:.1f} +- {100 * m['std']:.1f}%" for k, m in metrics.items())
        print(f"eval {kind} {label} over splits {','.join(map(str, splits))}: {shown} -> {where}", flush=True)
    return summary

