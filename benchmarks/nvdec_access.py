"""DALI decode variants against PyAV worker processes: MSCL samples/s through the real loader.

One MSCL sample = windows A and B (T frames at stride 16, B shifted by an even d) plus their even flow
partners: ~24 wanted frames spread over ~120-250 raw frames. Each variant decodes the same epoch
(the project's ClipSampler, seed 0) through ``ClipLoader`` with nothing else running, so the figure is
what decode can feed a training step:

  dali_sync:      ``fn.decoders.video`` one batch at a time (``DaliDecoder`` depth 1: the old path);
  dali_decoder:   ``data.dali_mode=decoder``: the same operator, ``data.prefetch`` runs in flight;
  dali_reader:    ``data.dali_mode=reader``: ``fn.experimental.readers.video`` on per-frame file lists,
                  ``data.decode_workers`` readers, pipelined;
  dali_legacy:    ``data.dali_mode=legacy`` (GPU only): ``fn.readers.video``, one sequence per window;
                  samples with a window that wraps around the video's end go to ``fn.decoders.video``
                  (``--no-wrap`` samples the method without wrapping, to see the reader alone);
  pyav:           PyAV in ``--pyav-workers`` worker processes (``data.decoder=pyav``).

Reported per variant: samples/s in steady state (the second half of the epoch's batches, timed from
the arrival of the batch before it to the last; ``epoch_samples_per_s`` includes the start-up), CPU-ms
per sample over the whole epoch (this process and its PyAV worker processes, start-up included; the
epoch ends with nothing in flight), frames wanted per sample, frames a keyframe-seeking decoder
decodes per sample (modelled from each file's packet index: ``sweep_frames``) and the decoded frames/s
that implies (on a GPU, the NVDEC rate the variant drives), and for DALI the most runs in flight.

``--step-ms S`` makes the consumer sleep S ms per batch, a training step that leaves the CPU to the
decoders: a path that decodes while the consumer works keeps the slower of decode and step per batch,
the synchronous path pays their sum.

Every variant runs in its own subprocess with a time limit (``--time-limit``); the JSON in --out is
rewritten after each one, so a failure or a timeout costs only that variant.

    python benchmarks/nvdec_access.py --device cuda --profile k400 --codec h264   # GPU host (NVDEC)
    python benchmarks/nvdec_access.py --device cpu --profile toy --codec vp9      # CPU backend (VP9)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dali_sync", "dali_decoder", "dali_reader", "dali_legacy", "pyav")


def _cpu_seconds(loader=None) -> float:
    """CPU time of this process and of the loader's live PyAV worker processes (read from /proc:
    getrusage counts children only once they have exited)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    total = s.ru_utime + s.ru_stime
    for pid in (loader.worker_pids() if loader is not None else []):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _make_part(out: str, videos: int, codec: str, profile: str, seed: int) -> None:
    from mscl_stream.data.synthetic import make_sample_dataset
    make_sample_dataset(out, videos=videos, codec=codec, profile=profile, seed=seed, task="direction")


