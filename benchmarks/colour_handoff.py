"""Where colour conversion should run: host CPU, transport and device cost of one MSCL sample's hand-off.

The PyAV path decodes a sample's ~23 wanted frames in a worker; they reach the training device either
as RGB at the working size (swscale converts + resizes in the worker: ``data.pyav_output=rgb``) or as
the decoder's 4:2:0 planes at native size, converted + resized by torch on the device (``yuv``). On the
same samples of the k400 profile (456x256 H.264 -> 128x176), one thread, interleaved, this measures:

  decode         thread CPU-ms of ``decode_frames`` per sample, per output (decode + what stays on the CPU)
  per frame      CPU-ms per frame of each hand-off on its own: swscale RGB through one context per
                 sample (today's path), one context per frame (the path before), the raw planes, swscale
                 YUV resized to the cover size, torch's conversion of native and of cover-size planes
  transport      a one-process pool (forkserver, as the loader's) returning the sample: pickled (the
                 loader's way before) or through the loader's shared-memory slots (``data.pyav_handoff=shm``); CPU-ms of the main process (the
                 training process: its result thread reads and unpickles) and of the worker beyond its
                 decode, wall ms, bytes
  conversion     ``yuv420_to_rgb_cover_crop`` on the sample's planes on this CPU (thread CPU-ms), and on
                 CUDA (``--device cuda``: GPU ms from events, host CPU-ms to queue it)

    python benchmarks/colour_handoff.py --samples 24          # k400 profile, 4 videos, made once

Writes benchmarks/results/colour_handoff_<device>_<date>.json (+ .png): machine, versions, profile,
per-sample rows and medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _arrays(frames) -> list[np.ndarray]:
    from mscl_stream.data.frame_sink import YuvFrames

    return [frames.y, frames.uv] if isinstance(frames, YuvFrames) else [frames]


def _specs(manifest: Path, samples: int):
    from mscl_stream.config import DataConfig
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.sampler import ClipSampler

    records = read_manifest(manifest)
    data = DataConfig()
    data.clips_per_video = max(1, math.ceil(samples / len(records)))
    sampler = ClipSampler(records, data, seed=0)
    sampler.set_epoch(0)
    return records, [s for _, s in zip(range(samples), sampler)], tuple(data.frame_size)


def per_sample(records, specs, size) -> list[dict]:
    """Decode CPU per output and torch's CPU conversion, one thread, outputs alternating first."""
    import torch

    from mscl_stream.data.pyav_decode import decode_frames, frame_index
    from mscl_stream.data.yuv import yuv420_to_rgb_cover_crop

    rows = []
    for k, s in enumerate(specs):
        path, idx = records[s.video_idx].path, s.all_frames()
        frame_index(path)
        row = {"video": Path(path).name, "frames": len(idx)}
        for output in (("rgb", "yuv") if k % 2 == 0 else ("yuv", "rgb")):
            t0 = time.process_time()
            frames = decode_frames(path, idx, size, threads=1, output=output)
            row[f"decode_{output}_cpu_ms"] = 1e3 * (time.process_time() - t0)
            row[f"{output}_bytes"] = sum(a.nbytes for a in _arrays(frames))
            if output == "yuv":
                y, uv = torch.from_numpy(frames.y), torch.from_numpy(frames.uv)
                t0 = time.process_time()
                yuv420_to_rgb_cover_crop(y, uv, size, frames.matrix, frames.full_range, frames.chroma_left)
                row["torch_convert_cpu_ms"] = 1e3 * (time.process_time() - t0)
        rows.append(row)
    return rows


