"""PyAV decode path: selected raw frames of one file, resized to cover the working size, centre-cropped.

Used where DALI cannot decode a codec on the current device (H.264/HEVC/MPEG-4 on CPU), as the loader's
fallback for files DALI fails on, by the evaluation code, and as the benchmark baseline.

Frame numbering is display order (frame i = the i-th smallest packet timestamp), as DALI counts. The
packet index of a file (timestamps and keyframes, demuxed without decoding) is cached per process.
To fetch frames, the decoder seeks to the keyframe at or before the first wanted frame and decodes
forward; it seeks again only where the next wanted frame's keyframe lies ahead of the decoder.

The decode cost of a sample is the frames the decoder produces to reach the wanted ones (from the
keyframe before each jump on), not the frames wanted. Frames that are neither wanted nor referenced by
another frame (non-reference B-frames in H.264/HEVC/MPEG-4) are not decoded at all (FFmpeg's
``skip_frame``, set per packet), which leaves every wanted pixel as a full decode gives it.
``decode_frames(..., stats=d)`` counts frames wanted, decoded and skipped,
and :func:`decode_frames_counted` also returns the decoding thread's CPU time (worker pools use it;
docs/data.md explains the amplification). :func:`sweep_frames` gives the same count from the packet
index alone, for decoders that cannot report it.

Pixels: :mod:`mscl_stream.data.frame_sink` converts the wanted frames (DALI's CPU colours and
cover-crop geometry). With ``output="yuv"`` the conversion and resize are left to
:mod:`mscl_stream.data.yuv` on the training device: the wanted frames' planes travel instead
(:class:`~mscl_stream.data.frame_sink.YuvFrames`; docs/data.md, "Where colour conversion happens").
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Sequence

import av
import numpy as np

from mscl_stream.data.frame_sink import LEFT_SITED_CODECS, FrameSink, NotYuv, YuvFrames

_INDEX_CACHE_SIZE = 4096


class DecodeError(RuntimeError):
    """A file could not deliver the requested frames (unreadable, damaged, or too short)."""


@dataclass(frozen=True)
class FrameIndex:
    """Packet timestamps of a video stream: frame i has timestamp ``pts[i]`` (display order)."""

    pts: np.ndarray        # (N,) int64, sorted
    key_pts: np.ndarray    # (K,) int64, sorted timestamps of keyframes

    def __len__(self) -> int:
        return len(self.pts)

    def keyframe_before(self, pts: int, back: int = 0) -> int | None:
        """Timestamp of the keyframe at or before ``pts`` (``back`` more keyframes earlier); None if none."""
        k = bisect.bisect_right(self.key_pts, pts) - 1 - back
        return int(self.key_pts[k]) if k >= 0 else None


_index_cache: OrderedDict[tuple, FrameIndex] = OrderedDict()
_index_lock = Lock()


def frame_index(path: str | os.PathLike) -> FrameIndex:
    """Demux (no decode) the first video stream of ``path`` into a :class:`FrameIndex` (cached by path,
    size and modification time, so a file rewritten after indexing is re-read).

    Raises:
        DecodeError: the file cannot be opened or has no video packets with timestamps.
    """
    try:
        st_ = os.stat(path)
    except OSError as e:
        raise DecodeError(f"{path}: {e.strerror or e}") from None
    key = (str(path), st_.st_size, st_.st_mtime_ns)
    with _index_lock:
        if key in _index_cache:
            _index_cache.move_to_end(key)
            return _index_cache[key]
    pts, keys = [], []
    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            for pkt in c.demux(st):
                if pkt.size == 0:          # the demuxer's end-of-stream flush packet
                    continue
                if pkt.pts is None:
                    raise DecodeError(f"{path}: packets without timestamps (cannot seek by frame number)")
                pts.append(pkt.pts)
                if pkt.is_keyframe:
                    keys.append(pkt.pts)
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise DecodeError(f"{path}: cannot demux ({type(e).__name__}: {e})") from None
    if not pts or not keys:
        raise DecodeError(f"{path}: no decodable video packets")
    index = FrameIndex(np.unique(np.asarray(pts, np.int64)), np.unique(np.asarray(keys, np.int64)))
    with _index_lock:
        _index_cache[key] = index
        while len(_index_cache) > _INDEX_CACHE_SIZE:
            _index_cache.popitem(last=False)
    return index


class _Sweep:
    """One forward decode from a seek point, packet by packet.

    With ``skip`` (the display timestamps of the wanted frames), every packet whose frame is not wanted
    goes to the decoder with ``skip_frame = NONREF``: a frame that no other frame references is then not
    decoded at all, while reference frames still are, so the wanted frames come out pixel for pixel as
    in a full decode. Which frames can be left out is the encoder's choice (B-frames that are not
    references); on codecs or files without such frames nothing changes.
    """

    def __init__(self, c: av.container.InputContainer, st: av.video.stream.VideoStream,
                 skip: frozenset[int] | None, count: dict) -> None:
        self.c, self.st, self.skip, self.count = c, st, skip, count
        self.fed_skippable: list[int] = []     # timestamps sent as skippable, in decode order
        self.produced: set[int] = set()
        self.first: int | None = None           # timestamp of the first frame the decoder gave
        self.last: int | None = None            # timestamp of the last frame the decoder gave
        self.frames = self._frames()

    def _frames(self):
        cc = self.st.codec_context
        for pkt in self.c.demux(self.st):
            if self.skip is not None:
                skippable = pkt.size > 0 and pkt.pts is not None and pkt.pts not in self.skip
                cc.skip_frame = "NONREF" if skippable else "DEFAULT"
                if skippable:
                    self.fed_skippable.append(int(pkt.pts))
            for frame in cc.decode(pkt):
                self.count["decoded"] += 1
                if frame.pts is not None:
                    self.produced.add(int(frame.pts))
                    self.first = int(frame.pts) if self.first is None else self.first
                yield frame

    def close(self) -> None:
        """Count the frames sent as skippable that never came out although frames on both sides did.
        Frames still inside the decoder's reordering delay, and leading frames of an open GOP that a
        decoder drops after a seek anyway, are counted neither way."""
        if self.last is not None and self.first is not None:
            self.count["skipped"] += sum(1 for p in self.fed_skippable
                                         if self.first <= p <= self.last and p not in self.produced)
        self.fed_skippable = []


def _decode_sorted(c: av.container.InputContainer, st: av.video.stream.VideoStream, index: FrameIndex,
                   want: np.ndarray, sink: FrameSink, path: str, count: dict, skip: bool) -> None:
    """Decode the frames ``want`` (sorted, unique display indices) in one forward sweep with seeks,
    handing the k-th to ``sink(k, frame)``; adds the frames the decoder produced to ``count["decoded"]``,
    the frames it was allowed to leave out and did to ``count["skipped"]`` and the seeks to
    ``count["seeks"]``."""
    wanted_pts = frozenset(int(index.pts[i]) for i in want) if skip else None
    sweep: _Sweep | None = None
    try:
        for k, i in enumerate(want):
            p = int(index.pts[i])
            for back in range(3):         # an open GOP can hide frames behind a keyframe: try earlier ones
                key = index.keyframe_before(p, back)
                if sweep is not None and sweep.last is not None and sweep.last < p and (key is None or key <= sweep.last):
                    pass                  # keep decoding forward: the keyframe is behind us
                else:
                    if sweep is not None:
                        sweep.close()
                    c.seek(int(key if key is not None else index.key_pts[0]), stream=st, backward=True,
                           any_frame=False)
                    sweep = _Sweep(c, st, wanted_pts, count)
                    count["seeks"] += 1
                frame = None
                for frame in sweep.frames:
                    if frame.pts is None:
                        raise DecodeError(f"{path}: decoded frame without a timestamp")
                    sweep.last = frame.pts
                    if sweep.last >= p:
                        break
                if frame is None or sweep.last is None or sweep.last < p:
                    raise DecodeError(f"{path}: stream ended before frame {i}")
                if sweep.last == p:
                    sink(k, frame)
                    break
                sweep.close()
                sweep = None              # overshot right after a seek: start from an earlier keyframe
            else:
                raise DecodeError(f"{path}: frame {i} (pts {p}) is never produced by the decoder")
    finally:
        if sweep is not None:
            sweep.close()


def sweep_frames(index: FrameIndex, want: np.ndarray) -> tuple[int, int]:
    """Frames a forward decoder produces for the sorted unique display indices ``want``, and its seeks,
    when it seeks to the keyframe at or before a wanted frame only where that keyframe lies ahead of
    its position (the sweep :func:`decode_frames` makes; a model, in display order, of what any
    keyframe-seeking decoder pays; B-frame reordering is not modelled).

    Returns:
        (frames decoded, seeks).
    """
    pos = {int(p): i for i, p in enumerate(index.pts)}
    decoded, seeks, last = 0, 0, -1
    for i in np.asarray(want, np.int64).tolist():
        key = index.keyframe_before(int(index.pts[i]))
        k = pos[key] if key is not None else 0
        if last < 0 or last >= i or k > last:
            decoded, seeks = decoded + i - k + 1, seeks + 1
        else:
            decoded += i - last
        last = i
    return decoded, seeks


def decode_frames(path: str | os.PathLike, indices: Sequence[int] | np.ndarray,
                  size: tuple[int, int] | None, threads: int = 0, stats: dict | None = None,
                  skip_unreferenced: bool = True, output: str = "rgb") -> np.ndarray | YuvFrames:
    """Decode raw frames of one video with PyAV.

    Args:
        path: the video file.
        indices: raw frame indices (display order), any order, duplicates allowed.
        size: (H, W) working size: resize to cover, centre crop (as the DALI path); None keeps the
            native size.
        threads: FFmpeg decoder threads (0: FFmpeg's choice; the loader's worker pool passes 1).
        stats: if given, gets "requested" (len(indices)), "wanted" (unique frames), "decoded" (frames the
            decoder produced, wanted or not), "skipped" (frames it left undecoded because nothing
            references them) and "seeks" added to it.
        skip_unreferenced: leave frames that are neither wanted nor referenced undecoded (the same
            pixels; False decodes every frame of the sweep, the cost a plain forward decoder pays).
        output: "rgb" converts here; "yuv" hands out the decoder's planes at their native size (``size``
            is then applied by :func:`mscl_stream.data.yuv.yuv420_to_rgb_cover_crop`, on the device),
            for 8-bit 4:2:0 sources tagged BT.601/BT.709 or untagged; other sources (4:2:2, 4:4:4,
            10-bit, BT.2020, ...) still come back as RGB at ``size``.

    Returns:
        (len(indices), H, W, 3) uint8 RGB, frame k = raw frame ``indices[k]``; with ``output="yuv"``,
        a :class:`YuvFrames` in the same order where the source allows it.

    Raises:
        DecodeError: unreadable or damaged file, or an index outside the file (nothing is padded).
    """
    if output not in ("rgb", "yuv"):
        raise ValueError(f"output={output!r}: 'rgb' or 'yuv'")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        h, w = size if size is not None else (0, 0)
        return np.empty((0, h, w, 3), np.uint8)
    index = frame_index(path)
    if idx.min() < 0 or idx.max() >= len(index):
        raise DecodeError(f"{path}: frame {int(idx.max()) if idx.max() >= len(index) else int(idx.min())} "
                          f"requested, the file has frames 0..{len(index) - 1}")
    want, inv = np.unique(idx, return_inverse=True)
    order = np.argsort(inv, kind="stable")            # output rows of each wanted frame, grouped
    rows = np.split(order, np.cumsum(np.bincount(inv, minlength=want.size))[:-1])
    count = {"decoded": 0, "skipped": 0, "seeks": 0}
    sink = FrameSink(rows, size, output)
    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO" if threads != 1 else "NONE"
            if threads > 0:
                st.codec_context.thread_count = threads
            sink.chroma_left = st.codec_context.name in LEFT_SITED_CODECS
            _decode_sorted(c, st, index, want, sink, str(path), count, skip_unreferenced)
    except NotYuv:                                    # frames of several kinds in one sample: all as RGB
        return decode_frames(path, idx, size, threads, stats, skip_unreferenced, output="rgb")
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise DecodeError(f"{path}: decode failed ({type(e).__name__}: {e})") from None
    if stats is not None:
        for k, v in (("requested", idx.size), ("wanted", want.size), ("decoded", count["decoded"]),
                     ("skipped", count["skipped"]), ("seeks", count["seeks"])):
            stats[k] = stats.get(k, 0) + int(v)
    return sink.out


def decode_frames_counted(path: str | os.PathLike, indices: Sequence[int] | np.ndarray,
                          size: tuple[int, int] | None, threads: int = 1,
                          output: str = "rgb") -> tuple[np.ndarray | YuvFrames, dict]:
    """:func:`decode_frames` plus its cost: (frames, stats) with the counts of ``decode_frames(stats=)``
    and "cpu_seconds": CPU time of this process in a worker process (one task at a time there), else of
    the calling thread (other threads of the process do other work). Picklable, for worker pools."""
    in_worker = multiprocessing.parent_process() is not None
    clock = time.process_time if in_worker else time.thread_time
    t0 = clock()
    stats: dict = {}
    frames = decode_frames(path, indices, size, threads=threads, stats=stats, output=output)
    stats["cpu_seconds"] = clock() - t0
    return frames, stats


def decode_group_counted(path: str | os.PathLike, index_lists: Sequence[np.ndarray], size: tuple[int, int] | None,
                         threads: int = 1, output: str = "rgb") -> tuple[list[np.ndarray | YuvFrames], dict]:
    """Several samples of one video (repeated sampling) in one forward sweep over the union of their
    frames: ([(len(index_lists[j]), H, W, 3) uint8, or :class:`YuvFrames`, per sample], the sweep's stats
    as in :func:`decode_frames_counted`, counted once for the group). Frames shared by samples decode once."""
    lens = [len(x) for x in index_lists]
    frames, stats = decode_frames_counted(path, np.concatenate([np.asarray(x, np.int64) for x in index_lists]),
                                          size, threads=threads, output=output)
    cuts = np.cumsum(lens)[:-1]
    return (frames.split(cuts) if isinstance(frames, YuvFrames) else np.split(frames, cuts)), stats


def ignore_sigint() -> None:
    """Initializer of PyAV worker processes: a terminal's Ctrl-C reaches the whole process group, and
    the training process alone decides what it means (checkpoint, then stop); a worker that died of it
    would only make the pool restart."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
