"""What a PyAV decode hands over for its wanted frames: RGB at the working size, or the decoder's
4:2:0 planes for the training device to convert (:class:`YuvFrames`).

The RGB conversion is BT.601/BT.709 YUV -> RGB as the file is tagged, with bilinear (full) chroma
interpolation and accurate rounding (DALI's CPU decoder gives the same colours; FFmpeg's default fast
path repeats chroma samples instead, ~3/255 off on colourful detail), then a resize that covers
(H, W) keeping the aspect ratio and a centre crop with DALI's rounding (:func:`cover_crop`). One
swscale context serves a whole decode call: setting one up per frame cost as much as converting.
"""

from __future__ import annotations

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

# bilinear scaling, chroma interpolated at full resolution, accurate rounding: equals DALI's CPU colours
_SWS_FLAGS = (Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
              | Interpolation.ACCURATE_RND)


def cover_crop(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """Geometry of "resize to cover (out_h, out_w) keeping the aspect ratio, then centre crop".

    Returns:
        (resized_h, resized_w, y0, x0): the resized frame size and the crop's top-left corner. Rounding
        follows DALI (sizes and offsets rounded half up), so both decode paths take the same pixels.
    """
    s = max(out_h / src_h, out_w / src_w)
    nh, nw = max(out_h, int(src_h * s + 0.5)), max(out_w, int(src_w * s + 0.5))
    return nh, nw, (nh - out_h + 1) // 2, (nw - out_w + 1) // 2


class YuvFrames:
    """Frames as 8-bit 4:2:0 planes at their native size: the hand-off of ``decode_frames(output="yuv")``
    (picklable; :func:`mscl_stream.data.yuv.yuv420_to_rgb_cover_crop` converts them on the device).

    Attributes:
        y: (N, H, W) uint8 luma.
        uv: (N, 2, ceil(H / 2), ceil(W / 2)) uint8 chroma, U then V.
        matrix: "bt601" or "bt709", as the file is tagged (untagged: BT.601, as swscale and DALI assume).
        full_range: JPEG range (yuvj420p, or tagged full range) rather than limited.
        chroma_left: chroma sited on the even luma columns (:data:`LEFT_SITED_CODECS`), else centred.
    """

    __slots__ = ("y", "uv", "matrix", "full_range", "chroma_left")

    def __init__(self, y: np.ndarray, uv: np.ndarray, matrix: str = "bt601", full_range: bool = False,
                 chroma_left: bool = False) -> None:
        self.y, self.uv, self.matrix, self.full_range, self.chroma_left = y, uv, matrix, full_range, chroma_left

    def __len__(self) -> int:
        return len(self.y)

    def __getstate__(self):
        return self.y, self.uv, self.matrix, self.full_range, self.chroma_left

    def __setstate__(self, state) -> None:
        self.y, self.uv, self.matrix, self.full_range, self.chroma_left = state

    @property
    def nbytes(self) -> int:
        return self.y.nbytes + self.uv.nbytes

    def split(self, sections) -> list["YuvFrames"]:
        """``np.split`` along the frames."""
        return [YuvFrames(y, uv, self.matrix, self.full_range, self.chroma_left)
                for y, uv in zip(np.split(self.y, sections), np.split(self.uv, sections))]


# Decoders that site 4:2:0 chroma on the even luma columns when the bitstream does not say otherwise
# (swscale follows the frame's siting; PyAV does not expose it, so a siting signalled in the bitstream,
# e.g. H.264's chroma_loc_type, is not seen: such files differ from the RGB path by about 1/255)
LEFT_SITED_CODECS = frozenset({"h264", "hevc", "mpeg2video", "mpeg4"})
# AVColorSpace values swscale converts with BT.601 (unspecified, BT.470BG, SMPTE 170M) or BT.709 (1)
_MATRIX_OF = {2: "bt601", 5: "bt601", 6: "bt601", 1: "bt709"}


def _yuv_tag(frame: av.VideoFrame) -> tuple[str, bool] | None:
    """(matrix, full range) of an 8-bit 4:2:0 frame whose colours the device conversion reproduces as the
    RGB path gives them (swscale honours the frame's tags); None for any other frame."""
    fmt = frame.format.name
    if fmt not in ("yuv420p", "yuvj420p") or frame.colorspace not in _MATRIX_OF:
        return None
    return _MATRIX_OF[frame.colorspace], fmt == "yuvj420p" or frame.color_range == 2


class NotYuv(Exception):
    """A frame of a "yuv" decode cannot travel as the first frame's kind of planes."""


class FrameSink:
    """Writes each decoded wanted frame straight into its output rows (duplicates included).

    ``output="rgb"``: RGB at ``size`` through one swscale context for the whole call (setting one up
    per frame cost as much as the conversion). ``output="yuv"``: the frame's planes, if its first frame
    is one :func:`_yuv_tag` accepts, else RGB as above (the sample then travels as RGB; a later frame of
    another kind raises :class:`NotYuv`).
    """

    def __init__(self, rows: list[np.ndarray], size: tuple[int, int] | None, output: str) -> None:
        self.rows, self.size, self.output = rows, size, output
        self.chroma_left = False
        self.sws = VideoReformatter()
        self.out: np.ndarray | YuvFrames | None = None
        self.tag: tuple[str, bool] | None = None

    def __call__(self, k: int, frame: av.VideoFrame) -> None:
        if self.out is None:
            self._allocate(frame)
        rows = self.rows[k]
        if isinstance(self.out, YuvFrames):
            if _yuv_tag(frame) != self.tag or (frame.height, frame.width) != self.out.y.shape[1:]:
                raise NotYuv
            y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes)
            self.out.y[rows] = y
            self.out.uv[rows, 0] = u
            self.out.uv[rows, 1] = v
            return
        self.out[rows] = self._rgb(frame)

    def _allocate(self, frame: av.VideoFrame) -> None:
        n = sum(len(r) for r in self.rows)
        self.tag = _yuv_tag(frame) if self.output == "yuv" else None
        if self.tag is not None:
            h, w = frame.height, frame.width
            self.out = YuvFrames(np.empty((n, h, w), np.uint8), np.empty((n, 2, (h + 1) // 2, (w + 1) // 2), np.uint8),
                                 *self.tag, chroma_left=self.chroma_left)
        else:
            h, w = self.size if self.size is not None else (frame.height, frame.width)
            self.out = np.empty((n, h, w, 3), np.uint8)

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            return self.sws.reformat(frame, format="rgb24", interpolation=_SWS_FLAGS, threads=1).to_ndarray()
        h, w = self.size
        nh, nw, y0, x0 = cover_crop(frame.height, frame.width, h, w)
        rgb = self.sws.reformat(frame, width=nw, height=nh, format="rgb24", interpolation=_SWS_FLAGS,
                                threads=1).to_ndarray()
        return rgb[y0:y0 + h, x0:x0 + w]
