"""benchmarks/decode_peers.py works end to end on CPU without any peer environment.

Its own decode paths (the project's ``decode_frames`` at native size, with and without skipping, and
"decode everything from the clip's start") run through the real job files and child processes on two
tiny H.264 files with B-frames; the frames they hand back must equal an independent PyAV decode of
every frame of the file at the same indices (bit-exact: same decoder, same colour conversion). Peers
whose environment is missing are reported as such, and the rest of the run goes on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.reformatter import Interpolation

from mscl_stream.data.synthetic import moving_texture_frames, write_video

REPO = Path(__file__).resolve().parents[1]
# the project's documented conversion (BT.601, chroma interpolated at full resolution, accurate rounding)
PROJECT_SWS = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
               | Interpolation.ACCURATE_RND)


def _load():
    spec = importlib.util.spec_from_file_location("_bench_decode_peers", REPO / "benchmarks" / "decode_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _full_decode(path: Path, project_colours: bool) -> np.ndarray:
    """Every frame of the file in display order, converted to RGB, decoded from the first packet on."""
    out = []
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = sorted(c.decode(st), key=lambda f: f.pts)
        for f in frames:
            out.append(f.reformat(format="rgb24", interpolation=PROJECT_SWS).to_ndarray() if project_colours
                       else f.to_ndarray(format="rgb24"))
    return np.stack(out)


def _keyframes(path: Path) -> list[int]:
    """Display indices of the keyframes (packets sorted by timestamp)."""
    with av.open(str(path)) as c:
        pk = sorted((p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size)
    return [i for i, (_, key) in enumerate(pk) if key]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("peers")
    # x264 medium (B-frames, some of them unreferenced) with a long keyframe interval, as datasets store video
    return [write_video(root / f"v{i}.mp4", moving_texture_frames(72, 48, 64, (1.5 * (i + 1), 0.5), seed=i),
                        "h264", fps=25, gop=40 + 20 * i, encoding="medium") for i in range(2)]


def test_ours_and_from_start_frames_equal_a_full_decode_and_missing_peers_are_reported(videos, tmp_path):
    dp = _load()
    items = [{"path": str(videos[0]), "indices": [2, 9, 17, 25, 33, 41, 49, 57], "sweep_decoded": 0},
             {"path": str(videos[1]), "indices": [0, 1, 30, 38, 46, 70, 71], "sweep_decoded": 0},
             {"path": str(videos[0]), "indices": [44, 52, 60, 68], "sweep_decoded": 0}]
    peers = ["ours_native_skip", "ours_native_full", "pyav_from_start", "decord", "torchcodec", "dali_cpu"]
    res = dp.run_set(items, peers, tmp_path / "work", (32, 40), rounds=2, vp9_items=None,
                     envs=tmp_path / "no-envs", save=True)

    assert res["decord"]["status"].startswith("not installed")
    assert res["torchcodec"]["status"].startswith("not installed")
    assert res["dali_cpu"]["status"].startswith("not available")
    ours = ["ours_native_skip", "ours_native_full"] if dp.has_skip() else ["ours_native_full"]
    full = {str(v): (_full_decode(v, True), _full_decode(v, False)) for v in videos}
    for peer in ours + ["pyav_from_start"]:
        assert res[peer]["status"] == "ok", res[peer]
        assert [r["item"] for r in res[peer]["rows"]] == list(range(len(items)))
        for k, it in enumerate(items):
            got = np.load(tmp_path / "work" / "frames" / peer / f"{k}.npy")
            want = full[it["path"]][0 if peer.startswith("ours") else 1][it["indices"]]
            assert got.shape == want.shape and np.array_equal(got, want), (peer, k)

    summ = {p: dp.summarize(p, r, items) for p, r in res.items()}
    assert summ["decord"]["status"].startswith("not installed")
    for peer in ours:
        assert summ[peer]["equality"]["max_abs_diff"] == 0
        assert summ[peer]["decoded_source"] == "counted" and summ[peer]["frames_returned_ok"]
    # decoding from the clip's start passes every frame from the keyframe before the first wanted one
    # to the last wanted one (keyframes read from the packets here)
    keys = {str(v): _keyframes(v) for v in videos}
    want = [it["indices"][-1] - max(k for k in keys[it["path"]] if k <= it["indices"][0]) + 1 for it in items]
    assert [r["decoded"] for r in res["pyav_from_start"]["rows"]] == want
    if dp.has_skip():     # x264 medium leaves some B-frames unreferenced: skipping decodes fewer frames
        skip = sum(r["decoded"] for r in res["ours_native_skip"]["rows"])
        assert skip < sum(r["decoded"] for r in res["ours_native_full"]["rows"])
