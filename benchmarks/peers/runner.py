"""Time one peer decoder on MSCL samples' frames, one thread (run inside the peer's env).

Run by benchmarks/decode_peers.py with the peer's own interpreter (benchmarks/peers/.envs/<peer>/bin/python),
so it imports only numpy, the standard library and the peer: never mscl_stream (a peer's env may lack
torch and the project). The job file is JSON:

    {"peer": "decord", "out": "/tmp/x/decord.json", "save_dir": null,
     "items": [{"path": "v.mp4", "indices": [3, 11, 19, ...], "reference": "/tmp/x/ref/0.npy"}, ...]}

``indices`` are display-order frame numbers (frame i = the i-th smallest packet timestamp), sorted and
unique. The first item is decoded once untimed (library start-up), then every item once, timed:
``cpu_ms`` = process CPU time (all threads) from opening the file to the (N, H, W, 3) uint8 RGB
array at the decoder's native size, ``wall_ms`` the same in wall time. Per item it writes the frames
returned, their shape, a checksum (sha1 of the bytes), ``decoded`` where the peer reports how many
frames it decoded (else null), and, when the item names a ``reference`` .npy (the project's decode
of the same frames), ``max_abs_diff`` and ``within_2`` (share of values within 2/255) against it. With
``save_dir`` the frames are also written to ``<save_dir>/<id>.npy`` (the item's ``id``, else its position).

    python runner.py JOB.json          # run a job
    python runner.py --check PEER [VIDEO]   # import the peer (and decode 2 frames), print its version

Peers: decord (decord 0.6.0 and decord2 both install the module ``decord``), spdl, torchcodec, and
pyav_from_start (PyAV: seek to the keyframe before the first wanted frame, decode every frame up to
the last wanted one, convert only the wanted ones with PyAV's default rgb24 conversion: what common
video Dataset classes do; run with the project's interpreter, which has PyAV). decode_peers.py times
the project's own decoders with :func:`run` in the project's env, so every row is timed alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Callable

# one thread everywhere a library reads it from the environment (set before the peer is imported)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

# decode(path, indices) -> (frames (N, H, W, 3) uint8, counts the decoder reports, e.g. {"decoded": n}, or None)
Decoder = Callable[[str, list], tuple]


def _decord() -> tuple[Decoder, str]:
    import decord

    from importlib.metadata import PackageNotFoundError, version as dist_version

    version = f"decord {getattr(decord, '__version__', '?')}"
    for dist in ("decord2", "decord"):       # which distribution provided the module
        try:
            version = f"{dist} {dist_version(dist)}"
            break
        except PackageNotFoundError:
            continue

    def decode(path: str, idx: list):
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        return vr.get_batch(idx).asnumpy(), None
    return decode, version


def _spdl() -> tuple[Decoder, str]:
    import spdl.io

    from importlib.metadata import version as dist_version
    cfg = spdl.io.decode_config(decoder_options={"threads": "1"})

    def decode(path: str, idx: list):
        packets = spdl.io.demux_video(path)
        frames = spdl.io.sample_decode_video(packets, idx, decode_config=cfg)    # one ImageFrames each
        return spdl.io.to_numpy(spdl.io.convert_frames(frames)), None
    return decode, f"spdl-io {dist_version('spdl-io')}"


def _torchcodec() -> tuple[Decoder, str]:
    import torch
    import torchcodec
    from torchcodec.decoders import VideoDecoder

    torch.set_num_threads(1)

    def decode(path: str, idx: list):
        dec = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        return dec.get_frames_at(idx).data.numpy(), None
    return decode, f"torchcodec {torchcodec.__version__} (torch {torch.__version__})"


_pts_cache: dict[str, tuple] = {}


def _pts_index(path: str) -> tuple:
    """(sorted packet timestamps, sorted keyframe timestamps) of the first video stream, by demuxing."""
    import av

    if path not in _pts_cache:
        pts, keys = [], []
        with av.open(path) as c:
            for pkt in c.demux(c.streams.video[0]):
                if pkt.pts is not None and pkt.size:
                    pts.append(pkt.pts)
                    if pkt.is_keyframe:
                        keys.append(pkt.pts)
        _pts_cache[path] = (np.unique(pts), np.unique(keys))
    return _pts_cache[path]


def _pyav_from_start() -> tuple[Decoder, str]:
    import av

    def decode(path: str, idx: list):
        pts, keys = _pts_index(path)      # read before timing (prepare), as the project caches its index
        want = {int(pts[i]) for i in idx}
        first, last = int(pts[idx[0]]), int(pts[idx[-1]])
        key = int(keys[max(0, np.searchsorted(keys, first, side="right") - 1)])
        out, decoded = {}, 0
        with av.open(path) as c:
            st = c.streams.video[0]
            st.thread_type = "NONE"
            st.codec_context.thread_count = 1
            c.seek(key, stream=st, backward=True, any_frame=False)
            for frame in c.decode(st):
                decoded += 1
                if frame.pts in want:
                    out[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last:
                    break
        return np.stack([out[int(pts[i])] for i in idx]), {"decoded": decoded}
    return decode, f"av {av.__version__}"


PEERS: dict[str, Callable[[], tuple[Decoder, str]]] = {
    "decord": _decord, "decord2": _decord, "spdl": _spdl, "torchcodec": _torchcodec,
    "pyav_from_start": _pyav_from_start,
}
# per-item work done before timing (the project keeps each file's packet index cached the same way)
PREPARE: dict[str, Callable[[str], object]] = {"pyav_from_start": _pts_index}


def _compare(frames: np.ndarray, ref_path: str) -> dict:
    ref = np.load(ref_path)
    if ref.shape != frames.shape:
        return {"max_abs_diff": None, "within_2": None, "shape_mismatch": [list(frames.shape), list(ref.shape)]}
    d = np.abs(frames.astype(np.int16) - ref.astype(np.int16))
    return {"max_abs_diff": int(d.max()), "within_2": float((d <= 2).mean()), "mean_abs_diff": float(d.mean())}


def run(job: dict, decode: Decoder, prepare: Callable[[str], object] | None = None) -> list[dict]:
    """Time ``decode`` on every item of ``job`` (see the module docstring); returns one row per item."""
    items = job["items"]
    if job.get("save_dir"):
        os.makedirs(job["save_dir"], exist_ok=True)
    if prepare is not None:
        for it in items:
            prepare(it["path"])
    decode(items[0]["path"], list(items[0]["indices"]))          # warm-up, untimed
    rows = []
    for k, it in enumerate(items):
        idx = [int(i) for i in it["indices"]]
        c0, w0 = time.process_time(), time.perf_counter()
        frames, counts = decode(it["path"], idx)
        frames = np.ascontiguousarray(frames)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        row = {"item": k, "cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall, "frames": int(frames.shape[0]),
               "shape": list(frames.shape), "decoded": None,
               "sha1": hashlib.sha1(frames.tobytes()).hexdigest(), **(counts or {})}
        if it.get("reference"):
            row.update(_compare(frames, it["reference"]))
        if job.get("save_dir"):
            np.save(os.path.join(job["save_dir"], f"{it.get('id', k)}.npy"), frames)
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    if len(argv) in (2, 3) and argv[0] == "--check":
        decode, version = PEERS[argv[1]]()
        if len(argv) == 3:            # a short video: the peer must also load its FFmpeg and decode
            frames, _ = decode(argv[2], [0, 1])
            if np.asarray(frames).shape[0] != 2:
                raise SystemExit(f"{argv[1]}: decoded {np.asarray(frames).shape}, wanted 2 frames")
        print(version)
        return 0
    if len(argv) != 1:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    decode, version = PEERS[job["peer"]]()
    rows = run(job, decode, PREPARE.get(job["peer"]))
    tmp = job["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"peer": job["peer"], "version": version, "rows": rows}, f)
    os.replace(tmp, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
