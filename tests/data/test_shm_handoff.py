"""Frames returned by PyAV worker processes through shared-memory slots: the same frames as pickling, slots
reused and freed, and pickling whenever no slot can be had."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from mscl_stream.data import shm_handoff
from mscl_stream.data.frame_sink import YuvFrames
from mscl_stream.data.pyav_decode import decode_frames_counted, decode_group_counted

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory (/dev/shm)")

IDX = [3, 9, 9, 20, 41, 60]


@pytest.fixture(scope="module")
def pool():
    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    yield ex
    ex.shutdown()


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


def _same(a, b) -> None:
    if isinstance(a, YuvFrames):
        assert isinstance(b, YuvFrames)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.uv, b.uv)
        assert (a.matrix, a.full_range, a.chroma_left) == (b.matrix, b.full_range, b.chroma_left)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("output", ["rgb", "yuv"])
def test_slot_results_equal_direct_decodes(pool, h264_video, output):
    slots = shm_handoff.Slots(cap=2)
    want, _ = decode_frames_counted(h264_video, IDX, None, output=output)      # in this process, no pool
    got = [shm_handoff.submit(pool, slots, decode_frames_counted, h264_video, IDX, None, output=output).result()
           for _ in range(4)]
    # the first result sizes the slots (it travels pickled), the others come through one reused slot
    assert slots.counts == {"inline": 1, "slot": 3}
    for frames, stats in got:
        _same(frames, want)
        assert stats["decoded"] >= len(set(IDX))
    names = list(slots._all)
    assert len(names) == 1 and all(_exists(n) for n in names)
    slots.close()
    assert not any(_exists(n) for n in names)


def test_group_results_and_growth(pool, h264_video):
    slots = shm_handoff.Slots(cap=1)
    lists = [np.array(IDX[:3]), np.array(IDX[2:])]
    small, _ = shm_handoff.submit(pool, slots, decode_frames_counted, h264_video, [0], None).result()
    assert slots.counts == {"inline": 1, "slot": 0} and small.shape[0] == 1
    for _ in range(3):                       # larger than the first result: the slot is replaced, then used
        parts, stats = shm_handoff.submit(pool, slots, decode_group_counted, h264_video, lists, None,
                                          output="yuv").result()
    want, _ = decode_group_counted(h264_video, lists, None, output="yuv")
    for p, w in zip(parts, want):
        _same(p, w)
    assert slots.counts["slot"] >= 2 and slots.size >= sum(w.nbytes for w in want)
    slots.close()


def test_no_slot_for_a_task_beyond_the_cap(pool, h264_video):
    slots = shm_handoff.Slots(cap=1)
    shm_handoff.submit(pool, slots, decode_frames_counted, h264_video, IDX, None).result()   # sizes the slots
    held = slots.take()                       # the only slot, lent elsewhere
    frames, _ = shm_handoff.submit(pool, slots, decode_frames_counted, h264_video, IDX, None).result()
    _same(frames, decode_frames_counted(h264_video, IDX, None)[0])
    assert slots.counts == {"inline": 2, "slot": 0}
    slots.give(held)
    slots.close()


def test_cancelled_tasks_free_their_slots(h264_video):
    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    try:
        slots = shm_handoff.Slots(cap=4)
        shm_handoff.submit(ex, slots, decode_frames_counted, h264_video, IDX, None).result()   # sizes the slots
        busy = ex.submit(time.sleep, 1.0)     # the worker is busy: most of what follows is still pending
        futs = [shm_handoff.submit(ex, slots, decode_frames_counted, h264_video, IDX, None) for _ in range(4)]
        cancelled = [f.cancel() for f in futs]
        busy.result()
        for f, c in zip(futs, cancelled):     # a task that had already been queued runs and is answered
            if not c:
                _same(f.result(timeout=60)[0], decode_frames_counted(h264_video, IDX, None)[0])
        assert any(cancelled)
        deadline = time.monotonic() + 60      # the answers of queued tasks arrive on the pool's thread
        while len(slots._free) != len(slots._all) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(slots._free) == len(slots._all) >= 1     # every slot lent out came back
        slots.close()
    finally:
        ex.shutdown()


def test_full_dev_shm_falls_back_to_pickling(pool, h264_video, monkeypatch, caplog):
    tried = []

    def no_room(fd, offset, length):
        tried.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm_handoff.os, "posix_fallocate", no_room)
    slots = shm_handoff.Slots(cap=2)
    want = decode_frames_counted(h264_video, IDX, None)[0]
    for _ in range(3):
        _same(shm_handoff.submit(pool, slots, decode_frames_counted, h264_video, IDX, None).result()[0], want)
    assert slots.counts == {"inline": 3, "slot": 0}
    assert "No space left" in slots.disabled and "travel pickled" in caplog.text
    assert len(tried) == 1 and not os.path.exists(tried[0])    # the segment that could not be reserved is gone
