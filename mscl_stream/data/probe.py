"""Probe one video file with PyAV: exact frame count, fps, codec, size, and proof that it decodes.

Frame count: the number of non-empty video packets up to the first corrupt one (demuxing only, no
decode). Each packet of a video stream holds one displayed frame for the codecs seen here (VP9/VP8 in
WebM pack hidden alt-ref frames into superframes; H.264/HEVC/MPEG-4 carry one picture per packet, with
or without B-frames); tests check the count against a full PyAV decode (VP9, VP9/VP8 with alt-ref,
H.264 with B-frames, HEVC, MPEG-4, MJPEG) and against DALI's CPU decoder (VP9, truncated VP9, MJPEG).
Decodability: the first frame is decoded, and so are the last two groups of pictures (the earlier one
as warm-up for open GOPs), because a truncated or damaged tail would otherwise only surface at training
time, where a DALI decode error invalidates the whole pipeline. Frames from the first one that fails
(in display order) on are cut from ``num_frames`` (noted in the report). Damage in the middle of a
long file is not looked for: that would cost a full decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import av

# FFmpeg codec names DALI 2.4 decodes: its CPU decoder is built without H.264/HEVC/MPEG-4.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})

_TAIL_BYTES_CAP = 256 << 20   # a last GOP larger than this is not re-decoded (noted as unverified)


@dataclass
class Probe:
    """What probing one file found. ``reason`` is None for a usable file, else an exclusion reason."""

    path: str
    reason: str | None = None      # empty | unreadable | no_video_stream | unsupported_codec | no_decodable_frame
    detail: str = ""
    num_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    codec: str = ""
    duration: float = 0.0
    decoders: list[str] = field(default_factory=list)   # pyav / dali_cpu / dali_gpu
    notes: list[str] = field(default_factory=list)      # non-fatal findings (truncation, unverified tail)
    mds_starts: list[int] | None = None                 # set by build_manifest with an MDS scorer


def pyav_can_decode(codec: str) -> bool:
    """True when PyAV's FFmpeg has a decoder for this codec name."""
    try:
        av.codec.Codec(codec, "r")
        return True
    except (ValueError, av.FFmpegError):
        return False


def decode_paths(codec: str, cuda: bool) -> list[str]:
    """Decoders that can read ``codec``: "pyav", "dali_cpu", "dali_gpu" (the latter only with CUDA)."""
    paths = ["pyav"] if pyav_can_decode(codec) else []
    if codec in DALI_CPU_CODECS:
        paths.append("dali_cpu")
    if cuda and codec in DALI_GPU_CODECS:
        paths.append("dali_gpu")
    return paths


def _rate(stream: av.video.stream.VideoStream) -> float:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r is not None and r > 0:
            return float(r)
    return 0.0


def _check_tail(ctx: av.CodecContext, gops: list[list[av.Packet]], pts: list, first_index: int,
                last_key: int, notes: list[str]) -> int:
    """Decode the last two GOPs and return how many leading frames (display order) are decodable.

    ``gops`` holds the packets from decode index ``first_index`` on; the last GOP starts at ``last_key``.
    The GOP before the last one is decoded as warm-up, so open-GOP pictures at the start of the last
    GOP (which reference it) decode too. Usable frames end at the first frame, in display order, that
    is suspect: a packet from the one that raised a decode error on, or a frame of the last GOP that
    never came out (timestamps needed for the latter; without them only an error trims).
    """
    ctx.flush_buffers()
    got, err, err_at = [], "", None
    packets = [q for g in gops for q in g]
    try:
        for i, pkt in enumerate(packets):
            err_at = first_index + i
            got += [f.pts for f in ctx.decode(pkt)]
        err_at = None
        got += [f.pts for f in ctx.decode(None)]
    except av.FFmpegError as e:
        err = f" ({type(e).__name__}: {e})"
    count = len(pts)
    if None in pts or None in got:                      # no timestamps: trust the decode order
        if err_at is None and not err:
            return count
        usable = err_at if err_at is not None else count
    else:
        display = {t: r for r, t in enumerate(sorted(pts))}   # timestamp -> display index
        suspect = set(pts[last_key:]) - set(got)
        if err_at is not None:
            suspect |= set(pts[err_at:])
        if not suspect:
            return count
        usable = min(display[t] for t in suspect)
    notes.append(f"frames from {usable} on do not decode{err}: num_frames {count} -> {usable}")
    return usable


