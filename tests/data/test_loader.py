"""ClipLoader: DALI (VP9) and PyAV (H.264) frames against an independent av decode, skip-and-refill of a
file damaged after indexing, exact resume, ClipBatch shapes."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import Interpolation

from mscl_stream.config import Config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.loader import build_loader
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.dali.decoder import DaliDecoder
from mscl_stream.data.sampler import ClipSampler
from mscl_stream.errors import UserError

CPU = torch.device("cpu")
# reference conversion with bilinear chroma, as DALI does (FFmpeg's default repeats chroma samples,
# ~3/255 off on this colourful texture)
ACCURATE = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
            | Interpolation.ACCURATE_RND)


def reference(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.reformat(format="rgb24", interpolation=ACCURATE).to_ndarray()
                         for f in c.decode(video=0)])


def record(path, n, h, w, codec, label=0) -> VideoRecord:
    return VideoRecord(path=str(path), label=label, label_name=f"c{label}", split="train", num_frames=n,
                       fps=25.0, width=w, height=h, codec=codec, duration=n / 25)


def config(**data) -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, **data)
    return cfg


def small(**kw) -> Config:
    """Short clips for 40-frame 48x64 videos."""
    base = dict(frames_per_clip=4, frame_stride=6, flow_gap=3, max_shift=8, batch_size=2, frame_size=(48, 64),
                decode_workers=2, prefetch=1)
    return config(**{**base, **kw})


def check_batch_frames(batch: ClipBatch, refs: dict[int, np.ndarray]) -> None:
    """Every frame of the batch is the reference frame of its video at its raw index (< 3/255), and the
    closest reference frame of that video."""
    pairs = [(batch.rgb_a, batch.frame_idx_a), (batch.rgb_b, batch.frame_idx_b),
             (batch.partner_rgb_a, batch.partner_idx_a), (batch.partner_rgb_b, batch.partner_idx_b)]
    for b, v in enumerate(batch.video_idx.tolist()):
        ref = refs[v].astype(np.float64)
        for frames, idx in pairs:
            for k, i in enumerate(idx[b].tolist()):
                got = frames[b, k].permute(1, 2, 0).numpy().astype(np.float64)
                diffs = np.abs(ref - got).mean(axis=(1, 2, 3))
                assert diffs[i] < 3.0 and int(np.argmin(diffs)) == i, (v, i, diffs[i], int(np.argmin(diffs)))


def test_dali_vp9_frames_equal_reference(vp9_video):
    ref = reference(vp9_video)
    n, h, w = ref.shape[:3]
    cfg = config(batch_size=2, frame_size=(h, w), decoder="dali", decode_workers=2)
    recs = [record(vp9_video, n, h, w, "vp9", label=3)] * 4        # 64 frames: windows wrap around
    loader = build_loader(cfg, recs, device=CPU)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    for b in batches:
        check_batch_frames(b, {i: ref for i in range(4)})
        assert b.labels.tolist() == [3, 3]
    assert loader.stats["dali_samples"] == 4 and loader.stats["pyav_samples"] == 0


def test_dali_decoder_sorted_unique_lists(vp9_video):
    ref = reference(vp9_video)
    dec = DaliDecoder(batch_size=3, frame_size=ref.shape[1:3], num_threads=1, device=CPU)
    enc = np.fromfile(vp9_video, dtype=np.uint8)
    lists = [np.array([0, 1, 17, 40, 63]), np.array([5]), np.array([20, 21, 22, 50])]
    for frames, idx in zip(dec.decode([enc] * 3, lists), lists):
        assert frames.shape == (len(idx),) + ref.shape[1:] and frames.dtype == torch.uint8
        for k, i in enumerate(idx):
            assert np.abs(frames[k].numpy().astype(float) - ref[i]).mean() < 3.0


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_pyav_path_for_h264_on_cpu(h264_video, caplog, workers):
    ref = reference(h264_video)
    n, h, w = ref.shape[:3]
    recs = [record(h264_video, n, h, w, "h264")] * 2
    with caplog.at_level(logging.INFO, logger="mscl_stream.data.loader"):
        loader = build_loader(config(batch_size=2, frame_size=(h, w), pyav_workers=workers), recs, device=CPU)
        loader.set_epoch(0)
        (batch,) = list(loader)
    check_batch_frames(batch, {0: ref, 1: ref})
    assert loader.stats["pyav_samples"] == 2 and loader.stats["dali_samples"] == 0
    assert "h264" in caplog.text                  # the routing is logged once per codec
    assert ("worker processes" in caplog.text) == (workers == "processes")
    loader.close()
    with pytest.raises(UserError, match="h264"):
        build_loader(config(decoder="dali"), recs, device=CPU)


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_pyav_yuv_output_equals_reference(h264_video, workers):
    # the planes travel to the device (here the CPU) and are converted there
    ref = reference(h264_video)
    n, h, w = ref.shape[:3]
    recs = [record(h264_video, n, h, w, "h264")] * 2
    loader = build_loader(config(batch_size=2, frame_size=(h, w), pyav_workers=workers, pyav_output="yuv"), recs,
                          device=CPU)
    assert loader._pyav.output == "yuv"
    loader.set_epoch(0)
    (batch,) = list(loader)
    check_batch_frames(batch, {0: ref, 1: ref})
    assert loader.stats["pyav_samples"] == 2
    loader.close()


@pytest.mark.parametrize("handoff", ["shm", "pickle"])
def test_pyav_worker_handoffs_equal_reference(h264_video, handoff):
    # frames back from the worker processes through shared-memory slots or pickled: the same pixels
    ref = reference(h264_video)
    n, h, w = ref.shape[:3]
    recs = [record(h264_video, n, h, w, "h264")] * 2
    loader = build_loader(config(batch_size=2, frame_size=(h, w), pyav_workers="processes", pyav_output="yuv",
                                 pyav_handoff=handoff), recs, device=CPU)
    for epoch in range(2):                 # the first answers size the slots, the second epoch uses them
        loader.set_epoch(epoch)
        (batch,) = list(loader)
        check_batch_frames(batch, {0: ref, 1: ref})
    slots = loader._pyav._slots
    assert (slots is not None) == (handoff == "shm")
    if slots is not None:
        assert slots.counts["slot"] >= 1 and slots.counts["slot"] + slots.counts["inline"] == 4
    loader.close()


@pytest.mark.parametrize("fixture,codec", [("h264_video", "h264"), ("vp9_video", "vp9")])
def test_pyav_outputs_agree_after_resize(request, fixture, codec):
    # auto is rgb on CPU; yuv (resized and converted by torch) gives the same frames within the tolerance
    path = request.getfixturevalue(fixture)
    ref = reference(path)
    recs = [record(path, *ref.shape[:3], codec)] * 2
    out = {}
    for output in ("auto", "yuv"):
        loader = build_loader(config(batch_size=2, frame_size=(96, 96), decoder="pyav", pyav_output=output), recs,
                              device=CPU)
        assert loader._pyav.output == ("rgb" if output == "auto" else "yuv")
        loader.set_epoch(1)
        out[output] = next(iter(loader))
        loader.close()
    a, b = out["auto"], out["yuv"]
    assert torch.equal(a.frame_idx_a, b.frame_idx_a) and torch.equal(a.partner_idx_b, b.partner_idx_b)
    for name in ("rgb_a", "rgb_b", "partner_rgb_a", "partner_rgb_b"):
        x, y = getattr(a, name).double(), getattr(b, name).double()
        assert x.shape == y.shape and x.shape[-2:] == (96, 96)
        assert (x - y).abs().mean(dim=(2, 3, 4)).max() < 0.2       # every frame: the same pixels up to rounding


def test_dali_and_pyav_paths_agree_after_resize(vp9_video):
    ref = reference(vp9_video)
    recs = [record(vp9_video, *ref.shape[:3], "vp9")] * 2
    out = {}
    for decoder in ("dali", "pyav"):
        loader = build_loader(config(batch_size=2, frame_size=(96, 96), decoder=decoder), recs, device=CPU)
        loader.set_epoch(1)
        out[decoder] = next(iter(loader))
    a, b = out["dali"], out["pyav"]
    assert torch.equal(a.frame_idx_a, b.frame_idx_a) and torch.equal(a.partner_idx_b, b.partner_idx_b)
    for name in ("rgb_a", "rgb_b", "partner_rgb_a", "partner_rgb_b"):
        x, y = getattr(a, name).double(), getattr(b, name).double()
        assert x.shape[-2:] == (96, 96) and (x - y).abs().mean() < 1.5


@pytest.fixture
def dataset(make_video):
    """Eight 40-frame 48x64 VP9 videos with different textures, and their reference decodes."""
    paths = [make_video(n=40, h=48, w=64, codec="vp9", seed=10 + i, gop=8, velocity=(1.0 + i % 3, 1.0))
             for i in range(8)]
    recs = [record(p, 40, 48, 64, "vp9", label=i % 2) for i, p in enumerate(paths)]
    return recs, {i: reference(p) for i, p in enumerate(paths)}


def test_clipbatch_shapes_and_dtypes(dataset):
    recs, _ = dataset
    loader = build_loader(small(), recs[:5], device=CPU)
    assert len(loader) == 2                       # 5 samples, batch 2: the partial batch is dropped
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b.rgb_a.shape == b.rgb_b.shape == (2, 4, 3, 48, 64)
    assert b.partner_rgb_a.shape == b.partner_rgb_b.shape == (2, 2, 3, 48, 64)
    for t in (b.rgb_a, b.rgb_b, b.partner_rgb_a, b.partner_rgb_b):
        assert t.dtype == torch.uint8 and t.is_contiguous() and t.device == CPU
    assert b.flow_steps.tolist() == [0, 2]
    for t in (b.frame_idx_a, b.frame_idx_b, b.partner_idx_a, b.partner_idx_b, b.labels, b.video_idx):
        assert t.dtype == torch.long
    assert b.frame_idx_a.shape == (2, 4) and b.partner_idx_a.shape == (2, 2)
    assert b.labels.tolist() == [recs[v].label for v in b.video_idx.tolist()]
    assert loader.stats["batches"] == 2 and loader.stats["samples"] == 4


def test_killed_pyav_worker_process_costs_no_data(dataset, caplog):
    recs, refs = dataset
    loader = build_loader(small(decoder="pyav", pyav_workers="processes"), recs, device=CPU)
    loader.set_epoch(0)
    it = iter(loader)
    batches = [next(it)]
    # prefetch 1: batch 2 waits in the queue, batch 3 is decoded; batch 4 meets the dead pool
    pids = loader.worker_pids()
    assert 1 <= len(pids) <= 2                           # up to data.decode_workers (started on demand)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING):
        batches += list(it)
    assert len(batches) == len(loader) == 4 and loader.stats["skipped"] == 0
    for b in batches:
        check_batch_frames(b, refs)
    assert "worker process died" in caplog.text
    loader.close()


def _ignores_sigint(pid: int) -> bool:
    """Whether process ``pid`` has SIGINT set to ignore (its SigIgn mask in /proc)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def test_pyav_worker_processes_ignore_ctrl_c(dataset, caplog):
    # a terminal's Ctrl-C reaches every process of the group; the workers must survive it (the trainer
    # alone decides what it means), so no batch pays for a pool restart
    recs, refs = dataset
    loader = build_loader(small(decoder="pyav", pyav_workers="processes"), recs, device=CPU)
    loader.set_epoch(0)
    it = iter(loader)
    batches = [next(it)]
    procs = list(loader._pyav._procs._processes.values())
    # Workers start on demand, and until their initializer has run a Ctrl-C still kills them (the pool
    # then restarts and the sample is decoded again: test_killed_pyav_worker_process_costs_no_data).
    # Signal them once they are up, as a Ctrl-C during training finds them.
    deadline = time.monotonic() + 30
    while not all(_ignores_sigint(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in procs:
        os.kill(proc.pid, signal.SIGINT)
    with caplog.at_level(logging.WARNING):
        batches += list(it)
    assert all(p.is_alive() for p in procs) and "worker process died" not in caplog.text
    assert len(batches) == len(loader) and loader.stats["skipped"] == 0
    for b in batches:
        check_batch_frames(b, refs)
    loader.close()


@pytest.mark.parametrize("decoder,workers,mode", [("dali", "auto", "decoder"), ("dali", "auto", "reader"),
                                                  ("pyav", "threads", "decoder"), ("pyav", "processes", "decoder")])
def test_file_damaged_after_indexing_is_skipped_and_refilled(dataset, decoder, workers, mode, caplog):
    recs, refs = dataset
    cfg = small(decoder=decoder, pyav_workers=workers, dali_mode=mode)
    order = ClipSampler(recs, cfg.data, seed=cfg.data.seed)
    order.set_epoch(0)
    planned = [s.video_idx for s in order]
    victim = planned[6]                           # a sample of the last batch: not prefetched yet by PyAV

    def damage():
        size = len(open(recs[victim].path, "rb").read())
        with open(recs[victim].path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())

    loader = build_loader(cfg, recs, device=CPU)
    loader.set_epoch(0)
    got = []
    if decoder == "dali":                         # DALI runs batches ahead: damage before they are read
        damage()
    with caplog.at_level(logging.WARNING):
        for k, batch in enumerate(loader):
            if k == 0 and decoder == "pyav":      # damage the file mid-epoch
                damage()
            check_batch_frames(batch, refs)
            got += batch.video_idx.tolist()
    st = loader.stats
    assert len(got) == 8 and st["batches"] == len(loader) == 4
    assert victim not in got
    assert got == planned[:6] + [planned[7], planned[0]]   # refilled with the epoch's next (cycled) sample
    assert st["skipped"] == 1 and st["skipped_files"][0]["path"] == recs[victim].path
    assert recs[victim].path in caplog.text
    # the next epoch skips the file without trying again and keeps decoding the others
    loader.set_epoch(1)
    got1 = [v for b in loader for v in b.video_idx.tolist()]
    assert len(got1) == 8 and victim not in got1 and loader.stats["skipped"] == 2
    if decoder == "dali":
        assert st["dali_rebuilds"] >= 1 and loader.stats["dali_samples"] >= 14


@pytest.mark.parametrize("mode", ["decoder", "reader"])
def test_resume_yields_the_same_remaining_batches(dataset, mode):
    recs, _ = dataset
    cfg = small(clips_per_video=2, dali_mode=mode)
    full = build_loader(cfg, recs, device=CPU)
    full.set_epoch(2)
    expected = list(full)
    assert len(expected) == 8
    first = build_loader(cfg, recs, device=CPU)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    resumed = build_loader(cfg, recs, device=CPU)
    resumed.load_state_dict(state)
    rest = list(resumed)                          # the trainer iterates a resumed loader directly
    assert len(head) + len(rest) == len(expected)
    for a, b in zip(head + rest, expected):
        assert torch.equal(a.video_idx, b.video_idx) and torch.equal(a.frame_idx_b, b.frame_idx_b)
        assert torch.equal(a.rgb_a, b.rgb_a) and torch.equal(a.partner_rgb_b, b.partner_rgb_b)
    assert list(resumed) == []                    # the epoch is over until set_epoch
    resumed.set_epoch(3)
    full.set_epoch(3)
    assert [b.video_idx.tolist() for b in resumed] == [b.video_idx.tolist() for b in full]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("name,codec", [("vp9_video", "vp9"), ("h264_video", "h264")])
def test_dali_nvdec_frames_equal_reference(request, name, codec):
    path = request.getfixturevalue(name)
    ref = reference(path)
    n, h, w = ref.shape[:3]
    recs = [record(path, n, h, w, codec)] * 4
    loader = build_loader(config(batch_size=2, frame_size=(h, w), decoder="dali"), recs, device=torch.device("cuda"))
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2 and loader.stats["dali_samples"] == 4
    for b in batches:
        assert b.rgb_a.is_cuda and b.frame_idx_a.is_cuda
        check_batch_frames(b.to("cpu"), {i: ref for i in range(len(recs))})   # 4 records, one file


@needs_cuda
def test_nvdec_and_pyav_agree_after_resize(h264_video):
    ref = reference(h264_video)
    recs = [record(h264_video, *ref.shape[:3], "h264")] * 2
    out = {}
    for decoder in ("dali", "pyav"):
        loader = build_loader(config(batch_size=2, frame_size=(96, 96), decoder=decoder), recs,
                              device=torch.device("cuda"))
        loader.set_epoch(1)
        out[decoder] = next(iter(loader)).to("cpu")
    for name in ("rgb_a", "rgb_b", "partner_rgb_a", "partner_rgb_b"):
        x, y = getattr(out["dali"], name).double(), getattr(out["pyav"], name).double()
        # different colour conversions (DALI: BT.601 limited range; PyAV's rgb24 differs by ~1.3/255)
        # and resize kernels: the bound for decoder agreement, mean < 3 of 255
        assert (x - y).abs().mean() < 3


@needs_cuda
def test_pyav_on_cuda_hands_over_yuv(h264_video):
    ref = reference(h264_video)
    n, h, w = ref.shape[:3]
    recs = [record(h264_video, n, h, w, "h264")] * 2
    loader = build_loader(config(batch_size=2, frame_size=(h, w), decoder="pyav"), recs, device=torch.device("cuda"))
    assert loader._pyav.output == "yuv"                  # data.pyav_output=auto on CUDA
    loader.set_epoch(0)
    (batch,) = list(loader)
    assert batch.rgb_a.is_cuda
    check_batch_frames(batch.to("cpu"), {0: ref, 1: ref})
    loader.close()


@needs_cuda
def test_damaged_file_skipped_with_nvdec(dataset):
    recs, refs = dataset
    with open(recs[3].path, "r+b") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    loader = build_loader(small(decoder="dali"), recs, device=torch.device("cuda"))
    loader.set_epoch(0)
    got = []
    for batch in loader:
        check_batch_frames(batch.to("cpu"), refs)
        got += batch.video_idx.tolist()
    assert len(got) == 8 and 3 not in got and loader.stats["skipped"] == 1


def test_dropping_an_abandoned_iteration_leaves_the_new_one_running(dataset):
    # the abandoned generator's cleanup (here: garbage collection) must not stop the iteration that took over
    recs, _ = dataset
    loader = build_loader(small(), recs, device=CPU)
    loader.set_epoch(0)
    old = iter(loader)
    next(old)
    new = iter(loader)
    second = next(new)
    del old
    rest = list(new)
    assert len(rest) == len(loader) - 2 and second.video_idx.shape == (2,)


def test_new_iteration_ends_an_abandoned_one(dataset):
    recs, _ = dataset
    loader = build_loader(small(), recs, device=CPU)
    loader.set_epoch(0)
    old = iter(loader)
    first = next(old)
    time.sleep(0.5)                               # the producer queues the next batch: it must not leak out
    rest = list(loader)                           # takes over from the batch after `first`
    assert len(rest) == len(loader) - 1
    assert list(old) == []                        # the abandoned iterator ends instead of hanging
    assert first.video_idx.shape == (2,)
