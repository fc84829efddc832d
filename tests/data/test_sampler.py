"""ClipSampler: window/partner formulas (re-derived here), coverage, shards, determinism, resume, MDS."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from mscl_stream.config import DataConfig
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.sampler import ClipSampler, min_raw_frames, pretraining_records
from mscl_stream.errors import UserError


def records(lengths, start=0, mds=None):
    return [VideoRecord(path=f"/data/v{i}.webm", label=i % 3, label_name="c", split="train", num_frames=n,
                        fps=25.0, width=64, height=48, codec="vp9", duration=n / 25, start=start,
                        mds_starts=None if mds is None else list(mds[i]))
            for i, n in enumerate(lengths)]


def data(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **kw)


def key(s):
    return (s.video_idx, tuple(s.frame_idx_a), tuple(s.partner_idx_a), tuple(s.frame_idx_b), tuple(s.partner_idx_b))


def reference_window(r0: int, rec: VideoRecord, d: DataConfig):
    """docs/method.md, section 1, written out: T frames r0 + k * stride, partners r + gap for the flow
    steps (even steps or all), everything wrapped into [start, end)."""
    start, end = rec.start, rec.num_frames if rec.end < 0 else rec.end
    steps = list(range(0, d.frames_per_clip, 2)) if d.flow_frames == "even" else list(range(d.frames_per_clip))
    wrap = lambda x: start + (x - start) % (end - start)  # noqa: E731
    frames = [wrap(r0 + k * d.frame_stride) for k in range(d.frames_per_clip)]
    partners = [wrap(r0 + k * d.frame_stride + d.flow_gap) for k in steps]
    return frames, partners


def check_formulas(s, rec: VideoRecord, d: DataConfig) -> int:
    """Asserts the spec follows section 1; returns the shift d = rB - rA (one that explains rB)."""
    start, end = rec.start, rec.frame_end
    ra = int(s.frame_idx_a[0])
    assert start <= ra < end and (ra - start) % 2 == 0
    fa, pa = reference_window(ra, rec, d)
    assert s.frame_idx_a.tolist() == fa and s.partner_idx_a.tolist() == pa
    assert s.frame_idx_a.dtype == np.int64 and s.partner_idx_b.dtype == np.int64
    # window B: some even shift in [-max_shift, max_shift] from rA, wrapped
    length = end - start
    shifts = [dd for dd in range(-d.max_shift, d.max_shift + 1, 2)
              if start + (ra + dd - start) % length == s.frame_idx_b[0]
              and reference_window(ra + dd, rec, d) == (s.frame_idx_b.tolist(), s.partner_idx_b.tolist())]
    assert shifts, f"window B {s.frame_idx_b} is not rA + d for any allowed d"
    for arr in (s.frame_idx_a, s.partner_idx_a, s.frame_idx_b, s.partner_idx_b):
        assert arr.min() >= start and arr.max() < end
    return shifts[0]


@pytest.mark.parametrize("flow_frames", ["even", "all"])
def test_windows_and_partners_follow_section_1(flow_frames):
    d = data(flow_frames=flow_frames, clips_per_video=100)
    recs = records([300, 500, 130, 90])          # 130 and 90 are shorter than a span: they wrap
    s = ClipSampler(recs, d, seed=3)
    shifts, wrapped = [], 0
    for epoch in range(5):
        s.set_epoch(epoch)
        for spec in s:
            shift = check_formulas(spec, recs[spec.video_idx], d)
            if recs[spec.video_idx].num_frames > 2 * d.max_shift:   # else d is ambiguous modulo the length
                shifts.append(shift)
            wrapped += bool(np.any(np.diff(spec.frame_idx_a) < 0))
            assert len(spec.partner_idx_a) == (4 if flow_frames == "even" else 8)
    shifts = np.array(shifts)
    assert wrapped > 0                            # short videos did wrap
    assert shifts.min() == -128 and shifts.max() == 128 and np.all(shifts % 2 == 0)
    assert abs(shifts.mean()) < 15                # uniform on [-128, 128]: mean ~0, std ~74
    assert 60 < shifts.std() < 90


def test_start_a_is_uniform_over_even_frames():
    d = data()
    rec = records([20])                           # 10 even starts: 0, 2, ..., 18
    s = ClipSampler(rec, data(clips_per_video=4000), seed=0)
    s.set_epoch(0)
    starts = collections.Counter(int(x.frame_idx_a[0]) for x in s)
    assert sorted(starts) == list(range(0, 20, 2))
    assert min(starts.values()) > 300             # expected 400 each
    assert d.frames_per_clip == 8


def test_no_wrap_clamps_windows_inside_the_video():
    d = data(wrap=False)
    recs = records([200, 130, 400], start=4)
    s = ClipSampler(recs, d, seed=1)
    for epoch in range(50):
        s.set_epoch(epoch)
        for spec in s:
            end = recs[spec.video_idx].num_frames
            for fr, pa in ((spec.frame_idx_a, spec.partner_idx_a), (spec.frame_idx_b, spec.partner_idx_b)):
                assert np.all(np.diff(fr) == 16) and fr[0] >= 4 and (fr[0] - 4) % 2 == 0
                assert fr.max() < end and pa.max() < end and np.array_equal(pa, fr[::2] + 8)
            assert abs(int(spec.frame_idx_b[0]) - int(spec.frame_idx_a[0])) <= 128


def test_wrap_around_short_video():
    d = data(frames_per_clip=4, frame_stride=10, flow_gap=5, max_shift=0)
    rec = records([25], start=3)                  # usable frames 3..24 (22 frames)
    s = ClipSampler(rec, d, seed=0)
    s.set_epoch(0)
    spec = next(iter(s))
    ra = int(spec.frame_idx_a[0])
    expect = [3 + (ra - 3 + 10 * k) % 22 for k in range(4)]
    assert spec.frame_idx_a.tolist() == expect
    assert spec.partner_idx_a.tolist() == [3 + (ra - 3 + 10 * k + 5) % 22 for k in (0, 2)]
    assert spec.frame_idx_b.tolist() == expect       # max_shift 0: B == A


@pytest.mark.parametrize("cpv", [1, 3])
def test_every_video_visited_clips_per_video_times(cpv):
    recs = records([200] * 11)
    s = ClipSampler(recs, data(clips_per_video=cpv), seed=5)
    for epoch in range(3):
        s.set_epoch(epoch)
        counts = collections.Counter(x.video_idx for x in s)
        assert counts == {i: cpv for i in range(11)}
        assert len(s) == 11 * cpv


@pytest.mark.parametrize("n,world", [(12, 4), (10, 3), (2, 3)])
def test_shards_are_disjoint_cover_everything_and_have_equal_length(n, world):
    recs = records([200] * n)
    per_rank = []
    for rank in range(world):
        s = ClipSampler(recs, data(), rank=rank, world_size=world, seed=9)
        s.set_epoch(2)
        per_rank.append([x.video_idx for x in s])
    lengths = {len(v) for v in per_rank}
    assert lengths == {-(-n // world)}            # equal steps on every rank
    allv = [v for r in per_rank for v in r]
    assert set(allv) == set(range(n))             # covering
    pad = world * -(-n // world) - n
    assert len(allv) - len(set(allv)) == pad      # only the padding repeats a video
    if pad == 0:
        for a in range(world):
            for b in range(a + 1, world):
                assert not set(per_rank[a]) & set(per_rank[b])


def test_seeded_determinism_and_epoch_order():
    recs = records([150 + 7 * i for i in range(20)])
    run = lambda seed, epoch: [key(x) for x in (lambda s: (s.set_epoch(epoch), list(s))[1])(  # noqa: E731
        ClipSampler(recs, data(), seed=seed))]
    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(1, 0)
    e0, e1 = run(0, 0), run(0, 1)
    assert [k[0] for k in e0] != [k[0] for k in e1]   # different order across epochs
    assert sorted(k[0] for k in e0) == sorted(k[0] for k in e1)


def test_no_global_random_state_used():
    recs = records([200] * 8)
    np.random.seed(0)
    a = [key(x) for x in (lambda s: (s.set_epoch(0), list(s))[1])(ClipSampler(recs, data(), seed=4))]
    np.random.seed(123)
    b = [key(x) for x in (lambda s: (s.set_epoch(0), list(s))[1])(ClipSampler(recs, data(), seed=4))]
    assert a == b


@pytest.mark.parametrize("k", [0, 1, 7, 12])
def test_exact_resume_mid_epoch(k):
    recs = records([160 + 9 * i for i in range(12)])
    d = data(clips_per_video=2)
    full = ClipSampler(recs, d, rank=1, world_size=2, seed=11)
    full.set_epoch(3)
    expected = [key(x) for x in full]
    s = ClipSampler(recs, d, rank=1, world_size=2, seed=11)
    s.set_epoch(3)
    it = iter(s)
    head = [key(next(it)) for _ in range(k)]
    state = s.state_dict()
    fresh = ClipSampler(recs, d, rank=1, world_size=2, seed=11)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)                            # a trainer re-announcing the epoch keeps the position
    assert head + [key(x) for x in fresh] == expected
    fresh.set_epoch(4)                            # the next epoch is the uninterrupted run's next epoch
    full.set_epoch(4)
    assert [key(x) for x in fresh] == [key(x) for x in full]


def test_exhausted_epoch_yields_nothing_until_set_epoch():
    s = ClipSampler(records([200] * 3), data(), seed=0)
    s.set_epoch(0)
    assert len(list(s)) == 3 and list(s) == []
    s.set_epoch(1)
    assert len(list(s)) == 3


def test_resume_with_other_world_size_is_an_error():
    recs = records([200] * 6)
    state = ClipSampler(recs, data(), rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="world_size"):
        ClipSampler(recs, data(), rank=0, world_size=3).load_state_dict(state)


def mds_rule_b(target: int, allowed: list[int]) -> int:
    """Section 4, written independently: the target if allowed, 0 if it is <= 0, else the smallest
    allowed start above it (the largest allowed one if there is none above)."""
    if target in allowed:
        return target
    if target <= 0:
        return 0
    above = [a for a in sorted(allowed) if a > target]
    return above[0] if above else max(allowed)


@pytest.mark.parametrize("allowed,max_shift", [([20, 60, 62, 64, 150], 128), ([10, 40], 10)])
def test_mds_rule_on_a_hand_made_allowed_set(allowed, max_shift):
    d = data(mds="index", clips_per_video=3000, max_shift=max_shift)
    rec = records([200], mds=[allowed])
    s = ClipSampler(rec, d, seed=2)
    s.set_epoch(0)
    by_a = collections.defaultdict(collections.Counter)
    for spec in s:
        ra, rb = int(spec.frame_idx_a[0]), int(spec.frame_idx_b[0])
        assert ra in allowed                      # start A: drawn until allowed, else the first allowed
        by_a[ra][rb] += 1
        fa, pa = reference_window(ra, rec[0], d)
        assert spec.frame_idx_a.tolist() == fa and spec.partner_idx_a.tolist() == pa
        fb, pb = reference_window(rb, rec[0], d)
        assert spec.frame_idx_b.tolist() == fb and spec.partner_idx_b.tolist() == pb
    # start A: 100 even candidates, k allowed: no allowed one in 11 draws -> the first allowed start
    k = len(allowed)
    p_hit = 1 - (1 - k / 100) ** 11
    n = sum(sum(c.values()) for c in by_a.values())
    frac_first = sum(by_a[allowed[0]].values()) / n
    assert abs(frac_first - ((1 - p_hit) + p_hit / k)) < 0.03
    # start B given A: the exact distribution of rule(A + d), d uniform even in [-max_shift, max_shift]
    shifts = range(-max_shift, max_shift + 1, 2)
    for ra, counts in by_a.items():
        m = sum(counts.values())
        if m < 300:
            continue
        expect = collections.Counter(mds_rule_b(ra + dd, allowed) for dd in shifts)
        assert set(counts) <= set(expect)
        for b, c in expect.items():
            assert abs(counts[b] / m - c / len(shifts)) < 0.04, (ra, b)


def test_mds_needs_starts_for_some_video():
    with pytest.raises(UserError, match="MDS"):
        ClipSampler(records([200, 200], mds=[[], []]), data(mds="index"))


def test_mds_videos_without_starts_sample_uniformly(caplog):
    d = data(mds="index", clips_per_video=200)
    with caplog.at_level("WARNING"):
        s = ClipSampler(records([200, 200], mds=[[40], []]), d)
    assert "1 of 2 videos have no MDS starts" in caplog.text
    s.set_epoch(0)
    starts = {v: set() for v in (0, 1)}
    for spec in s:
        starts[spec.video_idx].add(int(spec.frame_idx_a[0]))
    assert starts[0] == {40}               # MDS video: only its allowed start
    assert len(starts[1]) > 20             # no starts stored: uniform over the video


def test_min_raw_frames():
    # MSCL defaults: 8 frames 16 apart; flow for sampled frames 0, 2, 4, 6 -> last partner 6*16 + 8
    # = 104 lies before the last sampled frame 7*16 = 112, so a window spans 113 raw frames; with
    # flow for every frame the last partner is 7*16 + 8 = 120 -> 121
    assert min_raw_frames(DataConfig()) == 113
    assert min_raw_frames(DataConfig(flow_frames="all")) == 121
    assert min_raw_frames(DataConfig(flow_frames="all", wrap=False)) == 121 + 128


def test_pretraining_skips_rows_shorter_than_one_sample(caplog):
    # the length rule moved from the index to pretraining: 113 raw frames with the defaults (above)
    recs = records([300, 112, 113, 40])
    recs[0].start, recs[0].end = 200, -1                    # 100 usable frames of 300: too short as well
    with caplog.at_level("WARNING", logger="mscl_stream.data.sampler"):
        kept = pretraining_records(recs, DataConfig())
    assert [r.path for r in kept] == ["/data/v2.webm"]
    assert "pretraining skips 3 of 4 videos shorter than one sample (113 raw frames" in caplog.text
    with pytest.raises(UserError, match=r"all 2 are shorter than 113 raw frames \(longest 112\)"):
        pretraining_records(recs[1:2] + recs[3:], DataConfig())
    assert pretraining_records(recs[2:3], DataConfig()) == recs[2:3]


def test_every_pretraining_reader_skips_videos_shorter_than_one_sample(tmp_path, monkeypatch, caplog):
    # the trainer, the baseline loaders, bench and the demo's batch view sample the same rows: a manifest
    # row shorter than one sample (113 raw frames at the defaults) never reaches their ClipSampler
    import mscl_stream.commands.bench as bench
    import mscl_stream.data.loader as loader_mod
    import mscl_stream.demo as demo
    from mscl_stream.commands.baseline import PyAVDataLoader, pyav_dataloader
    from mscl_stream.config import load_config
    from mscl_stream.data.manifest import write_manifest
    from mscl_stream.data.sampler import read_pretraining_manifest
    write_manifest(records([112, 113, 40, 300]), tmp_path / "m.jsonl")
    cfg = load_config(None, [f"data.manifest={tmp_path / 'm.jsonl'}", "train.device=cpu", "data.decode_workers=1"])
    long = ["/data/v1.webm", "/data/v3.webm"]
    with caplog.at_level("WARNING"):
        assert [r.path for r in read_pretraining_manifest(cfg.data)] == long
    assert "pretraining skips 2 of 4 videos shorter than one sample (113 raw frames" in caplog.text

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, recs, **kw):
        seen.append([r.path for r in recs])
        raise Stop
    monkeypatch.setattr(loader_mod, "build_loader", capture)
    for call in (lambda: bench._first_batch(cfg), lambda: demo.save_batch_png(cfg, tmp_path / "b.png")):
        with pytest.raises(Stop):
            call()
    assert seen == [long, long]
    base = pyav_dataloader(cfg)
    assert isinstance(base, PyAVDataLoader) and [r.path for r in base.sampler.records] == long
