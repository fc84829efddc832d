"""The `motion` sample task: trajectories per class, their renderings, and the generated dataset.

References are independent of the generator: finite differences of the drawn offsets in float64,
integer-pixel translations checked pixel by pixel, and numpy phase correlation on decoded videos.
"""

import re
from dataclasses import replace

import av
import numpy as np
import pytest

from mscl_stream.data.motion_task import (MOTION_CLASSES, PERIOD_S, SPEED, Trajectories, motion_texture_frames,
                                          sample_trajectories)
from mscl_stream.data.profiles import PROFILES, realistic_frames
from mscl_stream.data.synthetic import make_sample_dataset, motion_draws, task_classes
from mscl_stream.errors import UserError

N, FPS = 200, 25


def draw(name, seed=0):
    return sample_trajectories(name, N, FPS, np.random.default_rng(seed))


def steps(off):
    """Per-frame displacement vectors (n-1, 2) and their lengths."""
    d = np.diff(off, axis=0)
    return d, np.hypot(d[:, 0], d[:, 1])


def moving(traj):
    return [bool(np.abs(p).max() > 0) for p in traj.parts], bool(np.abs(traj.background).max() > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_class_moves_as_defined(seed):
    peak = {}
    for name in MOTION_CLASSES:
        t = draw(name, seed)
        parts, bg = moving(t)
        assert t.background.shape == (N, 2) and all(p.shape == (N, 2) for p in t.parts)
        assert all(np.array_equal(x[0], [0, 0]) for x in (t.background, *t.parts))      # offsets from frame 0
        movers = [p for p, m in zip(t.parts, parts) if m]
        expect = {"still": (0, False), "pan": (2, True), "steady": (1, False), "oscillate": (1, False),
                  "stop_go": (1, False), "pair_same": (2, False), "pair_opposite": (2, False)}[name]
        assert (len(movers), bg) == expect, name
        if not movers:
            continue
        d, speed = steps(movers[0])
        peak[name] = speed.max()
        unit = d[speed > 1e-9] / speed[speed > 1e-9, None]
        # every motion of a class lies on one line (one direction, or its reverse for oscillate)
        assert np.allclose(np.abs(unit @ unit[0]), 1.0, atol=1e-9), name
        if name in ("steady", "pan", "pair_same", "pair_opposite"):
            assert np.allclose(speed, speed[0], rtol=1e-12) and SPEED[0] <= speed[0] <= SPEED[1]
        if name == "pan":
            assert np.array_equal(t.parts[0], t.background) and np.array_equal(t.parts[1], t.background)
        if name == "pair_same":
            assert np.array_equal(t.parts[0], t.parts[1])
        if name == "pair_opposite":
            assert np.allclose(t.parts[0], -t.parts[1], atol=0) and np.allclose(unit[0] @ steps(t.parts[1])[0][0],
                                                                                -speed[0], rtol=1e-9)
        if name == "oscillate":
            along = d @ unit[0]
            assert (along > 0).any() and (along < 0).any()             # it reverses
            period = FPS * PERIOD_S[1]
            assert speed.max() <= peak.get("steady", SPEED[1]) + 1e-9 and speed.max() > 0.9 * SPEED[0]
            # bounded: back and forth, never drifting away (amplitude = peak speed * period / 2 pi)
            assert np.abs(movers[0] @ unit[0]).max() <= 2 * SPEED[1] * period / (2 * np.pi) + 1e-9
        if name == "stop_go":
            full = speed > speed.max() * (1 - 1e-9)
            still = speed < 1e-12
            assert full.sum() + still.sum() >= len(speed) - 2 * (N / (FPS * PERIOD_S[0]) + 1)   # only switch frames between
            assert 0.35 < full.mean() < 0.65                            # moving about half the time
    # the nuisances are drawn first, in the same order for every class: one seed, one speed
    assert np.isclose(peak["steady"], peak["pan"]) and np.isclose(peak["steady"], peak["stop_go"])


def test_directions_are_uniform_and_independent_of_the_class():
    for name in ("steady", "oscillate", "pair_opposite"):
        angles = []
        for s in range(400):
            d, speed = steps(next(p for p in draw(name, s).parts if np.abs(p).max() > 0))
            angles.append(np.arctan2(d[0, 1], d[0, 0]))
        z = np.abs(np.exp(1j * np.array(angles)).mean())
        assert z < 0.15, name                                          # Rayleigh: no preferred direction
        hist, _ = np.histogram(np.mod(angles, 2 * np.pi), bins=4, range=(0, 2 * np.pi))
        assert hist.min() > 60, (name, hist)                           # all four quadrants (chance 100 each)


def test_unknown_class_and_task_are_one_line_errors():
    with pytest.raises(UserError, match="motion class"):
        sample_trajectories("spin", 10, 25, np.random.default_rng(0))
    with pytest.raises(UserError, match="task"):
        task_classes("colour")
    assert task_classes("motion") == MOTION_CLASSES and len(set(MOTION_CLASSES)) == 7


def test_rendering_moves_each_part_by_its_offsets():
    # integer offsets: the moving part's pixels at frame t are frame 0's pixels moved by exactly that much
    n, h, w = 9, 64, 96
    t = np.arange(n, dtype=np.float64)[:, None]
    go = t * np.array([[3.0, -2.0]])
    zero = np.zeros((n, 2))
    for parts, bg in (((go, zero), zero), ((go, -go), zero), ((go, go), go)):
        f = motion_texture_frames(n, h, w, Trajectories(bg, parts, ""), seed=4).astype(np.int16)
        moved = np.roll(f[0], shift=(-16, 24), axis=(0, 1))            # 8 frames x (3, -2): dx 24, dy -16
        same_as_moved = np.abs(f[8] - moved).max(-1) == 0
        same_as_still = np.abs(f[8] - f[0]).max(-1) == 0
        if bg is go:                                                   # pan: the whole frame moved
            assert same_as_moved.all()
            continue
        assert 0.03 < same_as_moved.mean() < 0.6 and 0.1 < same_as_still.mean() < 0.95
        if parts[1] is not zero:                                       # the other part moved the other way
            back = np.roll(f[0], shift=(16, -24), axis=(0, 1))
            assert (np.abs(f[8] - back).max(-1) == 0).mean() > 0.03


def phase_peaks(a, b, k=3):
    ga, gb = a.astype(np.float64).mean(-1), b.astype(np.float64).mean(-1)
    fa, fb = np.fft.fft2(ga - ga.mean()), np.fft.fft2(gb - gb.mean())
    r = np.fft.ifft2(fb * np.conj(fa) / (np.abs(fb * np.conj(fa)) + 1e-9)).real
    h, w = r.shape
    out = []
    for _ in range(k):
        y, x = np.unravel_index(np.argmax(r), r.shape)
        out.append(((x + w // 2) % w - w // 2, (y + h // 2) % h - h // 2))
        ys, xs = np.meshgrid(np.arange(y - 2, y + 3) % h, np.arange(x - 2, x + 3) % w, indexing="ij")
        r[ys, xs] = -np.inf
    return out


def test_sample_dataset_motion_task_decodes_as_its_classes(tmp_path, capsys):
    out = make_sample_dataset(tmp_path / "ds", videos=7, seed=3)
    lines = {m.group(1): m.group(2) for m in re.finditer(r"\] (\S+): (.*)", capsys.readouterr().out)}
    assert sorted(p.parent.name for p in out.rglob("*.webm")) == sorted(MOTION_CLASSES)
    draws = motion_draws(7, seed=3)            # replayed without rendering: must be what was drawn
    assert sorted(draws) == sorted(p.removesuffix(".webm") for p in lines)
    for path, line in lines.items():
        name = path.split("/")[1]
        with av.open(str(out / path)) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        d = draws[path.removesuffix(".webm")]
        assert d["class"] == name and d["frames"] == len(frames) and d["size"] == list(frames.shape[1:3])
        if name != "still":
            assert f"{d['angle_deg']:.0f} deg, {d['speed']:.2f} px/frame" in line
        a, b = frames[20], frames[28]
        if name == "still":
            assert np.abs(a.astype(int) - b).mean() < 2.0                # only coding noise
            continue
        deg, speed = map(float, re.search(r"(\d+) deg, ([\d.]+) px/frame", line).groups())
        d = 8 * speed * np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])
        peaks = phase_peaks(a, b, k=5)
        # integer peaks of sub-pixel motions, one part passing over the other: within 2.5 px
        near = lambda v: any(np.hypot(p[0] - v[0], p[1] - v[1]) <= 2.5 for p in peaks)  # noqa: E731
        if name == "pan":
            assert np.hypot(*(np.array(peaks[0]) - d)) <= 1.5                 # the whole frame: strongest
        elif name in ("steady", "pair_same"):
            assert near(d) and near((0, 0))
        elif name == "pair_opposite":
            assert near(d) and near(-d) and near((0, 0))


def test_realistic_profile_motion_follows_the_trajectories():
    t = np.arange(12, dtype=np.float64)[:, None]
    go = t * np.array([[2.0, 1.0]])
    frames, info = realistic_frames(12, 64, 96, (0.0, 0.0), seed=1, grain=0.0, traj=Trajectories(go, (go, go), ""))
    assert len(info["objects"]) == 2 and np.allclose(info["pan"], go[-1])
    assert phase_peaks(frames[0], frames[8], k=1)[0] == (16, 8)             # everything panned by 8 x (2, 1)
    still = Trajectories(np.zeros((12, 2)), (np.zeros((12, 2)), np.zeros((12, 2))), "")
    frames, _ = realistic_frames(12, 64, 96, (0.0, 0.0), seed=1, grain=0.0, traj=still)
    assert np.array_equal(frames[0], frames[11])


def test_k400_profile_motion_task(tmp_path):
    tiny = replace(PROFILES["k400"], sizes=((48, 80),), frames=(40, 40))
    out = make_sample_dataset(tmp_path / "k", videos=7, profile=tiny, seed=2)
    files = sorted(out.rglob("*.mp4"))
    assert sorted(f.parent.name for f in files) == sorted(MOTION_CLASSES)
    with av.open(str(files[0])) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    with pytest.raises(UserError, match="at least 7"):
        make_sample_dataset(tmp_path / "x", videos=6)