def per_frame(records, size, n: int = 23, reps: int = 5) -> dict:
    """CPU-ms per frame of each hand-off, on ``n`` frames of the first video (median over ``reps``; process
    CPU time: swscale with its default thread count scales on threads of its own)."""
    import av
    import torch
    from av.video.reformatter import VideoReformatter

    from mscl_stream.data.frame_sink import _SWS_FLAGS, cover_crop
    from mscl_stream.data.yuv import yuv420_to_rgb_cover_crop

    with av.open(records[0].path) as c:
        frames = [f for i, f in zip(range(8 * n), c.decode(video=0)) if i % 8 == 0]
    h, w = size
    nh, nw, y0, x0 = cover_crop(frames[0].height, frames[0].width, h, w)

    def planes(f):
        return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width].copy() for p in f.planes]

    def stack(pl):
        return torch.from_numpy(np.stack([p[0] for p in pl])), torch.from_numpy(np.stack([np.stack(p[1:]) for p in pl]))

    shared, yuv_ctx = VideoReformatter(), VideoReformatter()
    native = stack([planes(f) for f in frames])
    cover = stack([planes(yuv_ctx.reformat(f, width=nw, height=nh, format="yuv420p", interpolation=_SWS_FLAGS,
                                           threads=1)) for f in frames])
    left = True                                  # H.264: left-sited chroma
    cases = {
        "sws_rgb_one_context_per_sample": lambda: [shared.reformat(f, width=nw, height=nh, format="rgb24",
                                                                   interpolation=_SWS_FLAGS, threads=1).to_ndarray()
                                                   [y0:y0 + h, x0:x0 + w] for f in frames],
        "sws_rgb_context_per_frame": lambda: [f.reformat(width=nw, height=nh, format="rgb24",
                                                         interpolation=_SWS_FLAGS).to_ndarray()[y0:y0 + h, x0:x0 + w]
                                              for f in frames],
        "yuv_planes_native": lambda: [planes(f) for f in frames],
        "sws_yuv420_cover": lambda: [planes(yuv_ctx.reformat(f, width=nw, height=nh, format="yuv420p",
                                                             interpolation=_SWS_FLAGS, threads=1)) for f in frames],
        "torch_native_to_rgb": lambda: yuv420_to_rgb_cover_crop(*native, size, chroma_left=left),
        "torch_cover420_to_rgb": lambda: yuv420_to_rgb_cover_crop(*cover, size, chroma_left=left),
    }
    times = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.process_time()
            fn()
            times[name].append(1e3 * (time.process_time() - t0) / len(frames))
    return {k: statistics.median(v) for k, v in times.items()}


def transport(records, specs, size) -> list[dict]:
    """Each sample through a one-process pool, per output and hand-off (pickled / shared memory); one
    row per (output, hand-off) with CPU totals over the samples divided by their number (the worker's
    CPU is read from /proc, whose clock ticks are too coarse for one sample)."""
    from mscl_stream.data.pyav_decode import decode_frames_counted

    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    from mscl_stream.data.shm_handoff import Slots, submit

    slots = Slots(cap=2)                         # the loader's hand-off (data.pyav_handoff=shm)
    dest = np.empty(64 << 20, np.uint8)          # stands in for the pinned staging buffer of the upload
    rows = []
    try:
        ex.submit(os.getpid).result()
        pid = next(iter(ex._processes))
        modes = [(o, m) for o in ("rgb", "yuv") for m in ("pickle", "shm")]
        tot = {om: {"main": 0.0, "worker": 0.0, "decode": 0.0, "wall": 0.0, "bytes": 0} for om in modes}
        for k, s in enumerate([specs[0]] + list(specs)):     # the first round warms up (imports, page faults)
            path, idx = records[s.video_idx].path, s.all_frames()
            for output, mode in (modes if k % 2 == 0 else modes[::-1]):
                m0, w0, t0 = time.process_time(), _proc_cpu(pid), time.perf_counter()
                if mode == "pickle":
                    fut = ex.submit(decode_frames_counted, path, idx, size, threads=1, output=output)
                else:
                    fut = submit(ex, slots, decode_frames_counted, path, idx, size, threads=1, output=output)
                frames, stats = fut.result()
                off = 0
                for a in _arrays(frames):
                    dest[off:off + a.nbytes] = a.reshape(-1)
                    off += a.nbytes
                if k == 0:
                    continue
                t = tot[(output, mode)]
                t["wall"] += time.perf_counter() - t0
                t["main"] += time.process_time() - m0
                t["worker"] += _proc_cpu(pid) - w0
                t["decode"] += stats["cpu_seconds"]
                t["bytes"] += off
        n = len(specs)
        for (output, mode), t in tot.items():
            rows.append({"output": output, "mode": mode, "bytes": t["bytes"] / n, "main_cpu_ms": 1e3 * t["main"] / n,
                         "worker_beyond_decode_cpu_ms": 1e3 * (t["worker"] - t["decode"]) / n,
                         "decode_cpu_ms": 1e3 * t["decode"] / n, "wall_ms": 1e3 * t["wall"] / n})
    finally:
        ex.shutdown()
        slots.close()
    assert slots.counts["slot"] >= len(specs), slots.counts     # every timed sample went through a slot
    return rows


