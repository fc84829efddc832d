"""benchmarks/direction_kept.py: the flip-folded angle against hand values, the same-class nearest
neighbour against a loop-by-loop float64 reference, and that features carrying the direction put the
neighbour far closer than chance while features without it do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_benchmark

dk = load_benchmark("direction_kept")


@pytest.mark.parametrize("a, b, want", [
    (0, 0, 0), (0, 180, 0),          # right and left: one direction once mirrored
    (0, 90, 90), (90, 270, 180),      # up and down: a mirror does not join them
    (30, 150, 0),                    # 150 = 180 - 30: the mirror image
    (10, 350, 20), (45, 100, 35), (-80, 250, 10), (-80, 260, 0),
])
def test_folded_angle_by_hand(a, b, want):
    assert float(dk.folded_angle(a, b)) == pytest.approx(want)
    assert float(dk.folded_angle(b, a)) == pytest.approx(want)            # symmetric


def _reference(q_feats, q_ang, q_cls, g_feats, g_ang, g_cls):
    def prep(x):
        x = [list(map(float, r)) for r in x]
        mean = [sum(col) / len(x) for col in zip(*x)]
        x = [[v - m for v, m in zip(r, mean)] for r in x]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x]

    def fold(a, b):
        def circ(x, y):
            d = abs(x - y) % 360
            return min(d, 360 - d)
        return min(circ(a, b), circ(a, 180 - b))

    q, g = prep(q_feats), prep(g_feats)
    near, chance = [], []
    for i, c in enumerate(q_cls):
        if c not in dk.SIGNED:
            continue
        same = [j for j, gc in enumerate(g_cls) if gc == c]
        best = max(same, key=lambda j: sum(a * b for a, b in zip(q[i], g[j])))
        near.append(fold(q_ang[i], g_ang[best]))
        chance.append(sum(fold(q_ang[i], g_ang[j]) for j in same) / len(same))
    return near, chance


def test_nearest_angles_match_a_loop_reference():
    rng = np.random.default_rng(0)
    classes = ["pan", "steady", "still", "oscillate"]
    g_cls = [classes[i % 4] for i in range(40)]
    q_cls = [classes[i % 4] for i in range(16)]
    g, q = rng.normal(size=(40, 6)), rng.normal(size=(16, 6))
    g_ang, q_ang = rng.uniform(0, 360, 40), rng.uniform(0, 360, 16)
    got = dk.nearest_angles(q, q_ang, q_cls, g, g_ang, g_cls)
    near, chance = _reference(q, q_ang, q_cls, g, g_ang, g_cls)
    assert got["classes"] == [c for c in q_cls if c in dk.SIGNED]        # still / oscillate left out
    assert got["nearest"] == pytest.approx(near) and got["chance"] == pytest.approx(chance)


def test_features_with_the_direction_beat_chance_and_features_without_do_not():
    rng = np.random.default_rng(1)
    n_g, n_q = 80, 40
    g_ang, q_ang = rng.uniform(0, 360, n_g), rng.uniform(0, 360, n_q)
    g_cls = [dk.SIGNED[i % 4] for i in range(n_g)]
    q_cls = [dk.SIGNED[i % 4] for i in range(n_q)]

    def keeps(ang):     # a flip-blind encoder that keeps the direction: (|cos|, sin) plus noise dimensions
        r = np.radians(ang)
        return np.c_[np.abs(np.cos(r)), np.sin(r), 0.05 * rng.normal(size=(len(ang), 6))]

    got = dk.nearest_angles(keeps(q_ang), q_ang, q_cls, keeps(g_ang), g_ang, g_cls)
    assert np.mean(got["nearest"]) < 15 and np.mean(got["chance"]) > 35       # uniform angles: chance ~45
    blind = dk.nearest_angles(rng.normal(size=(n_q, 8)), q_ang, q_cls, rng.normal(size=(n_g, 8)), g_ang, g_cls)
    assert abs(np.mean(blind["nearest"]) - np.mean(blind["chance"])) < 10


def test_summary_by_hand():
    runs = {"full": {0: {"nearest": [10.0, 30.0], "chance": [40.0, 50.0]},
                     1: {"nearest": [20.0, 20.0], "chance": [44.0, 46.0]}}}
    s = dk.summarise(runs)["full"]
    # gaps: seed 0 (45 - 20) = 25, seed 1 (45 - 20) = 25 -> SE 0
    assert s["gap_mean"] == pytest.approx(25.0) and not s["gap_se"]
    runs["full"][1]["nearest"] = [30.0, 30.0]                  # gap 15: mean 20, SD 7.07, SE 5
    s = dk.summarise(runs)["full"]
    assert s["gap_mean"] == pytest.approx(20.0) and s["gap_se"] == pytest.approx(5.0)
    assert "| full | 2 | 25.0 | 45.0 | 20.0 +- 5.0 | 25.0, 15.0 |" in dk.markdown(dk.summarise(runs))
