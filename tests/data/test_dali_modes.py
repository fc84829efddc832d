"""DALI engines (data.dali_mode decoder | reader) on the CPU backend with VP9: frames against an
independent PyAV decode, several runs in flight, per-rank shards, files that fail at build or at run
time, and the reader's slot bookkeeping."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mscl_stream.data.dali.reader import DaliFrameReader, FrameJob
from mscl_stream.data.loader import build_loader
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.errors import UserError

from test_loader import CPU, check_batch_frames, config, dataset, record, reference, small  # noqa: F401 (fixture)

MODES = ["decoder", "reader"]


@pytest.mark.parametrize("mode", MODES)
def test_frames_equal_reference_with_runs_in_flight(vp9_video, mode, monkeypatch):
    # short reader runs, so that this small epoch needs several of them
    monkeypatch.setattr("mscl_stream.data.decode_jobs._READER_FRAMES_PER_RUN", 4)
    ref = reference(vp9_video)
    n, h, w = ref.shape[:3]
    cfg = config(batch_size=2, frame_size=(h, w), decoder="dali", dali_mode=mode, decode_workers=2, prefetch=2)
    recs = [record(vp9_video, n, h, w, "vp9", label=1)] * 8        # 64 frames: windows wrap around
    loader = build_loader(cfg, recs, device=CPU)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        check_batch_frames(b, {i: ref for i in range(8)})
    st = loader.stats
    assert st["dali_samples"] == 8 and st["pyav_samples"] == 0 and st["skipped"] == 0
    # pipelined: more than one run was scheduled and not yet collected at some point
    assert st["dali_max_in_flight"] >= 2 and st["dali_runs"] >= 2


@pytest.mark.parametrize("mode", MODES)
def test_same_samples_as_pyav_on_every_rank(dataset, mode):
    """Sampling is the method's whatever decodes: both ranks' batches (videos, raw indices) equal the
    PyAV path's and the sampler's shard; pixels agree after the same resize."""
    recs, refs = dataset
    seen = []
    for rank in range(2):
        out = {}
        for decoder in ("pyav", "dali"):
            cfg = small(decoder=decoder, dali_mode=mode, clips_per_video=2)
            loader = build_loader(cfg, recs, rank=rank, world_size=2, device=CPU)
            loader.set_epoch(3)
            out[decoder] = list(loader)
        plan = ClipSampler(recs, cfg.data, rank=rank, world_size=2, seed=cfg.data.seed)
        plan.set_epoch(3)
        want = [s.video_idx for s in plan]
        assert [v for b in out["dali"] for v in b.video_idx.tolist()] == want
        for a, b in zip(out["dali"], out["pyav"]):
            assert torch.equal(a.frame_idx_a, b.frame_idx_a) and torch.equal(a.partner_idx_b, b.partner_idx_b)
            check_batch_frames(a, refs)
            assert (a.rgb_a.double() - b.rgb_a.double()).abs().mean() < 1.5
        seen.append(set(want))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(recs)))


@pytest.mark.parametrize("mode", MODES)
def test_truncated_file_is_a_counted_skip(dataset, tmp_path, mode):
    """A file cut short after indexing opens but fails mid-decode: its samples are skipped and counted,
    every other sample arrives intact."""
    recs, refs = dataset
    victim = tmp_path / "cut.webm"
    data = open(recs[5].path, "rb").read()
    victim.write_bytes(data[:len(data) // 3])
    recs = list(recs)
    recs[5] = record(victim, 40, 48, 64, "vp9", label=recs[5].label)
    loader = build_loader(small(decoder="dali", dali_mode=mode), recs, device=CPU)
    loader.set_epoch(0)
    got = []
    for batch in loader:
        check_batch_frames(batch, refs)
        got += batch.video_idx.tolist()
    st = loader.stats
    assert len(got) == 8 and 5 not in got
    assert st["skipped"] == 1 and st["skipped_files"][0]["path"] == str(victim)


def test_reader_reports_dropped_files_and_keeps_the_rest(vp9_video, tmp_path):
    """A file the reader cannot open is dropped at build: its jobs fail, the jobs on both sides of it
    in the same list still get their own frames."""
    ref = reference(vp9_video)
    bad = tmp_path / "garbage.webm"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    good = str(tmp_path / "clip.webm")
    shutil.copy(vp9_video, good)
    frames = [np.array([0, 8, 9, 40]), np.array([3, 4, 60]), np.array([1, 2]), np.array([10, 63])]
    paths = [good, str(bad), good, good]
    jobs = [FrameJob(i, p, f) for i, (p, f) in enumerate(zip(paths, frames))]
    reader = DaliFrameReader(jobs, ref.shape[1:3], CPU, readers=1, frames_per_run=3, depth=2)
    try:
        for i in (0, 2, 3):
            got = reader.result(i).numpy().astype(np.float64)
            assert got.shape == (len(frames[i]),) + ref.shape[1:]
            for k, f in enumerate(frames[i]):
                diffs = np.abs(ref.astype(np.float64) - got[k]).mean(axis=(1, 2, 3))
                assert diffs[f] < 3.0 and int(np.argmin(diffs)) == f
        with pytest.raises(Exception, match="dropped"):
            reader.result(1)
        assert reader.max_in_flight == 2 and reader.lines == 11
    finally:
        reader.close()


def test_window_job_maps_wanted_frames_into_its_sequences():
    """A legacy-reader job: each window is one sequence on its stride grid; rows point every wanted
    frame at its place in the concatenated sequences; a wrapped or off-grid window is not expressible."""
    from mscl_stream.data.dali.reader import window_job
    a = np.array([10, 18, 34])                    # on the stride-8 grid from 10, within 4 frames
    b = np.array([3, 11, 27])
    frames = np.unique(np.concatenate([a, b]))
    job = window_job(0, "v.mp4", frames, [a, b], length=4, stride=8)
    grid = np.concatenate([10 + 8 * np.arange(4), 3 + 8 * np.arange(4)])
    assert job.starts.tolist() == [10, 3] and (grid[job.rows] == frames).all()
    assert window_job(0, "v.mp4", frames, [a, np.array([3, 12])], length=4, stride=8) is None   # off grid
    assert window_job(0, "v.mp4", frames, [np.array([2, 10, 50]), b], length=4, stride=8) is None  # too long


def test_legacy_reader_needs_cuda_and_lists_need_plain_paths(dataset, tmp_path):
    recs, _ = dataset
    with pytest.raises(UserError, match="GPU only"):
        build_loader(small(decoder="dali", dali_mode="legacy"), recs, device=CPU)
    spaced = tmp_path / "with space.webm"
    shutil.copy(recs[0].path, spaced)
    with pytest.raises(UserError, match="whitespace"):
        build_loader(small(decoder="dali", dali_mode="reader"), [record(spaced, 40, 48, 64, "vp9")] * 2, device=CPU)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NVDEC)")


@needs_cuda
@pytest.mark.parametrize("mode", ["decoder", "reader", "legacy"])
@pytest.mark.parametrize("wrap", [True, False])
def test_nvdec_modes_frames_equal_reference(h264_video, mode, wrap):
    """Every DALI engine on NVDEC (H.264): frames equal the PyAV reference (< 3/255); the legacy reader
    hands wrapped windows to fn.decoders.video and counts them."""
    ref = reference(h264_video)
    n, h, w = ref.shape[:3]
    cfg = small(decoder="dali", dali_mode=mode, frame_size=(h, w), wrap=wrap, batch_size=4, prefetch=2)
    recs = [record(h264_video, n, h, w, "h264")] * 16
    loader = build_loader(cfg, recs, device=torch.device("cuda"))
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        assert b.rgb_a.is_cuda
        check_batch_frames(b.to("cpu"), {i: ref for i in range(16)})
    st = loader.stats
    assert st["dali_samples"] == 16 and st["skipped"] == 0 and st["dali_max_in_flight"] >= 2
    if mode == "legacy" and not wrap:
        assert st["dali_reader_fallbacks"] == 0


def test_auto_rule_picks_dali_only_on_a_gpu_with_a_measured_entry(monkeypatch):
    from mscl_stream.data import dali
    assert dali.auto_dali_mode_on_gpu("NVIDIA H100 80GB HBM3") is None     # nothing measured yet
    monkeypatch.setattr(dali, "AUTO_DALI_ON_GPU", {"NVIDIA H100": "reader"})
    assert dali.auto_dali_mode_on_gpu("NVIDIA H100 80GB HBM3") == "reader"
    assert dali.auto_dali_mode_on_gpu("NVIDIA H200") is None


def test_failed_run_fails_only_its_batch_and_later_runs_are_resubmitted(vp9_video, tmp_path):
    """Three batches in flight, the middle one holds a file that cannot be decoded: the failing run
    takes the pipeline down, only its batch raises, the batch after it is decoded by a fresh pipeline."""
    from mscl_stream.data.dali.decoder import DaliDecodeError, DaliDecoder
    ref = reference(vp9_video)
    enc = np.fromfile(vp9_video, dtype=np.uint8)
    bad = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    dec = DaliDecoder(batch_size=2, frame_size=ref.shape[1:3], num_threads=1, device=CPU, depth=3)
    lists = [np.array([0, 9, 33]), np.array([2, 63])]
    batches = [dec.submit([enc, enc], lists), dec.submit([enc, bad], lists), dec.submit([enc, enc], lists)]
    assert dec.in_flight == 3 and dec.max_in_flight == 3
    for i in (0, 2):
        for frames, idx in zip(batches[i].result(), lists):
            for k, f in enumerate(idx):
                assert np.abs(frames[k].numpy().astype(float) - ref[f]).mean() < 3.0
    with pytest.raises(DaliDecodeError):
        batches[1].result()
    assert dec.rebuilds == 1 and dec.runs == 4          # the third batch ran twice


@pytest.mark.parametrize("mode", MODES)
def test_repeated_sampling_group_is_one_dali_sample(dataset, mode):
    """data.repeat_samples=2: every member still gets its own frames (against the reference), and DALI
    is asked for each group's union of frames once, fewer than the members' frames one by one."""
    recs, refs = dataset
    loader = build_loader(small(decoder="dali", dali_mode=mode, repeat_samples=2), recs, device=CPU)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    for b in batches:
        check_batch_frames(b, refs)
    st = loader.stats
    assert st["dali_samples"] == 16 and st["skipped"] == 0
    sampler = loader.sampler
    members = sum(len(np.unique(sampler.spec(p).all_frames())) for p in range(16))
    unions = sum(len(np.unique(np.concatenate([sampler.spec(q).all_frames() for q in sampler.group(p)])))
                 for p in range(0, 16, 2))
    assert st["dali_frames_requested"] == unions < members


def test_reader_hands_refused_groups_to_the_fallback(dataset):
    """The legacy reader's composition, on CPU: groups the reader refuses (here every third) are decoded
    by fn.decoders.video alongside, the rest by the reader; every sample gets its own frames."""
    from mscl_stream.data.dali.source import DecoderSource, ReaderSource, frame_job
    from mscl_stream.data.dali.decoder import DaliDecoder
    recs, refs = dataset
    loader = build_loader(small(decoder="dali", dali_mode="reader"), recs, device=CPU)
    loader.set_epoch(0)
    n = len(loader) * 2

    def lookup(p):
        return loader._work(p)

    def to_job(key, works):
        return None if key % 3 == 0 else frame_job(key, works)

    def make(jobs):
        return DaliFrameReader(jobs, (48, 64), CPU, readers=2, frames_per_run=4, depth=2)

    src = ReaderSource(make, lookup, chunk=4, limit=n, to_job=to_job)
    dec = DaliDecoder(2, (48, 64), 1, CPU, depth=2)
    src.fallback = DecoderSource(dec, lambda p: lookup(p) if src.refused(p) else None, 2, n)
    try:
        for p in range(n):
            w = lookup(p)
            frames, rows = src.take(w)
            got = frames[torch.from_numpy(rows)].numpy().astype(np.float64)
            ref = refs[w.specs[0].video_idx].astype(np.float64)
            for k, f in enumerate(w.all_frames()):
                assert np.abs(ref[f] - got[k]).mean() < 3.0
        assert src.fallback_samples == len(range(0, n, 3)) and dec.runs >= 2
        assert sum(r.lines for r in src.readers) == sum(len(np.unique(lookup(p).all_frames()))
                                                         for p in range(n) if p % 3)
    finally:
        src.close()
        loader.close()