def on_cuda(records, specs, size) -> dict:
    """GPU ms (events) and host CPU-ms to upload the planes from pinned memory and convert them."""
    import torch

    from mscl_stream.data.pyav_decode import decode_frames
    from mscl_stream.data.yuv import yuv420_to_rgb_cover_crop

    dev = torch.device("cuda")
    gpu, host = [], []
    for s in specs:
        f = decode_frames(records[s.video_idx].path, s.all_frames(), size, threads=1, output="yuv")
        y, uv = torch.from_numpy(f.y).pin_memory(), torch.from_numpy(f.uv).pin_memory()
        yuv420_to_rgb_cover_crop(y.to(dev), uv.to(dev), size, f.matrix, f.full_range, f.chroma_left)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.thread_time()
        a.record()
        yuv420_to_rgb_cover_crop(y.to(dev, non_blocking=True), uv.to(dev, non_blocking=True), size, f.matrix,
                                 f.full_range, f.chroma_left)
        b.record()
        host.append(1e3 * (time.thread_time() - t0))
        b.synchronize()
        gpu.append(a.elapsed_time(b))
    return {"gpu_ms": statistics.median(gpu), "host_cpu_ms_to_queue": statistics.median(host),
            "gpu": torch.cuda.get_device_name(dev)}


def summarize(decode_rows, transport_rows) -> dict:
    med = lambda rows, k: statistics.median(r[k] for r in rows)   # noqa: E731
    out = {"decode": {k: med(decode_rows, k) for k in decode_rows[0] if k.endswith("_ms") or k.endswith("bytes")}}
    for r in transport_rows:
        out[f"{r['output']}_{r['mode']}"] = {k: v for k, v in r.items() if k not in ("output", "mode")}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = [f"{o} {m}" for o in ("rgb", "yuv") for m in ("pickle", "shm")]
    parts = [("decode_cpu_ms", "decode (+ RGB conversion for rgb), worker", "#4477aa"),
             ("worker_beyond_decode_cpu_ms", "hand-off, worker", "#66ccee"),
             ("main_cpu_ms", "hand-off, training process", "#ee6677")]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = np.zeros(len(names))
    for key, label, colour in parts:
        vals = np.array([s[n.replace(" ", "_")][key] for n in names])
        ax.barh(names, vals, left=left, color=colour, label=label)
        left += vals
    ax.set_xlabel("host CPU-ms per MSCL sample (median; device conversion not included)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"colour hand-off, {result['profile']} profile, {result['machine'].get('cpu', '')}, "
                 f"{result['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", help="an indexed dataset (default: the k400 profile, made once under runs/)")
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    import av
    import torch

    from mscl_stream.machine import machine_info

    torch.set_num_threads(1)
    manifest = Path(a.manifest) if a.manifest else None
    if manifest is None:
        from mscl_stream.config import DataConfig
        from mscl_stream.data.indexing import build_manifest
        from mscl_stream.data.synthetic import make_sample_dataset

        data_dir = ROOT / "runs" / f"bench-handoff-k400-{a.videos}"
        manifest = data_dir / "manifest.jsonl"
        if not manifest.is_file():
            make_sample_dataset(data_dir, videos=a.videos, profile="k400", seed=0, task="direction")
            build_manifest(data_dir, manifest, data=DataConfig(), workers=1)
    records, specs, size = _specs(manifest, a.samples)
    result = {"benchmark": "colour_handoff", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(a.device), "versions": {"av": av.__version__, "torch": torch.__version__,
                                                              "numpy": np.__version__},
              "profile": "k400" if not a.manifest else str(manifest), "frame_size": list(size),
              "sizes": sorted({f"{r.width}x{r.height}" for r in records}), "samples": len(specs)}
    result["per_frame_ms"] = per_frame(records, size)
    decode_rows = per_sample(records, specs, size)
    transport_rows = transport(records, specs, size)
    result.update(rows={"decode": decode_rows, "transport": transport_rows},
                  summary=summarize(decode_rows, transport_rows))
    if a.device == "cuda":
        result["cuda"] = on_cuda(records, specs, size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"colour_handoff_{a.device}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    plot(result, path.with_suffix(".png"))
    print(json.dumps({"per_frame_ms": result["per_frame_ms"], "summary": result["summary"],
                      **({"cuda": result["cuda"]} if "cuda" in result else {})}, indent=1))
    print(f"results in {path}")


if __name__ == "__main__":
    main()
