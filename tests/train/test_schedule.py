"""Schedules against values computed by hand from the formulas in the method doc."""

import math

import pytest

from mscl_stream.train.schedule import lr_at, multistep_lr, scaled_lr


def test_warmup_is_linear_and_starts_above_zero():
    # 4 warmup steps of base 0.4: 0.1, 0.2, 0.3, 0.4
    got = [lr_at(s, total_steps=20, base_lr=0.4, warmup_steps=4) for s in range(4)]
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_cosine_after_warmup_hand_values():
    base, total, warm = 0.4, 20, 4
    # decay phase covers 16 steps: step 4 -> peak, step 12 -> half, step 20 -> 0
    assert lr_at(4, total, base, warm) == pytest.approx(0.4)
    assert lr_at(12, total, base, warm) == pytest.approx(0.2)
    assert lr_at(8, total, base, warm) == pytest.approx(0.4 * 0.5 * (1 + math.sqrt(0.5)))
    assert lr_at(20, total, base, warm) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25, total, base, warm) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_is_pure_cosine_and_monotone():
    vals = [lr_at(s, 10, 1.0) for s in range(11)]
    assert vals[0] == 1.0
    assert vals[5] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_scaled_lr_linear_rule():
    # the authors: 0.02 at 128 clips; 4 GPUs x 8 clips = 32 clips -> 0.005
    assert scaled_lr(0.02, 32, 128) == pytest.approx(0.005)
    assert scaled_lr(0.02, 256, 128) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        scaled_lr(0.02, 0, 128)


def test_multistep():
    got = [multistep_lr(0.12, e, (14, 18)) for e in (0, 13, 14, 17, 18, 21)]
    assert got == pytest.approx([0.12, 0.12, 0.012, 0.012, 0.0012, 0.0012])