def _data(a) -> Path:
    """The profile's videos and manifest (made once, reused from --data). Videos are made in parts of
    four (one per class, each part its own seed) by parallel processes: x264 ``medium`` at Kinetics
    size costs seconds per video."""
    from concurrent.futures import ProcessPoolExecutor

    from mscl_stream.config import load_config
    from mscl_stream.data.indexing import build_manifest

    root = a.data / f"{a.profile}_{a.codec}_{a.videos}"
    manifest = root / "manifest.jsonl"
    if not manifest.exists():
        if not (root / "videos").exists():
            parts = max(1, a.videos // 4)
            with ProcessPoolExecutor(min(parts, os.cpu_count() or 1)) as pool:
                futs = [pool.submit(_make_part, str(root / "videos" / f"part{k}"), a.videos // parts
                                    + (k < a.videos % parts), a.codec, a.profile, k) for k in range(parts)]
                for f in futs:
                    f.result()
        build_manifest(root / "videos", manifest, data=load_config(None, []).data, workers=os.cpu_count() or 1)
    return manifest


def _config(a, variant: str):
    from mscl_stream.config import load_config
    ov = [f"data.batch_size={a.batch}", f"data.frame_size=[{a.size[0]}, {a.size[1]}]", "data.split=",
          f"data.prefetch={a.depth}", f"data.clips_per_video={a.clips_per_video}",
          f"data.wrap={'false' if a.no_wrap else 'true'}", f"data.repeat_samples={a.repeat}"]
    if variant == "pyav":
        ov += ["data.decoder=pyav", "data.pyav_workers=processes", f"data.decode_workers={a.pyav_workers}"]
    else:
        mode = {"dali_reader": "reader", "dali_legacy": "legacy"}.get(variant, "decoder")
        ov += ["data.decoder=dali", f"data.dali_mode={mode}", f"data.decode_workers={a.dali_threads}"]
    return load_config(None, ov)


def _decode_model(records, sampler, positions) -> dict:
    """Wanted and (modelled) decoded frames per sample over ``positions``; with repeated sampling a
    group's union is decoded once and shared by its members."""
    import numpy as np
    from mscl_stream.data.pyav_decode import frame_index, sweep_frames
    wanted, decoded = [], []
    for p in positions:
        group = sampler.group(p)
        s = sampler.spec(p)
        uniq = np.unique(np.concatenate([sampler.spec(q).all_frames() for q in group]))
        wanted.append(len(uniq) / len(group))
        decoded.append(sweep_frames(frame_index(records[s.video_idx].path), uniq)[0] / len(group))
    return {"frames_wanted_per_sample": float(np.mean(wanted)), "frames_decoded_per_sample": float(np.mean(decoded))}


def run_one(a, variant: str) -> dict:
    """Measure one variant in this process; returns its row."""
    import numpy as np
    import torch

    from mscl_stream.data.loader import build_loader
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.dali.decoder import DaliDecoder

    records = read_manifest(_data(a), "")
    cfg = _config(a, variant)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    loader = build_loader(cfg, records, device=dev)
    loader.set_epoch(0)
    n_batches = min(len(loader), a.warmup + a.batches) if a.batches else len(loader)
    if n_batches - max(a.warmup, n_batches // 2) < 2:
        raise SystemExit(f"only {len(loader)} batches per epoch: use more --videos or --clips-per-video")
    row: dict = {"variant": variant}
    arrivals = []
    # a slow variant stops after --budget seconds (at least 4 batches) and still reports a number
    done = lambda: time.perf_counter() - t_start > a.budget and len(arrivals) >= 4  # noqa: E731
    sync()
    t_start, c_start = time.perf_counter(), _cpu_seconds()
    if variant == "dali_sync":
        # the old path: the loader's work items, one synchronous DALI batch at a time
        dec = DaliDecoder(a.batch, tuple(a.size), a.dali_threads, dev, depth=1)
        works = [loader._work(p) for p in range(n_batches * a.batch)]
        for b in range(n_batches):
            chunk = works[b * a.batch:(b + 1) * a.batch]
            lists = [np.unique(w.all_frames()) for w in chunk]
            dec.decode([np.fromfile(w.record.path, dtype=np.uint8) for w in chunk], lists)
            sync()
            arrivals.append(time.perf_counter())
            time.sleep(a.step_ms / 1e3)
            if done():
                break
        cpu = _cpu_seconds() - c_start
    else:
        it = iter(loader)
        for b in range(n_batches):
            next(it)
            sync()
            arrivals.append(time.perf_counter())
            time.sleep(a.step_ms / 1e3)         # a training step that leaves the CPU free
            if done():
                break
        cpu = _cpu_seconds(loader) - c_start     # the PyAV workers started after c_start
        st = loader.stats
        row.update(skipped=st["skipped"], dali_runs=st["dali_runs"], dali_max_in_flight=st["dali_max_in_flight"],
                   dali_samples=st["dali_samples"], pyav_samples=st["pyav_samples"],
                   dali_rebuilds=st["dali_rebuilds"], dali_reader_fallbacks=st["dali_reader_fallbacks"],
                   dali_frames_requested=st["dali_frames_requested"])
    # steady state: the second half of the batches (at least --warmup left out), so the batches the
    # look-ahead decoded before the window are a small part of it
    stopped = len(arrivals) < n_batches      # by --budget: work still in flight counts in the CPU time
    n_batches = len(arrivals)
    h = min(max(a.warmup, n_batches // 2), n_batches - 2)
    row.update(batches=n_batches, batches_timed=n_batches - h, stopped_by_budget=stopped)
    sec = arrivals[-1] - arrivals[h - 1]
    samples = (n_batches - h) * a.batch
    row.update(_decode_model(records, loader.sampler, range(h * a.batch, n_batches * a.batch)))
    row.update(samples_per_s=samples / sec, seconds=sec,
               epoch_samples_per_s=n_batches * a.batch / (arrivals[-1] - t_start),
               cpu_ms_per_sample=1e3 * cpu / (n_batches * a.batch),
               decoded_frames_per_s=samples / sec * row["frames_decoded_per_sample"],
               output_frames_per_s=samples / sec * row["frames_wanted_per_sample"])
    loader.close()
    return row


def _save(path: Path, res: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(path)


def _plot(path: Path, res: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in res["variants"].values() if "samples_per_s" in r]
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["variant"] for r in rows]
    ax[0].bar(names, [r["samples_per_s"] for r in rows])
    ax[0].set_ylabel("MSCL samples/s")
    ax[1].bar(names, [r["cpu_ms_per_sample"] for r in rows])
    ax[1].set_ylabel("CPU-ms per sample")
    fig.suptitle(f"{res['machine'].get('gpu') or res['machine'].get('cpu', '')} {res['device']} "
                 f"{res['profile']}/{res['codec']} batch {res['batch']}", fontsize=9)
    for x in ax:
        x.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked before any data is made (exit 2 with one line when the epoch is too short)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", default="k400", choices=["toy", "ucf101", "k400"])
    ap.add_argument("--codec", default="h264", choices=["h264", "hevc", "vp9"])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--clips-per-video", type=int, default=8, help="samples per video per epoch")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on cuda, 8 on cpu")
    ap.add_argument("--batches", type=int, default=0,
                    help="batches per variant (0: the whole epoch)")
    ap.add_argument("--warmup", type=int, default=2, help="batches at least left out of the steady-state timing")
    ap.add_argument("--depth", type=int, default=3, help="data.prefetch: DALI runs in flight")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 176), metavar=("H", "W"))
    ap.add_argument("--dali-threads", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--pyav-workers", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--time-limit", type=int, default=120, help="seconds per variant (then it is killed)")
    ap.add_argument("--budget", type=float, default=1e9,
                    help="seconds of decoding after which a variant stops early and reports what it measured")
    ap.add_argument("--no-wrap", action="store_true", help="data.wrap=false (windows clamped inside the video)")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="the consumer sleeps this long per batch (a training step that leaves the CPU free): "
                         "with decode overlapped, samples/s stays at the slower of decode and step")
    ap.add_argument("--repeat", type=int, default=1,
                    help="data.repeat_samples: samples per video visit, decoded as one group (1 = the method's)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/mscl-nvdec-access"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.batch = a.batch or (64 if a.device == "cuda" else 8)
    # samples per epoch: clips_per_video groups of --repeat samples per video; a last partial batch is dropped
    per_epoch = a.videos * a.clips_per_video * a.repeat // a.batch
    if per_epoch - max(a.warmup, per_epoch // 2) < 2:
        ap.error(f"--videos {a.videos} x --clips-per-video {a.clips_per_video} x --repeat {a.repeat} at --batch "
                 f"{a.batch} is {per_epoch} batches per epoch; the steady-state half after {a.warmup} warm-up "
                 "batches needs at least 2")
    return a


def main() -> None:
    a = parse_args()
    sys.path.insert(0, str(REPO))
    if a.one:                                       # child: one variant, one RESULT line
        print("RESULT " + json.dumps(run_one(a, a.one)), flush=True)
        return

    from mscl_stream.machine import machine_info
    t0 = time.perf_counter()
    _data(a)                                        # made once, before any variant's clock starts
    made = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    tag = ("_nowrap" if a.no_wrap else "") + (f"_repeat{a.repeat}" if a.repeat > 1 else "") + \
        (f"_step{a.step_ms:g}ms" if a.step_ms else "")
    path = a.out / f"nvdec_access_{a.device}_{a.profile}_{a.codec}{tag}_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    res = {"benchmark": "nvdec_access", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "device": a.device, "profile": a.profile, "codec": a.codec,
           "videos": a.videos, "clips_per_video": a.clips_per_video, "wrap": not a.no_wrap, "repeat_samples": a.repeat, "step_ms": a.step_ms, "batch": a.batch, "frame_size": list(a.size), "depth": a.depth,
           "dali_threads": a.dali_threads, "pyav_workers": a.pyav_workers, "data_seconds": made, "variants": {}}
    _save(path, res)
    args = [a_ for a_ in sys.argv[1:]]
    for v in a.variants:
        if v == "dali_legacy" and a.device != "cuda":
            res["variants"][v] = {"variant": v, "status": "skipped: fn.readers.video needs CUDA"}
            print(f"{v:<14} skipped (needs CUDA)", flush=True)
            continue
        cmd = [sys.executable, __file__, *args, "--one", v]
        t1 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.time_limit, cwd=REPO)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"variant": v, "status": f"exit {r.returncode}",
                                                     "tail": (r.stdout + r.stderr)[-2000:]}
        except subprocess.TimeoutExpired:
            row = {"variant": v, "status": f"timeout {a.time_limit}s"}
        row.setdefault("status", "ok")
        row["wall_seconds"] = time.perf_counter() - t1
        res["variants"][v] = row
        _save(path, res)
        if "samples_per_s" in row:
            print(f"{v:<14} {row['samples_per_s']:8.1f} samples/s  {row['cpu_ms_per_sample']:7.1f} CPU-ms/sample  "
                  f"{row['decoded_frames_per_s']:8.0f} decoded frames/s  in flight "
                  f"{row.get('dali_max_in_flight', '-')}", flush=True)
        else:
            print(f"{v:<14} {row['status']}", flush=True)
    base = res["variants"].get("pyav", {}).get("samples_per_s")
    if base:
        res["vs_pyav"] = {v: r["samples_per_s"] / base for v, r in res["variants"].items() if "samples_per_s" in r}
        print("samples/s relative to PyAV:", json.dumps({k: round(x, 2) for k, x in res["vs_pyav"].items()}))
    _save(path, res)
    _plot(path, res)
    print(f"results in {path}")


if __name__ == "__main__":
    main()
