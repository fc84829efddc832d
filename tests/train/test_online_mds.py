"""MDS `online` (docs/method.md, section 4): candidate sampling, window scores, in-batch selection, training.

The window score is checked against a float64 numpy re-computation written here (Sobel with edge
padding, 28x28 pooling, bilinear upsampling, Middlebury wheel), not against the motion module's helpers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN
from mscl_stream.config import ConfigError, DataConfig, load_config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import VideoRecord, read_manifest
from mscl_stream.data.pyav_decode import decode_frames
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.motion import select_online_mds, window_motion_scores
from mscl_stream.train.inputs import compute_flow
from mscl_stream.train.trainer import pretrain

TINY = [*TINY_TRAIN, "data.mds=online", "data.mds_candidates=2"]


# ---------------------------------------------------------------- sampler

def _records(lengths):
    return [VideoRecord(path=f"/data/v{i}.webm", label=0, label_name="c", split="train", num_frames=n, fps=25.0,
                        width=64, height=48, codec="vp9", duration=n / 25) for i, n in enumerate(lengths)]


def _online(k=3, **kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), mds="online", mds_candidates=k, **kw)


def _key(specs):
    return tuple((s.video_idx, tuple(s.frame_idx_a), tuple(s.partner_idx_a), tuple(s.frame_idx_b),
                  tuple(s.partner_idx_b))
                 for s in specs)


def _epoch(s: ClipSampler) -> list:
    # what the loader does: after each sample the position says how many were consumed
    out = []
    for _ in s:
        out.append(_key(s.specs(s.position - 1)))
    return out


def test_config_validates_candidates():
    with pytest.raises(ConfigError, match="data.mds_candidates"):
        load_config(None, ["data.mds=online", "data.mds_candidates=1"])
    assert load_config(None, ["data.mds=online"]).data.mds_candidates == 2


def test_sampler_yields_k_candidates_with_a_shared_shift():
    recs, k = _records([300, 260, 410]), 3
    d = _online(k, clips_per_video=20)
    s = ClipSampler(recs, d, seed=5)
    s.set_epoch(0)
    assert len(s) == 60 and s.candidates == k
    seen_starts = set()
    for p in range(len(s)):
        cands = s.specs(p)
        rec = recs[cands[0].video_idx]
        length = rec.frame_end - rec.start
        assert len(cands) == k and {c.video_idx for c in cands} == {cands[0].video_idx}
        starts = [int(c.frame_idx_a[0]) for c in cands]
        assert len(set(starts)) == k and all(a % 2 == 0 for a in starts)
        seen_starts.update(starts)
        shifts = set()
        for c in cands:
            a = int(c.frame_idx_a[0])
            assert c.frame_idx_a.tolist() == [(a + 16 * t) % length for t in range(8)]
            assert c.partner_idx_a.tolist() == [(a + 16 * t + 8) % length for t in range(0, 8, 2)]
            delta = (int(c.frame_idx_b[0]) - a) % length          # B = A + d (wrapped), d even in [-128, 128]
            dd = delta if delta <= 128 else delta - length
            assert -128 <= dd <= 128 and dd % 2 == 0
            assert c.frame_idx_b.tolist() == [(a + dd + 16 * t) % length for t in range(8)]
            shifts.add(dd)
        assert len(shifts) == 1, "one shift d per sample, shared by its candidates"
        assert _key([s.spec(p)]) == _key(cands[:1])
    assert len(seen_starts) > 100        # starts spread over the videos, not a fixed few


@pytest.mark.parametrize("consumed", [0, 7, 23])
def test_sampler_online_is_deterministic_and_resumes_exactly(consumed):
    recs, d = _records([200 + 13 * i for i in range(10)]), _online(2, clips_per_video=3)
    full = ClipSampler(recs, d, rank=1, world_size=2, seed=7)
    full.set_epoch(2)
    expected = _epoch(full)
    again = ClipSampler(recs, d, rank=1, world_size=2, seed=7)
    again.set_epoch(2)
    assert _epoch(again) == expected and len(expected) == 15
    s = ClipSampler(recs, d, rank=1, world_size=2, seed=7)
    s.set_epoch(2)
    it = iter(s)
    head = []
    for _ in range(min(consumed, len(expected))):
        next(it)
        head.append(_key(s.specs(s.position - 1)))
    fresh = ClipSampler(recs, d, rank=1, world_size=2, seed=7)
    fresh.load_state_dict(s.state_dict())
    fresh.set_epoch(2)
    assert head + _epoch(fresh) == expected
    other = ClipSampler(recs, d, rank=1, world_size=2, seed=8)
    other.set_epoch(2)
    assert _epoch(other) != expected


# ---------------------------------------------------------------- window scores

def _np_wheel() -> np.ndarray:
    rows = []
    for n, full, ramp, up in ((15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True), (11, 2, 1, False),
                              (13, 2, 0, True), (6, 0, 2, False)):
        for i in range(n):
            c = [0.0, 0.0, 0.0]
            c[full] = 255.0
            c[ramp] = math.floor(255 * i / n) if up else 255 - math.floor(255 * i / n)
            rows.append(c)
    return np.array(rows)


def _np_color255(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    wheel = _np_wheel() / 255.0
    fk = (np.arctan2(-v, -u) / np.pi + 1) / 2 * 54
    k0 = np.floor(fk).astype(int)
    k1 = np.where(k0 + 1 == 55, 0, k0 + 1)
    f = (fk - k0)[..., None]
    col = (1 - f) * wheel[k0] + f * wheel[k1]
    r = np.sqrt(u * u + v * v)[..., None]
    col = np.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    return np.floor(255 * col)                                    # (H, W, 3)


def _np_upsample(x: np.ndarray, h: int, w: int) -> np.ndarray:
    # bilinear, align_corners=False: source coordinate (o + 0.5) * in / out - 0.5, clamped at 0
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, ly = axis(x.shape[0], h)
    x0, x1, lx = axis(x.shape[1], w)
    top = x[y0][:, x0] * (1 - lx) + x[y0][:, x1] * lx
    bot = x[y1][:, x0] * (1 - lx) + x[y1][:, x1] * lx
    return top * (1 - ly)[:, None] + bot * ly[:, None]


def _np_weighted(flow: np.ndarray) -> np.ndarray:
    """W = attention * colour wheel of one (2, H, W) flow frame -> (H, W, 3)."""
    h, w = flow.shape[1:]
    grads = []
    for ch in flow:
        p = np.pad(ch, 1, mode="edge")
        gx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
        gy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
        grads += [gx, gy]
    m = np.sqrt(sum(g * g for g in grads))
    ph, pw = h // 28, w // 28
    pooled = m[:ph * 28, :pw * 28].reshape(ph, 28, pw, 28).mean(axis=(1, 3))
    att = _np_upsample(pooled, h, w)
    att = att / att.max() if att.max() > 0 else np.zeros_like(att)
    mag = np.sqrt(flow[0] ** 2 + flow[1] ** 2).max()
    u, v = flow / (mag + 1e-5)
    return att[..., None] * _np_color255(u, v)


def _np_window_score(window: np.ndarray) -> float:
    ws = [_np_weighted(f) for f in window]
    return float(np.mean([np.sqrt(((ws[j] - ws[j + 1]) ** 2).sum(-1)).mean() for j in range(len(ws) - 1)]))


def test_window_scores_match_a_numpy_recomputation():
    g = torch.Generator().manual_seed(0)
    flows = torch.randn(3, 3, 2, 37, 61, generator=g, dtype=torch.float64) * 4
    flows[2, 1] = flows[2, 0]                          # a repeated frame: its D_j is 0
    got = window_motion_scores(flows)
    ref = np.array([_np_window_score(w) for w in flows.numpy()])
    assert got.dtype == torch.float64 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(window_motion_scores(flows.float()).numpy(), ref, rtol=1e-4)


def _moving_square(frames: int, h: int = 56, w: int = 56, size: int = 12, step: int = 6) -> torch.Tensor:
    """(F, 2, H, W): a square moving right by ``step`` px per flow frame, flow (3, 1) inside it."""
    out = torch.zeros(frames, 2, h, w)
    for j in range(frames):
        x0 = 4 + step * j
        out[j, 0, 20:20 + size, x0:x0 + size] = 3.0
        out[j, 1, 20:20 + size, x0:x0 + size] = 1.0
    return out


def test_window_scores_rank_motion_above_static():
    static = torch.zeros(4, 2, 56, 56)
    uniform = torch.full((4, 2, 56, 56), 2.0)           # camera pan: no motion boundaries, no change
    scores = window_motion_scores(torch.stack([static, _moving_square(4), uniform]))
    assert scores[1] > 1.0 and scores[0] == 0 and scores[2] == 0


# ---------------------------------------------------------------- in-batch selection

def _hand_batch(moving: list[bool], k: int, f: int = 2, h: int = 32, w: int = 32) -> ClipBatch:
    """Rows whose window-A partner differs from its source frame iff ``moving``; frame_idx_a = row index."""
    g = torch.Generator().manual_seed(1)
    n, t = len(moving), 2 * f
    rgb_a = torch.randint(0, 256, (n, t, 3, h, w), generator=g, dtype=torch.uint8)
    partner_rgb_a = rgb_a[:, ::2].clone()
    for r, m in enumerate(moving):
        if m:
            partner_rgb_a[r] = torch.randint(0, 256, (f, 3, h, w), generator=g, dtype=torch.uint8)
    rgb_b = torch.randint(0, 256, (n, t, 3, h, w), generator=g, dtype=torch.uint8)
    partner_rgb_b = torch.randint(0, 256, (n, f, 3, h, w), generator=g, dtype=torch.uint8)
    rows = torch.arange(n)
    return ClipBatch(rgb_a=rgb_a, rgb_b=rgb_b, partner_rgb_a=partner_rgb_a, partner_rgb_b=partner_rgb_b,
                     flow_steps=torch.arange(0, t, 2), frame_idx_a=rows[:, None].repeat(1, t),
                     frame_idx_b=rows[:, None].repeat(1, t) + 100, partner_idx_a=rows[:, None].repeat(1, f),
                     partner_idx_b=rows[:, None].repeat(1, f), labels=rows // k, video_idx=rows // k, candidates=k)


class DiffEstimator:
    """Stand-in flow: (u, v) = channels 0, 1 of dst - src (zero for identical frames); logs batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, src, dst):
        self.calls.append(src.shape[0])
        return (dst.float() - src.float())[:, :2] / 16


