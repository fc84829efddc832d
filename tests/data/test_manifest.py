"""`mscl-stream index`: probing, exclusion reasons, layouts, CSV input, MDS starts."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

import mscl_stream.data.probe as probe_mod
from mscl_stream.cli import main as cli_main
from mscl_stream.commands.index import index_videos
from mscl_stream.config import DataConfig
from mscl_stream.data.indexing import build_manifest
from mscl_stream.data.manifest import read_manifest
from mscl_stream.data.probe import probe_video
from mscl_stream.data.sampler import pretraining_records
from mscl_stream.data.synthetic import moving_texture_frames, write_video
from mscl_stream.errors import UserError

# one sample needs (4 - 1) * 4 + 4 + 1 = 17 raw frames with these settings (wrap on; every sampled
# frame has a flow partner, the last one 4 frames after the last sampled frame)
SMALL = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=4, max_shift=8, flow_frames="all")


def video(path: Path, n: int, codec: str = "vp9", seed: int = 0, h: int = 48, w: int = 64) -> Path:
    return write_video(path, moving_texture_frames(n, h, w, (1.5, 0.5), seed=seed), codec, gop=8)


def decoded_count(path: Path) -> int:
    """Frames PyAV decodes before the end or its first error (the independent reference)."""
    n = 0
    try:
        with av.open(str(path)) as c:
            for _ in c.decode(video=0):
                n += 1
    except av.FFmpegError:
        pass
    return n


def encode_raw(path: Path, encoder: str, options: dict, n: int = 40, bframes: int | None = None,
               h: int = 64, w: int = 96) -> Path:
    """Encode with PyAV directly (B-frames, alt-ref frames: settings write_video does not use)."""
    frames = moving_texture_frames(n, h, w, (1.5, 0.5), seed=2)
    with av.open(str(path), "w") as out:
        st = out.add_stream(encoder, rate=25, options=options)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        if bframes is not None:
            st.codec_context.max_b_frames = bframes
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in st.encode(vf):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return path


def scramble_packets(src: Path, dst: Path, which: slice, seed: int = 0) -> Path:
    """Copy ``src`` with the payload bytes of the chosen video packets replaced by random bytes
    (container structure intact, so demuxing still sees every packet)."""
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        payloads = [bytes(p) for p in c.demux(video=0) if p.size][which]
    rng = np.random.default_rng(seed)
    for b in payloads:
        i = data.find(b)
        assert i >= 0
        data[i:i + len(b)] = rng.integers(0, 256, len(b), dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("codec", ["vp9", "h264", "hevc", "mjpeg"])
def test_probe_counts_equal_decoded(tmp_path, codec):
    path = video(tmp_path / "v", 37, codec, h=48, w=80)
    p = probe_video(path)
    assert p.reason is None and p.notes == []
    assert p.num_frames == decoded_count(path) == 37
    assert (p.codec, p.width, p.height, p.fps) == (codec, 80, 48, 25.0)
    assert p.duration == pytest.approx(37 / 25)
    assert "pyav" in p.decoders and (("dali_cpu" in p.decoders) == (codec in ("vp9", "mjpeg")))


@pytest.mark.parametrize("name,encoder,options,bframes", [
    ("b.mp4", "libx264", {"preset": "fast", "bf": "3"}, 3),              # B-frames: decode order != display
    ("alt.webm", "libvpx-vp9", {"deadline": "good", "cpu-used": "5", "auto-alt-ref": "1",
                                "lag-in-frames": "16"}, None),            # hidden alt-ref frames
    ("alt8.webm", "libvpx", {"deadline": "good", "auto-alt-ref": "1", "lag-in-frames": "16",
                             "b": "1M"}, None),
    ("m4v.mp4", "mpeg4", {"bf": "2"}, 2),                                # open GOP with B-frames
])
def test_probe_counts_with_reordering(tmp_path, name, encoder, options, bframes):
    path = encode_raw(tmp_path / name, encoder, options, bframes=bframes)
    p = probe_video(path)
    assert p.reason is None and p.notes == []
    assert p.num_frames == decoded_count(path) == 40


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_probe_trims_undecodable_tail(tmp_path, codec):
    good = video(tmp_path / "v", 40, codec)
    bad = scramble_packets(good, tmp_path / f"bad{good.suffix}", slice(-3, None))
    p = probe_video(bad)
    # demuxing still sees 40 packets; the tail decode finds the damage and keeps only what decodes
    assert p.reason is None and any("do not decode" in n for n in p.notes)
    assert p.num_frames == decoded_count(bad) == 37


def test_probe_exclusions(tmp_path):
    (tmp_path / "empty.webm").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video " * 100)
    with av.open(str(tmp_path / "tone.wav"), "w") as out:                # audio only
        st = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for pkt in list(st.encode(frame)) + list(st.encode()):
            out.mux(pkt)
    good = video(tmp_path / "v", 24, "vp9")
    dead = scramble_packets(good, tmp_path / "dead.webm", slice(None))  # every payload is noise
    reasons = {n: probe_video(tmp_path / n).reason for n in ("empty.webm", "junk.mp4", "tone.wav", dead.name)}
    assert reasons == {"empty.webm": "empty", "junk.mp4": "unreadable", "tone.wav": "no_video_stream",
                       "dead.webm": "no_decodable_frame"}


def test_decode_paths_and_unsupported(tmp_path, monkeypatch):
    vp9, h264 = video(tmp_path / "a", 20, "vp9"), video(tmp_path / "b", 20, "h264")
    assert probe_mod.decode_paths("h264", cuda=True) == ["pyav", "dali_gpu"]
    assert probe_mod.decode_paths("vp9", cuda=False) == ["pyav", "dali_cpu"]
    # pretend PyAV's FFmpeg has no decoders: VP9 still decodes with DALI on CPU (not verified here),
    # H.264 needs DALI's GPU path, which is absent -> unsupported
    monkeypatch.setattr(probe_mod, "pyav_can_decode", lambda codec: False)
    p = probe_video(vp9)
    assert p.reason is None and p.decoders == ["dali_cpu"] and p.num_frames == 20
    assert "not decodable by PyAV" in p.notes[0]
    assert probe_video(h264).reason == "unsupported_codec"
    assert probe_video(h264, cuda=True).reason is None


def make_tree(root: Path) -> dict[str, Path]:
    """Class folders with usable videos and one bad file of every kind."""
    files = {}
    for cls, seed in (("cat", 1), ("dog", 2)):
        for i in range(2):
            files[f"{cls}{i}"] = video(root / cls / f"{cls}{i}", 24 + i, "vp9", seed=seed * 10 + i)
    files["h264"] = video(root / "dog" / "h264clip", 30, "h264", seed=7)
    (root / "cat" / "empty.webm").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not a video\n")
    files["short"] = video(root / "dog" / "short", 12, "vp9", seed=8)
    long_vp9 = video(root / "tmp_long", 60, "vp9", seed=9)
    half = root / "cat" / "half.webm"
    half.write_bytes(long_vp9.read_bytes()[: long_vp9.stat().st_size // 2])
    long_vp9.unlink()
    files["half"] = half
    long_mp4 = video(root / "tmp_long", 60, "h264", seed=9)
    (root / "dog" / "half.mp4").write_bytes(long_mp4.read_bytes()[: long_mp4.stat().st_size // 2])
    long_mp4.unlink()
    (root / "README.txt").write_text("a file outside the class folders\n")
    return files


def test_index_class_folders(tmp_path, capsys):
    src = tmp_path / "src"
    make_tree(src)
    out = tmp_path / "m" / "manifest.jsonl"
    report = build_manifest(src, out, data=SMALL, workers=1)
    recs = read_manifest(out)
    by_name = {Path(r.path).name: r for r in recs}
    # short.webm (12 frames < 17) decodes: it stays in the manifest for evaluation, counted apart
    assert sorted(by_name) == sorted(["cat0.webm", "cat1.webm", "dog0.webm", "dog1.webm", "h264clip.mp4",
                                      "half.webm", "short.webm"])
    for name, r in by_name.items():
        assert r.num_frames == decoded_count(Path(r.path)), name       # counts = PyAV decode
        assert r.split == "train" and r.label == {"cat": 0, "dog": 1}[r.label_name]
        assert r.fps == 25.0 and (r.height, r.width) == (48, 64)
    # the half-cut WebM keeps its clean first part (header at the front, whole clusters survive);
    # the half-cut MP4 loses its index (moov at the end) and cannot be opened
    assert 17 <= by_name["half.webm"].num_frames < 60
    assert by_name["h264clip.mp4"].codec == "h264" and by_name["cat1.webm"].num_frames == 25
    got = {Path(x["path"]).name: x["reason"] for x in report["excluded"]}
    assert got == {"empty.webm": "empty", "notes.txt": "unreadable",
                   "half.mp4": "unreadable", "README.txt": "no_class"}
    assert report["files"] == 11 and report["usable"] == 7 and report["classes"] == ["cat", "dog"]
    assert report["usable_for_evaluation"] == 7 and report["usable_for_pretraining"] == 6
    assert report["shorter_than_one_sample"] == {"count": 1, "per_split": {"train": 1}}
    assert report["excluded_by_reason"] == {"empty": 1, "no_class": 1, "unreadable": 2}
    assert report["min_frames"] == 17 and by_name["short.webm"].num_frames == 12
    on_disk = json.loads((tmp_path / "m" / "manifest.report.json").read_text())
    assert on_disk["excluded"] == report["excluded"]
    printed = capsys.readouterr()
    assert "7 usable videos of 11 files" in printed.out
    assert "usable for evaluation 7, for pretraining 6" in printed.out
    assert "index: 10/10 files" in printed.err


def test_wrap_off_needs_max_shift_and_nothing_usable(tmp_path):
    src = tmp_path / "src"
    video(src / "a" / "v", 20, "vp9")
    out = tmp_path / "m.jsonl"
    assert build_manifest(src, out, data=SMALL, workers=1)["usable"] == 1       # 20 >= 17
    no_wrap = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=4, max_shift=8, wrap=False,
                         flow_frames="all")
    # needs 25 without wrap-around: the index keeps the 20-frame video (evaluation uses it) and counts it
    # apart; pretraining is what refuses a manifest with no video long enough, in one line
    report = build_manifest(src, tmp_path / "m2.jsonl", data=no_wrap, workers=1)
    assert (report["usable"], report["usable_for_pretraining"], report["min_frames"]) == (1, 0, 25)
    recs = read_manifest(tmp_path / "m2.jsonl")
    assert pretraining_records(recs, SMALL) == recs                  # 20 >= 17 with wrap-around
    with pytest.raises(UserError, match=r"no video is long enough.*all 1 are shorter than 25 raw frames "
                                        r"\(longest 20\)"):
        pretraining_records(recs, no_wrap)
    with pytest.raises(UserError, match="no such file"):
        build_manifest(tmp_path / "missing", out, data=SMALL)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="no video files"):
        build_manifest(tmp_path / "emptydir", out, data=SMALL)


def test_index_csv(tmp_path):
    root = tmp_path / "data"
    video(root / "x" / "v1", 24, "vp9", seed=1)
    video(root / "x" / "v2", 40, "h264", seed=2)
    csv_path = root / "list.csv"
    csv_path.write_text("x/v1.webm,walk\n"
                        "x/v2.mp4,run,2,30\n"           # a 28-frame range of a 40-frame file
                        "x/v2.mp4,jump,30,40\n"         # 10 frames: shorter than one sample, kept
                        "x/gone.webm,walk\n"
                        "x/v1.webm,walk,9,3\n")
    report = build_manifest(csv_path, tmp_path / "m.jsonl", data=SMALL, workers=1)
    recs = read_manifest(tmp_path / "m.jsonl")
    assert [(r.label_name, r.label, r.start, r.end, r.frame_end) for r in recs] == [
        ("jump", 0, 30, 40, 40), ("run", 1, 2, 30, 30), ("walk", 2, 0, -1, 24)]
    assert Path(recs[2].path) == (root / "x" / "v1.webm").resolve()
    assert sorted(x["reason"] for x in report["excluded"]) == ["bad_range", "missing"]
    assert report["classes_without_usable_video"] == []
    assert (report["usable_for_evaluation"], report["usable_for_pretraining"]) == (3, 2)
    # with a header naming the columns (and a split column)
    csv_path.write_text("path,label,split\nx/v1.webm,walk,val\nx/v2.mp4,run,train\n")
    build_manifest(csv_path, tmp_path / "m2.jsonl", data=SMALL, workers=1)
    assert {(r.label_name, r.split) for r in read_manifest(tmp_path / "m2.jsonl")} == {("walk", "val"),
                                                                                         ("run", "train")}
    csv_path.write_text("x/v1.webm\n")
    with pytest.raises(UserError, match="row 1"):
        build_manifest(csv_path, tmp_path / "m3.jsonl", data=SMALL, workers=1)


def test_index_split_folders_with_process_pool(tmp_path):
    src = tmp_path / "k"
    for split, classes in (("train", ("b", "a")), ("val", ("a", "c"))):
        for i, cls in enumerate(classes):
            video(src / split / cls / f"{cls}_{split}", 20 + i, "vp9", seed=i)
    report = build_manifest(src, tmp_path / "m.jsonl", data=SMALL, workers=2)
    recs = read_manifest(tmp_path / "m.jsonl")
    assert {(r.split, r.label_name, r.label) for r in recs} == {
        ("train", "a", 0), ("train", "b", 1), ("val", "a", 0), ("val", "c", 2)}
    assert report["per_split"] == {"train": 2, "val": 2}
    assert [r.split for r in read_manifest(tmp_path / "m.jsonl", split="val")] == ["val", "val"]
    (src / "extra_class").mkdir()
    with pytest.raises(UserError, match="mixes split folders"):
        build_manifest(src, tmp_path / "m.jsonl", data=SMALL)


def test_cli_index(tmp_path, capsys):
    src = tmp_path / "src"
    video(src / "a" / "v", 20, "vp9")
    out = tmp_path / "m.jsonl"
    # overrides directly after SRC: argparse takes positionals only as one contiguous run
    args = ["index", str(src), "data.frames_per_clip=4", "data.frame_stride=4", "data.flow_gap=4",
            "data.flow_frames=all",
            "-o", str(out), "--workers", "1"]
    assert cli_main(args) == 0 and len(read_manifest(out)) == 1
    assert cli_main(["index", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_index_mds_starts_in_moving_part(tmp_path):
    # 96 static raw frames, then 96 frames of a moving patch. MJPEG at constant quality makes the
    # static frames byte-identical after decoding, so their flow is exactly zero.
    h, w = 112, 144
    static = moving_texture_frames(96, h, w, (0.0, 0.0), seed=4)
    moving = moving_texture_frames(96, h, w, (2.5, 1.0), seed=4)
    write_video(tmp_path / "src" / "a" / "v", np.concatenate([static, moving]), "mjpeg")
    cfg = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=8)
    index_videos(tmp_path / "src", tmp_path / "m.jsonl", data=cfg, workers=1, mds=True,
                 mds_estimator="dis_fast")
    (rec,) = read_manifest(tmp_path / "m.jsonl")
    starts = rec.mds_starts
    assert starts and starts == sorted(starts) and all(s % 2 == 0 for s in starts)
    # flow j pairs raw 2j -> 2j + 8: it sees motion iff 2j + 8 > 96 (j >= 45), j = 44 is the
    # static -> moving transition; there are (192 - 1 - 8) // 2 + 1 = 92 flows. Clip score c_i sums
    # s_{i + 4k}, k = 0..7, where s_j compares flows j and j + 1 (so s_44 sees the transition).
    n_flows = (192 - 1 - 8) // 2 + 1
    terms = {i: [i + 4 * k for k in range(8) if i + 4 * k < n_flows] for i in range(n_flows)}
    allowed = [s // 2 for s in starts]
    assert all(any(j >= 44 for j in terms[i]) for i in allowed)       # never an all-static clip
    mostly_moving = [i for i in allowed if sum(j >= 45 for j in terms[i]) >= 4]
    assert len(mostly_moving) >= 0.75 * len(allowed)
    full = [i for i in range(n_flows) if len(terms[i]) == 8 and min(terms[i]) >= 45]
    assert len(set(full) & set(allowed)) >= 0.8 * len(full)          # fully moving clips are kept
    assert len(allowed) <= (n_flows + 1) // 2                          # "> median" keeps at most half


def test_index_mds_static_video_allows_every_start(tmp_path):
    # identical frames: every clip scores 0, the median rule prefers nothing -> all scored starts
    frames = np.repeat(moving_texture_frames(1, 112, 144, (0.0, 0.0), seed=1), 40, axis=0)
    write_video(tmp_path / "src" / "a" / "still", frames, "mjpeg")
    cfg = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=8)
    index_videos(tmp_path / "src", tmp_path / "m.jsonl", data=cfg, workers=1, mds=True)
    (rec,) = read_manifest(tmp_path / "m.jsonl")
    assert rec.mds_starts == list(range(0, 40 - 8, 2))      # flows 2j -> 2j + 8 exist for 2j + 8 < 40


def test_index_mds_scorer_pickles_for_spawned_workers():
    # the index command hands build_manifest a scorer that the spawned probe processes must unpickle
    import pickle

    from mscl_stream.motion.mds import MDSScorer
    scorer = MDSScorer(estimator="dis_fast", flow_gap=4)
    assert pickle.loads(pickle.dumps(scorer)) == scorer and scorer.name == "dis_fast"


def dali_decoded_count(path: Path, device: str) -> int:
    """Frames DALI's video decoder returns for a whole file (CPU: device_id None; GPU: "mixed")."""
    from nvidia.dali import fn, pipeline_def, types

    data = np.fromfile(path, np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None if device == "cpu" else 0)
    def pipe():
        enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.video(enc, device=device)

    p = pipe()
    p.build()
    out = p.run()[0]
    return int((out.as_cpu() if device == "mixed" else out).as_array().shape[1])


def test_probe_counts_equal_dali_cpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    full = video(tmp_path / "v", 40, "vp9")
    half = tmp_path / "half.webm"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    alt = encode_raw(tmp_path / "alt.webm", "libvpx-vp9", {"deadline": "good", "cpu-used": "5",
                                                            "auto-alt-ref": "1", "lag-in-frames": "16"})
    for path in (full, half, alt, video(tmp_path / "m", 30, "mjpeg")):
        assert probe_video(path).num_frames == dali_decoded_count(path, "cpu"), path.name


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_probe_counts_equal_dali_gpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    # NVDEC has minimum sizes (HEVC: 144x144 on many GPUs): use 144x176
    paths = [video(tmp_path / "h", 40, "h264", h=144, w=176), video(tmp_path / "x", 40, "hevc", h=144, w=176),
             encode_raw(tmp_path / "b.mp4", "libx264", {"preset": "fast", "bf": "3"}, bframes=3, h=144, w=176)]
    for path in paths:
        p = probe_video(path, cuda=True)
        assert "dali_gpu" in p.decoders
        assert p.num_frames == dali_decoded_count(path, "mixed"), path.name
