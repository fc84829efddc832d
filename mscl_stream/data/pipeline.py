"""DALI decode path: encoded files + per-sample frame lists -> resized uint8 frames on the device.

One small pipeline: ``external_source`` feeds the encoded bytes of each sample's file and its frame
list, ``fn.decoders.video`` decodes exactly those frames (``device="mixed"``: NVDEC on the GPU;
``"cpu"``: FFmpeg, VP8/VP9/MJPEG only), ``fn.resize(mode="not_smaller")`` + ``fn.crop`` cover the working
size keeping the aspect ratio and centre-crop it (the PyAV path reproduces this geometry with
:func:`mscl_stream.data.pyav_decode.cover_crop`). Samples of a batch decode in parallel on the
pipeline's thread pool.

Measured with DALI 2.4 (CPU): the ``frames`` argument accepts any order and duplicates, but each
duplicate or backwards step seeks and decodes again from a keyframe (padding a list with repeats
of its last frame made a batch ~1.6x slower), so callers pass each sample's sorted unique frames and
gather afterwards; outputs may then differ in length per sample. ``pad_mode="none"`` makes a frame past
the end an error instead of a silently repeated (``"edge"``) or black (``"constant"``, the default)
frame, so padded frames can never reach training. A decode error raises from ``run()``; the pipeline is
rebuilt (~10 ms) before the next batch, and the caller decides which sample was at fault.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor

import numpy as np
import torch

from mscl_stream.data.probe import DALI_CPU_CODECS, DALI_GPU_CODECS
from mscl_stream.data.pyav_decode import cover_crop

log = logging.getLogger(__name__)

# FFmpeg decoder names that denote the same codec as the names DALI's tables use
_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "av1_cuvid": "av1", "h265": "hevc",
            "libvpx": "vp8", "libvpx-vp9": "vp9", "mpeg4video": "mpeg4"}


class DaliDecodeError(RuntimeError):
    """A DALI batch failed (some file in it could not be decoded); the pipeline has been dropped."""


def canonical_codec(codec: str) -> str:
    """Manifest codec name -> the name used in DALI's codec tables (lower case, aliases resolved)."""
    c = (codec or "").strip().lower()
    return _ALIASES.get(c, c)


def dali_can_decode(codec: str, device: torch.device) -> bool:
    """Whether DALI 2.4 decodes ``codec`` on ``device`` (CPU: VP8/VP9/MJPEG; CUDA: also H.264, HEVC,
    AV1, MPEG-4) and DALI itself imports."""
    table = DALI_GPU_CODECS if device.type == "cuda" else DALI_CPU_CODECS
    return canonical_codec(codec) in table and dali_available()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resize_cover_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, h, w, 3) uint8 frames to cover ``size`` (antialiased bilinear, aspect kept) and take
    the centre: (N, H, W, 3) uint8 (a view into the resized tensor). Same geometry as DALI's
    ``resize(mode="not_smaller", subpixel_scale=False)`` + ``crop`` (:func:`cover_crop`)."""
    h, w = size
    nh, nw, y0, x0 = cover_crop(frames.shape[1], frames.shape[2], h, w)
    if (nh, nw) != tuple(frames.shape[1:3]):
        # uint8 channels-last input takes torch's vectorised antialiasing kernel (~4x DALI's CPU resize)
        frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(nh, nw), mode="bilinear",
                                                 antialias=True, align_corners=False).permute(0, 2, 3, 1)
    return frames[:, y0:y0 + h, x0:x0 + w]


def _build_pipeline(batch_size: int, num_threads: int, frame_size: tuple[int, int], device: torch.device,
                    seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def video_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames, pad_mode="none")
        if not gpu:
            return video                      # resized by torch: DALI's CPU resize costs ~4x more
        video = fn.resize(video, size=list(frame_size), mode="not_smaller", antialias=True,
                          subpixel_scale=False)
        return fn.crop(video, crop=list(frame_size), out_of_bounds_policy="error")

    pipe = video_pipeline()
    pipe.build()
    return pipe


class DaliDecoder:
    """Decode batches of (file bytes, frame list) with DALI on ``device``.

    Args:
        batch_size: most samples per call (smaller batches are fine).
        frame_size: (H, W) output size.
        num_threads: DALI CPU threads (parallel samples on CPU; demux/feed threads with NVDEC).
        device: torch device the frames end up on; CUDA selects the ``mixed`` (NVDEC) decoder.
        seed: DALI's seed (nothing random runs in the pipeline; fixed for reproducibility).
        executor: optional thread pool that resizes the samples of a CPU batch in parallel.
    """

    def __init__(self, batch_size: int, frame_size: tuple[int, int], num_threads: int, device: torch.device,
                 seed: int = 0, executor: Executor | None = None) -> None:
        self.batch_size, self.frame_size = batch_size, tuple(frame_size)
        self.num_threads, self.device, self.seed = num_threads, device, seed
        self.executor = executor
        self.rebuilds = 0
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = _build_pipeline(self.batch_size, self.num_threads, self.frame_size, self.device,
                                         self.seed)
        return self._pipe

    def decode(self, encoded: list[np.ndarray], frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Decode one batch.

        Args:
            encoded: per sample, the whole file as a (nbytes,) uint8 array.
            frames: per sample, sorted unique raw frame indices (U_i,), all inside the file.

        Returns:
            Per sample a (U_i, H, W, 3) uint8 tensor on ``self.device``, frame k = raw ``frames[i][k]``.

        Raises:
            DaliDecodeError: DALI failed on some sample of the batch (the pipeline is rebuilt lazily).
        """
        if not encoded:
            return []
        if len(encoded) > self.batch_size or len(encoded) != len(frames):
            raise ValueError(f"DaliDecoder: {len(encoded)} samples for batch size {self.batch_size}")
        pipe = self._pipeline()
        try:
            pipe.feed_input("encoded", encoded)
            pipe.feed_input("frames", [np.ascontiguousarray(f, dtype=np.int32) for f in frames])
            (out,) = pipe.run()
        except RuntimeError as e:
            # any runtime error may leave the pipeline unusable: drop it, rebuild before the next batch
            self.close()
            self.rebuilds += 1
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise DaliDecodeError(lines[-1] if lines else type(e).__name__) from None
        return self._to_torch(out, len(encoded))

    def _to_torch(self, out, n: int) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            def resize(i: int) -> torch.Tensor:
                full = torch.from_numpy(np.asarray(out[i]))        # a view of DALI's buffer
                small = resize_cover_crop(full, self.frame_size)
                # copy unless the resize already made new memory: DALI reuses its buffers next run
                shared = small.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
                return small.clone() if shared else small
            return list(self.executor.map(resize, range(n)) if self.executor else map(resize, range(n)))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        res = []
        for i in range(n):
            t = out[i]
            dst = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, dst, cuda_stream=stream)
            res.append(dst)
        return res

    def close(self) -> None:
        """Release the pipeline (threads, buffers); the next :meth:`decode` builds a new one."""
        self._pipe = None
