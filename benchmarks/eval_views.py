"""Evaluation clips/s on CPU: the eval decode path through PyAV worker processes vs the thread pool before it.

The same videos, clips and geometry through each path:
  before           ``extract_features`` of ``mscl_stream/eval/features.py`` as it was at git ref
                   ``--baseline-ref`` (loaded from its text): a thread pool of ``decode_workers`` threads
  threads          today's ``extract_features`` with ``data.pyav_workers: threads``
  processes        today's ``extract_features`` in the PyAV worker processes (the default)
  views_10x3       ``score_views`` at the UCF101 test protocol (short side 128, clips x 3 crops of 112):
                   views/s, no baseline (the path before had no multi-crop views)
The model is a spatio-temporal mean (``--model pool``: the input path alone) or a random-init R3D-18
(``--model r3d``: what an evaluation costs end to end on this CPU). The worker processes start once per
process (each imports the main module: seconds) and are kept for later passes; the first round, a
warm-up, pays that start (its rows are in the JSON). Paths are interleaved, the order rotating per
round; rates are medians over the rounds after the first. CPU time counts this process and its
children and its live descendants (the kept worker processes).

    python benchmarks/eval_views.py --profile ucf101 --rounds 5

Writes benchmarks/results/eval_views_cpu_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
BASELINE_REF = "4a768a6"      # the last commit with the thread-pool eval decode
PATHS = ("before", "threads", "processes", "views_10x3")


def baseline_features(ref: str):
    """``mscl_stream/eval/features.py`` as it was at git ``ref``, loaded as a module of its own (its
    imports still exist)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:mscl_stream/eval/features.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "features_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("features_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Pool(torch.nn.Module):
    """(B, 3, T, S, S) -> (B, 3): the input path alone, with a model that costs next to nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3, 4))


def _live_descendants_cpu() -> float:
    """CPU seconds of this process's live descendants (the kept worker processes and their forkserver),
    from /proc: rusage counts a child only once it has exited and been reaped by this process."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)], ticks[int(d)] = int(fields[1]), int(fields[11]) + int(fields[12])
    mine, total, grew = {os.getpid()}, 0, True
    while grew:
        new = {p for p, pp in parent.items() if pp in mine and p not in mine}
        grew = bool(new)
        mine |= new
    total = sum(ticks[p] for p in mine if p != os.getpid())
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + _live_descendants_cpu()


def run_path(path: str, model, records, cfg, clips: int, before) -> tuple[float, float, int]:
    """(wall s, CPU s, views) of one evaluation pass of ``path`` over ``records``."""
    from mscl_stream.eval.features import extract_features
    from mscl_stream.eval.views import score_views

    c0, t0 = cpu_seconds(), time.perf_counter()
    if path == "before":
        cfg.data.pyav_workers = "auto"
        out, _ = before.extract_features(model, records, cfg, "cpu", clips=clips, batch_size=cfg.eval.batch_size)
        views = out.shape[0] * clips
    elif path in ("threads", "processes"):
        cfg.data.pyav_workers = path
        out, _ = extract_features(model, records, cfg, "cpu", clips=clips)
        views = out.shape[0] * clips
    else:
        cfg.data.pyav_workers = "processes"
        short, crop = cfg.eval.test_short_side, cfg.eval.test_crop
        cfg.eval.test_short_side, cfg.eval.test_crop = 128, 112
        try:
            _, _, counts = score_views(model, records, cfg, "cpu", clips=clips, crops=3)
        finally:
            cfg.eval.test_short_side, cfg.eval.test_crop = short, crop
        views = counts["views"]
    return time.perf_counter() - t0, cpu_seconds() - c0, views


def measure(records, cfg, clips: int, rounds: int, model, before) -> dict:
    rows: dict[str, list[dict]] = {p: [] for p in PATHS}
    for r in range(rounds):
        order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
        for p in order:
            wall, cpu, views = run_path(p, model, records, cfg, clips, before)
            rows[p].append({"round": r, "wall_s": wall, "cpu_s": cpu, "views": views})
            print(f"round {r} {p}: {views / wall:.1f} views/s, {1000 * cpu / views:.0f} CPU-ms/view", flush=True)
    out = {}
    for p, rs in rows.items():
        steady = rs[1:] or rs
        rate = statistics.median(x["views"] / x["wall_s"] for x in steady)
        out[p] = {"views_per_s": rate, "cpu_ms_per_view": statistics.median(1000 * x["cpu_s"] / x["views"]
                                                                           for x in steady),
                  "views_per_pass": rs[0]["views"], "rows": rs}
    for p in out:
        out[p]["ratio_to_before"] = out[p]["views_per_s"] / out["before"]["views_per_s"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        res = result["models"][m]
        ax.bar(range(len(PATHS)), [res[p]["views_per_s"] for p in PATHS],
               color=["#999999", "#6699cc", "#336699", "#cc8844"])
        ax.set_xticks(range(len(PATHS)), PATHS)
        ax.set_ylabel("clips (views) / s")
        ax.set_title(f"model: {m}")
    fig.suptitle(f"eval decode path, {result['profile']} profile, {result['machine'].get('cpu', 'cpu')}, "
                 f"{result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="ucf101")
    ap.add_argument("--videos", type=int, default=4, help="synthetic videos of the profile (plus its real clips)")
    ap.add_argument("--repeat", type=int, default=3, help="each video evaluated this many times per pass")
    ap.add_argument("--clips", type=int, default=4, help="clips per video")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="pool", help="pool and/or r3d, comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="data.decode_workers")
    ap.add_argument("--baseline-ref", default=BASELINE_REF)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    from decode import profile_dataset
    from mscl_stream.config import Config
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.eval.features import build_r3d
    from mscl_stream.machine import machine_info

    manifest = profile_dataset(a.profile, "h264", a.videos)
    records = read_manifest(manifest) * a.repeat
    cfg = Config()
    cfg.data.frames_per_clip, cfg.data.frame_stride, cfg.data.decode_workers = 16, 2, a.workers
    cfg.eval.batch_size = 16
    before = baseline_features(a.baseline_ref)
    import av
    result = {"benchmark": "eval_views", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info("cpu"), "versions": {"av": av.__version__, "torch": torch.__version__},
              "profile": a.profile, "manifest": str(manifest.relative_to(ROOT)), "videos_per_pass": len(records),
              "clips": a.clips, "frames_per_clip": 16, "frame_stride": 2, "frame_size": list(cfg.data.frame_size),
              "out_size": cfg.augment.out_size, "decode_workers": a.workers, "torch_threads": torch.get_num_threads(),
              "baseline": f"eval/features.py at {a.baseline_ref} (thread pool)", "rounds": a.rounds, "models": {}}
    for m in [m for m in a.models.split(",") if m]:
        model = Pool() if m == "pool" else build_r3d(None, seed=0)[0]
        result["models"][m] = measure(records, cfg, a.clips, a.rounds, model, before)
        for p, v in result["models"][m].items():
            print(f"{m} {p}: {v['views_per_s']:.2f} views/s ({v['ratio_to_before']:.2f}x before), "
                  f"{v['cpu_ms_per_view']:.0f} CPU-ms/view", flush=True)
    result["load_avg_at_end"] = os.getloadavg()      # other jobs on the machine meanwhile
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) / f"eval_views_cpu_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