def _header_frames(container: av.container.InputContainer, st: av.video.stream.VideoStream, fps: float) -> int:
    """Frames the container header announces: the stream's frame count, else duration x fps (0 = unknown)."""
    if st.frames:
        return int(st.frames)
    if fps <= 0:
        return 0
    if st.duration and st.time_base:
        seconds = float(st.duration * st.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return 0
    return int(round(seconds * fps))


def probe_video(path: str | os.PathLike, cuda: bool = False) -> Probe:
    """Probe one file (never raises for bad media: the problem is returned as ``Probe.reason``).

    Args:
        path: video file.
        cuda: whether DALI GPU decoding is available (widens the set of usable codecs).

    Returns:
        A :class:`Probe`.
    """
    p = Probe(path=str(path))
    container = _open(path, p)
    if container is None:
        return p
    with container:
        st = _video_stream(container, p, cuda)
        if st is None:
            return p
        count = _usable_frames(container, st, p)
        if p.reason is not None:
            return p
        _note_header_mismatch(container, st, p, count)
    p.num_frames = count
    p.duration = count / p.fps if p.fps > 0 else 0.0
    if p.fps <= 0:
        p.notes.append("no frame rate in the stream: fps 0, duration unknown")
    return p


def _open(path: str | os.PathLike, p: Probe) -> av.container.InputContainer | None:
    """The opened container, or None with ``p.reason`` set (empty or unreadable file)."""
    try:
        if os.path.getsize(path) == 0:
            p.reason, p.detail = "empty", "zero bytes"
            return None
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        p.reason, p.detail = "unreadable", f"{type(e).__name__}: {e}"
        return None


def _video_stream(container: av.container.InputContainer, p: Probe,
                  cuda: bool) -> av.video.stream.VideoStream | None:
    """The first video stream with codec, size, fps and decoders filled into ``p``; None with ``p.reason``
    set when there is no video stream or nothing can decode it."""
    if not container.streams.video:
        p.reason, p.detail = "no_video_stream", f"streams: {[s.type for s in container.streams]}"
        return None
    st = container.streams.video[0]
    ctx = st.codec_context
    # the codec's own name ("av1"), not the decoder's ("libdav1d")
    p.codec = ctx.codec.canonical_name if ctx is not None and ctx.codec is not None else "unknown"
    p.width, p.height, p.fps = ctx.width, ctx.height, _rate(st)
    p.decoders = decode_paths(p.codec, cuda)
    if not p.decoders:
        p.reason, p.detail = "unsupported_codec", f"codec {p.codec!r}: no PyAV decoder, not DALI-decodable"
        return None
    return st


def _usable_frames(container: av.container.InputContainer, st: av.video.stream.VideoStream, p: Probe) -> int:
    """Frames that demux cleanly and, where PyAV decodes the codec, decode (first frame and tail);
    sets ``p.reason`` when there are none."""
    ctx = st.codec_context
    can_pyav = "pyav" in p.decoders
    if can_pyav:
        ctx.thread_count = 1          # probing runs one file per process; frame threads only add delay
    packets = _demux(container, st, ctx if can_pyav else None, p.notes)
    if can_pyav:
        count = _verify_decode(ctx, packets, p)
    else:
        count = packets.count
        p.notes.append(f"codec {p.codec!r} not decodable by PyAV: first frame not verified "
                       f"(decodes with {', '.join(p.decoders)})")
    if count == 0 and p.reason is None:
        p.reason, p.detail = "no_decodable_frame", "no video packets"
    return count


@dataclass
class _Packets:
    """What one demuxing pass over a video stream found."""

    count: int = 0                                        # packets up to the first corrupt one
    pts: list = field(default_factory=list)               # their timestamps
    keys: list[int] = field(default_factory=list)         # indices of keyframe packets
    gops: list[list[av.Packet]] = field(default_factory=list)   # last two GOPs (decoder warm-up + tail)
    gop_bytes: list[int] = field(default_factory=lambda: [0])
    first: av.VideoFrame | None = None                    # the first decoded frame (PyAV codecs)
    first_err: str = ""                                   # why decoding it failed


def _demux(container: av.container.InputContainer, st: av.video.stream.VideoStream, ctx: av.CodecContext | None,
           notes: list[str]) -> _Packets:
    """Count the stream's packets and keep its last two GOPs; with ``ctx``, decode packets until the first
    frame comes out."""
    d = _Packets()
    try:
        for pkt in container.demux(st):
            if pkt.size == 0:            # the demuxer's end-of-stream flush packet
                continue
            if pkt.is_corrupt:
                notes.append(f"corrupt packet at frame {d.count}: frames from there on dropped")
                break
            if ctx is not None and d.first is None:
                try:
                    out = ctx.decode(pkt)
                    d.first = out[0] if out else None
                except av.FFmpegError as e:
                    d.first_err = f"{type(e).__name__}: {e}"
            if pkt.is_keyframe or not d.gops:
                d.keys.append(d.count)
                d.gops, d.gop_bytes = d.gops[-1:] + [[]], d.gop_bytes[-1:] + [0]
            if sum(d.gop_bytes) <= _TAIL_BYTES_CAP:
                d.gops[-1].append(pkt)
            d.gop_bytes[-1] += pkt.size
            d.pts.append(pkt.pts)
            d.count += 1
    except av.FFmpegError as e:   # truncated/damaged container: keep what demuxed cleanly
        notes.append(f"demux stopped after {d.count} frames ({type(e).__name__}: {e})")
    return d


def _verify_decode(ctx: av.CodecContext, d: _Packets, p: Probe) -> int:
    """Frames that decode with PyAV: 0 with ``p.reason`` set when not even the first one does, else the
    count after the tail check; the first frame's size goes into ``p``."""
    first, first_err = d.first, d.first_err
    if first is None:
        try:                     # a decoder with output delay: drain it
            out = ctx.decode(None)
            first = out[0] if out else None
        except av.FFmpegError as e:
            first_err = first_err or f"{type(e).__name__}: {e}"
    if first is None:
        p.reason = "no_decodable_frame"
        p.detail = first_err or f"{d.count} packets, no frame decoded"
        return 0
    p.width, p.height = first.width, first.height
    if sum(d.gop_bytes) > _TAIL_BYTES_CAP:
        p.notes.append("last GOPs too large to re-decode: tail not verified")
        return d.count
    if not d.count:
        return 0
    return _check_tail(ctx, d.gops, d.pts, d.keys[-len(d.gops)], d.keys[-1], p.notes)


def _note_header_mismatch(container: av.container.InputContainer, st: av.video.stream.VideoStream, p: Probe,
                          count: int) -> None:
    """Note a file shorter than its header says (it stays usable, with the frames found)."""
    expected = _header_frames(container, st, p.fps)
    if expected and count < expected - max(2, 0.02 * expected):
        p.notes.append(f"shorter than its header says: {count} frames found, the header implies about "
                       f"{expected} (file cut or damaged?); kept with {count} frames")
