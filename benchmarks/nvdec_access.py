"""Why is DALI's NVDEC path slow for MSCL clips? Frame-list access patterns through ``fn.decoders.video``.

MSCL asks for 2T + 2F = 24 scattered frames per clip (two windows of T frames at stride 16 plus their
flow partners), spanning ~120-250 raw frames. This script decodes the same clips through DALI's
``mixed`` (NVDEC) decoder three ways and reports clips/s and decoded-output frames/s:

  sparse:     each sample's sorted unique frame list (what ``ClipLoader`` does with data.decoder=dali);
  contiguous: every frame from the sample's first to its last wanted frame (no seeks inside a sample);
  per_window: as sparse, but each window (A + partners, B + partners) is its own sample (shorter spans).

and PyAV (``decode_frames``, the path ``data.decoder=auto`` takes on a GPU) on N threads as the reference.

    python benchmarks/nvdec_access.py --out benchmarks/results      # needs CUDA + DALI + PyAV

Writes nvdec_access_<date>.json in --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mscl_stream.config import load_config
from mscl_stream.data.manifest import build_manifest, read_manifest
from mscl_stream.data.pipeline import DaliDecoder
from mscl_stream.data.pyav_decode import decode_frames
from mscl_stream.data.sample import make_sample_dataset
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.machine import machine_info


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int) -> float:
    fn()                                   # warm-up: pipeline build, decoder creation
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--codec", default="h264", choices=["h264", "hevc", "vp9"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "bench.yaml", [])
    work = Path(tempfile.mkdtemp(prefix="nvdec-access-"))
    make_sample_dataset(work / "videos", videos=12, codec=a.codec)
    build_manifest(work / "videos", work / "m.jsonl", data=cfg.data)
    records = read_manifest(work / "m.jsonl", "train")
    sampler = ClipSampler(records, cfg.data, seed=0)
    sampler.set_epoch(0)
    specs = [sampler.spec(i % len(sampler)) for i in range(a.batch)]
    enc = [np.fromfile(records[s.video_idx].path, dtype=np.uint8) for s in specs]
    wanted = [np.unique(s.all_frames()) for s in specs]
    size = tuple(cfg.data.frame_size)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # CPU (VP9 only): to check the script
    res = {"benchmark": "nvdec_access", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "codec": a.codec, "batch": a.batch, "frame_size": size,
           "frames_wanted_per_clip": float(np.mean([len(w) for w in wanted])), "modes": {}}

    def dali_mode(name: str, enc_list: list, frames: list, clips: int) -> None:
        dec = DaliDecoder(len(enc_list), size, a.threads, dev)
        sec = _time(lambda: dec.decode(enc_list, frames), a.reps)
        n = sum(len(f) for f in frames)
        res["modes"][name] = {"clips_per_s": clips / sec, "output_frames_per_s": n / sec,
                              "output_frames_per_clip": n / clips}
        print(f"{name:<12} {clips / sec:8.1f} clips/s {n / sec:9.0f} output frames/s", flush=True)
        dec.close()

    dali_mode("sparse", enc, wanted, a.batch)
    dali_mode("contiguous", enc, [np.arange(w[0], w[-1] + 1) for w in wanted], a.batch)
    win_enc, win_frames = [], []
    for s, e in zip(specs, enc):
        for frames, partners in ((s.frames_a, s.partners_a), (s.frames_b, s.partners_b)):
            win_enc.append(e)
            win_frames.append(np.unique(np.concatenate([frames, partners])))
    dali_mode("per_window", win_enc, win_frames, a.batch)

    pool = ThreadPoolExecutor(a.threads)
    paths = [records[s.video_idx].path for s in specs]

    def pyav() -> None:
        out = list(pool.map(lambda i: decode_frames(paths[i], specs[i].all_frames(), size, threads=1),
                            range(a.batch)))
        t = torch.from_numpy(np.stack(out))
        if dev.type == "cuda":
            t.pin_memory().to(dev, non_blocking=True)
    sec = _time(pyav, a.reps)
    res["modes"][f"pyav_{a.threads}_threads"] = {"clips_per_s": a.batch / sec}
    print(f"pyav x{a.threads:<6} {a.batch / sec:8.1f} clips/s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"nvdec_access_{a.codec}_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    print(f"results in {path}")


if __name__ == "__main__":
    main()
