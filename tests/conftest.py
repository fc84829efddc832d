"""Shared fixtures: small synthetic videos with known motion (encoded once per session)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest



def _video_tools():
    # Imported lazily so that tests which make no videos run where PyAV is absent (the GPU host's
    # first staging call has torch but no PyAV yet).
    from mscl_stream.data.synthetic import moving_texture_frames, write_video
    return moving_texture_frames, write_video

# Tiny training settings shared by the trainer, online-MDS and bench tests (CPU, seconds per run). The trunk
# is narrow (the full-width R3D-18 is checked against torchvision in tests/models/test_r3d.py): full-width
# checkpoints with their optimizer state filled CI's small /tmp.
TINY_TRAIN = ["model.rgb_width=8", "model.neck_channels=16", "model.feat_dim=16",
              "data.frames_per_clip=8", "data.frame_stride=2", "data.flow_gap=2", "data.max_shift=4",
              "data.batch_size=2", "data.frame_size=[32, 40]", "data.decode_workers=1", "data.prefetch=1",
              "augment.out_size=32", "flow.estimator=dis_fast", "model.queue_size=8", "optim.lr=0.01",
              "optim.base_batch=2", "train.device=cpu", "train.amp=fp32", "train.deterministic=true",
              "log.every=1", "log.tensorboard=false"]

VIDEO_N, VIDEO_H, VIDEO_W = 64, 128, 176
VIDEO_VELOCITY = (2.0, 1.0)          # foreground px/frame (x right, y down); the background is static


@pytest.fixture(scope="session")
def vp9_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 frames, 128x176, VP9 (.webm), foreground moving by VIDEO_VELOCITY, gop 16, 25 fps, seed 0."""
    moving_texture_frames, write_video = _video_tools()
    frames = moving_texture_frames(VIDEO_N, VIDEO_H, VIDEO_W, VIDEO_VELOCITY, seed=0)
    return write_video(tmp_path_factory.mktemp("vp9") / "clip.webm", frames, "vp9")


@pytest.fixture(scope="session")
def h264_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same content as ``vp9_video`` encoded as H.264 (.mp4)."""
    moving_texture_frames, write_video = _video_tools()
    frames = moving_texture_frames(VIDEO_N, VIDEO_H, VIDEO_W, VIDEO_VELOCITY, seed=0)
    return write_video(tmp_path_factory.mktemp("h264") / "clip.mp4", frames, "h264")


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny VP9 videos (40 frames, 40x48; three move right, three left) indexed for TINY_TRAIN."""
    from mscl_stream.config import load_config
    from mscl_stream.data.indexing import build_manifest

    moving_texture_frames, write_video = _video_tools()
    root = tmp_path_factory.mktemp("tiny_train_data")
    for i, (name, v) in enumerate([("right", (1.5, 0)), ("left", (-1.5, 0))] * 3):
        write_video(root / name / f"{name}_{i}.webm", moving_texture_frames(40, 40, 48, v, seed=i), "vp9")
    build_manifest(root, root / "manifest.jsonl", data=load_config(None, TINY_TRAIN).data, workers=1)
    return root / "manifest.jsonl"


@pytest.fixture
def make_video(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_video(n=32, h=64, w=96, codec="vp9", velocity=(2, 0), seed=0, name=None,
    bg_velocity=(0, 0), gop=16, fps=25)`` writes a video into a fresh temporary folder."""

    moving_texture_frames, write_video = _video_tools()

    def make(n: int = 32, h: int = 64, w: int = 96, codec: str = "vp9",
             velocity: tuple[float, float] = (2.0, 0.0), seed: int = 0, name: str | None = None,
             bg_velocity: tuple[float, float] = (0.0, 0.0), gop: int = 16, fps: int = 25) -> Path:
        frames = moving_texture_frames(n, h, w, velocity, seed=seed, bg_velocity=bg_velocity)
        out = tmp_path_factory.mktemp("video") / (name or f"v_{codec}_{n}x{h}x{w}")
        return write_video(out, frames, codec, fps=fps, gop=gop)

    return make


def run_ranks(script: Path, args_of_rank: Callable[[int], list[str]], world: int = 2, timeout: float = 180) -> None:
    """Run ``script`` as ``world`` torchrun-style processes on localhost (gloo, CPU) and wait for all.

    Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like torchrun sets them,
    no GPU, one OpenMP thread. A failing rank fails the test with the end of its output.
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *args_of_rank(rank)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
