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
    try:
        if os.path.getsize(path) == 0:
            p.reason, p.detail = "empty", "zero bytes"
            return p
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        p.reason, p.detail = "unreadable", f"{type(e).__name__}: {e}"
        return p
    with container:
        if not container.streams.video:
            p.reason, p.detail = "no_video_stream", f"streams: {[s.type for s in container.streams]}"
            return p
        st = container.streams.video[0]
        ctx = st.codec_context
        # the codec's own name ("av1"), not the decoder's ("libdav1d")
        p.codec = ctx.codec.canonical_name if ctx is not None and ctx.codec is not None else "unknown"
        p.width, p.height, p.fps = ctx.width, ctx.height, _rate(st)
        p.decoders = decode_paths(p.codec, cuda)
        if not p.decoders:
            p.reason, p.detail = "unsupported_codec", f"codec {p.codec!r}: no PyAV decoder, not DALI-decodable"
            return p
        can_pyav = "pyav" in p.decoders
        if can_pyav:
            ctx.thread_count = 1          # probing runs one file per process; frame threads only add delay
        first, first_err = None, ""
        count, pts, keys = 0, [], []       # packets, their timestamps, indices of keyframe packets
        gops: list[list[av.Packet]] = []   # packets of the last two GOPs (decoder warm-up + tail)
        gop_bytes = [0]
        try:
            for pkt in container.demux(st):
                if pkt.size == 0:            # the demuxer's end-of-stream flush packet
                    continue
                if pkt.is_corrupt:
                    p.notes.append(f"corrupt packet at frame {count}: frames from there on dropped")
                    break
                if can_pyav and first is None:
                    try:
                        out = ctx.decode(pkt)
                        first = out[0] if out else None
                    except av.FFmpegError as e:
                        first_err = f"{type(e).__name__}: {e}"
                if pkt.is_keyframe or not gops:
                    keys.append(count)
                    gops, gop_bytes = gops[-1:] + [[]], gop_bytes[-1:] + [0]
                if sum(gop_bytes) <= _TAIL_BYTES_CAP:
                    gops[-1].append(pkt)
                gop_bytes[-1] += pkt.size
                pts.append(pkt.pts)
                count += 1
        except av.FFmpegError as e:   # truncated/damaged container: keep what demuxed cleanly
            p.notes.append(f"demux stopped after {count} frames ({type(e).__name__}: {e})")
        if can_pyav:
            if first is None:
                try:                     # a decoder with output delay: drain it
                    out = ctx.decode(None)
                    first = out[0] if out else None
                except av.FFmpegError as e:
                    first_err = first_err or f"{type(e).__name__}: {e}"
            if first is None:
                p.reason = "no_decodable_frame"
                p.detail = first_err or f"{count} packets, no frame decoded"
                return p
            p.width, p.height = first.width, first.height
            if sum(gop_bytes) > _TAIL_BYTES_CAP:
                p.notes.append("last GOPs too large to re-decode: tail not verified")
            elif count:
                count = _check_tail(ctx, gops, pts, keys[-len(gops)], keys[-1], p.notes)
        else:
            p.notes.append(f"codec {p.codec!r} not decodable by PyAV: first frame not verified "
                           f"(decodes with {', '.join(p.decoders)})")
        if count == 0:
            p.reason, p.detail = "no_decodable_frame", "no video packets"
            return p
        expected = _header_frames(container, st, p.fps)
        if expected and count < expected - max(2, 0.02 * expected):
            p.notes.append(f"shorter than its header says: {count} frames found, the header implies about "
                           f"{expected} (file cut or damaged?); kept with {count} frames")
    p.num_frames = count
    p.duration = count / p.fps if p.fps > 0 else 0.0
    if p.fps <= 0:
        p.notes.append("no frame rate in the stream: fps 0, duration unknown")
    return p