def test_select_keeps_the_moving_candidate():
    k = 2
    batch = _hand_batch([False, True, True, False, False, False], k)   # samples: (static, moving), ...
    est = DiffEstimator()
    src, dst = batch.flow_pairs("a")
    flow_a = est(src, dst).view(6, 2, 2, 32, 32)
    kept, kept_flow = select_online_mds(batch, flow_a)
    # sample 0 keeps row 1, sample 1 row 2, sample 2 (both static: a tie) its first row 4
    assert kept.candidates == 1 and kept.batch_size == 3
    assert kept.frame_idx_a[:, 0].tolist() == [1, 2, 4] and kept.labels.tolist() == [0, 1, 2]
    assert torch.equal(kept.rgb_b, batch.rgb_b[[1, 2, 4]]) and torch.equal(kept_flow, flow_a[[1, 2, 4]])
    assert torch.equal(kept.flow_steps, batch.flow_steps)
    same, same_flow = select_online_mds(kept, kept_flow)              # K = 1: unchanged
    assert same is kept and same_flow is kept_flow


def test_compute_flow_runs_window_b_for_kept_rows_only():
    k, f = 2, 2
    batch = _hand_batch([True, False, False, True], k, f=f)
    est = DiffEstimator()
    kept, flow_a, flow_b = compute_flow(batch, est)
    assert est.calls == [4 * f, 2 * f]             # A for every candidate, B for the kept ones
    assert kept.frame_idx_a[:, 0].tolist() == [0, 3]
    ref_b = (batch.partner_rgb_b[[0, 3]].float() - batch.rgb_b[[0, 3]][:, ::2].float())[:, :, :2] / 16
    assert torch.equal(flow_b, ref_b) and flow_a.shape == flow_b.shape == (2, f, 2, 32, 32)
    est.calls.clear()
    compute_flow(kept, est)
    assert est.calls == [2 * 2 * f]                # mds off: one call for both windows


# ---------------------------------------------------------------- loader + trainer

@pytest.fixture(scope="module")
def manifest(tiny_manifest) -> Path:
    return tiny_manifest


def test_loader_puts_candidates_in_adjacent_rows(manifest):
    cfg = load_config(None, [*TINY, f"data.manifest={manifest}", "data.split=", "data.decoder=pyav"])
    records = read_manifest(cfg.data.manifest, cfg.data.split)
    loader = build_loader(cfg, records)
    loader.set_epoch(0)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    assert batch.candidates == 2 and batch.rgb_a.shape[:2] == (4, 8) and batch.partner_rgb_b.shape[:2] == (4, 4)
    sampler = ClipSampler(records, cfg.data, seed=cfg.data.seed)
    sampler.set_epoch(0)
    for b in range(2):
        for c, spec in enumerate(sampler.specs(b)):
            row = 2 * b + c
            assert batch.frame_idx_a[row].tolist() == spec.frame_idx_a.tolist()
            assert batch.partner_idx_b[row].tolist() == spec.partner_idx_b.tolist()
            ref = decode_frames(records[spec.video_idx].path, spec.frame_idx_a[:2], (32, 40), threads=1)
            assert torch.equal(batch.rgb_a[row, :2], torch.from_numpy(ref).permute(0, 3, 1, 2))
    assert loader.stats["samples"] == 2


def test_pretrain_with_online_mds_has_finite_losses(manifest, tmp_path):
    seen = []
    cfg = load_config(None, [*TINY, f"data.manifest={manifest}", "data.split=", f"train.out_dir={tmp_path}",
                             "train.max_steps=2", "train.ckpt_every=0"])
    res = pretrain(cfg, on_step=lambda step, model, batch: seen.append((batch.candidates, batch.batch_size)))
    assert res["steps"] == 2 and res["skipped_steps"] == 0 and seen == [(1, 2), (1, 2)]
    terms = [v for k, v in res.items() if k.startswith("loss/")]
    assert len(terms) == 9 and all(math.isfinite(v) for v in terms)
