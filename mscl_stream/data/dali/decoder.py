"""DaliDecoder (whole files through ``fn.decoders.video``) and the DALI helpers every engine shares.

Two ways to drive DALI, both pipelined (``data.prefetch`` runs in flight, scheduled with
``schedule_run`` and collected in order with ``outputs``, so DALI decodes while the caller trains):

* :class:`DaliDecoder` (``data.dali_mode=decoder``): ``external_source`` feeds the encoded bytes of each
  sample's file and its sorted unique frame list to ``fn.decoders.video`` (``device="mixed"``: NVDEC;
  ``"cpu"``: FFmpeg, VP8/VP9/MJPEG only). The operator opens a decoder and builds a frame index per
  sample per run (DALI 2.4 keeps neither between runs), then decodes the list in one forward sweep
  with seeks; samples of a batch decode in parallel on the pipeline's thread pool.
* :class:`DaliFrameReader` (``data.dali_mode=reader``): ``fn.experimental.readers.video`` over file
  lists with one line per wanted frame (``file_list_format="frames"``, sequence length 1). A reader
  keeps its decoder open while consecutive lines name the same file and caches every file's frame
  index for the process, so a sample's frames (sorted) are one forward sweep of one decoder and only
  those frames are converted. A reader decodes in one background thread, so P readers (one list each,
  samples dealt round-robin) run side by side; each line's label is its slot number, which maps the
  output back to its sample (and reveals lines the reader dropped).

Geometry: ``fn.resize(mode="not_smaller")`` + ``fn.crop`` cover the working size keeping the aspect
ratio and centre-crop it on the GPU; on the CPU torch does the same resize (cheaper than DALI's CPU resize;
docs/data.md); :func:`mscl_stream.data.pyav_decode.cover_crop` reproduces it for PyAV.

Scheduling: ``exec_dynamic=True`` with ``exec_pipelined=False``, because a pipelined executor's first
``schedule_run`` runs ``prefetch_queue_depth`` iterations at once (expecting that many fed batches);
without it every ``schedule_run`` is one run, still asynchronous, up to ``prefetch_queue_depth`` of
them queued (checked on CPU: three runs scheduled, all decoded while the caller slept).

Measured with DALI 2.4 (CPU): duplicates or backward steps in a ``frames`` list seek and decode again,
so callers pass sorted unique frames and gather afterwards. ``pad_mode="none"`` makes a frame past the
end an error instead of a padded frame. Any decode error invalidates a pipeline ("Current pipeline
object is no longer valid."): the engines drop it, report which samples were in the failing run, and
resubmit the innocent ones to a fresh pipeline.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Executor
from typing import Sequence

import numpy as np
import torch

from mscl_stream.data.probe import DALI_CPU_CODECS, DALI_GPU_CODECS
from mscl_stream.data.pyav_decode import cover_crop

log = logging.getLogger(__name__)

# FFmpeg decoder names that denote the same codec as the names DALI's tables use
_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "av1_cuvid": "av1", "h265": "hevc",
            "libvpx": "vp8", "libvpx-vp9": "vp9", "mpeg4video": "mpeg4"}
# what DALI raises for a failed run (a decode error surfaces as IndexError from outputs() in 2.4)
DALI_ERRORS = (RuntimeError, IndexError, ValueError)


class DaliDecodeError(RuntimeError):
    """A DALI run failed (some file in it could not be decoded); the pipeline has been dropped."""


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


# data.decoder=auto on a GPU: DALI only on a GPU where benchmarks/nvdec_access.py (k400 profile, batch 64)
# measured a DALI variant at least AUTO_DALI_MIN_SPEEDUP times the samples/s of PyAV in one worker
# process per CPU core, with that variant's data.dali_mode. GPU name prefix -> mode; docs/data.md
# ("Choosing the decoder") holds the measurements behind each entry. No entry yet: the pipelined
# engines have not been measured on a GPU, and the synchronous path lost to PyAV there (benchmarks/README.md).
AUTO_DALI_ON_GPU: dict[str, str] = {}
AUTO_DALI_MIN_SPEEDUP = 1.2


def auto_dali_mode_on_gpu(gpu_name: str) -> str | None:
    """The ``data.dali_mode`` that ``data.decoder=auto`` uses on this GPU, or None for PyAV."""
    return next((m for prefix, m in AUTO_DALI_ON_GPU.items() if gpu_name.startswith(prefix)), None)


def error_line(e: BaseException) -> str:
    """The last non-empty line of a DALI error (its cause; the rest is a C++ stack)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def resize_cover_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, h, w, 3) uint8 frames to cover ``size`` (antialiased bilinear, aspect kept) and take
    the centre: (N, H, W, 3) uint8 (a view into the resized tensor). Same geometry as DALI's
    ``resize(mode="not_smaller", subpixel_scale=False)`` + ``crop`` (:func:`cover_crop`)."""
    h, w = size
    nh, nw, y0, x0 = cover_crop(frames.shape[1], frames.shape[2], h, w)
    if (nh, nw) != tuple(frames.shape[1:3]):
        # uint8 channels-last input takes torch's vectorised antialiasing kernel (cheaper than DALI's; docs/data.md)
        frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(nh, nw), mode="bilinear",
                                                 antialias=True, align_corners=False).permute(0, 2, 3, 1)
    return frames[:, y0:y0 + h, x0:x0 + w]


def resize_owned(full: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_cover_crop` into memory of its own (DALI reuses its output buffers next run)."""
    small = resize_cover_crop(full, size)
    shared = small.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    return small.clone() if shared else small


def device_id_of(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_resize(video, frame_size: tuple[int, int]):
    """Pipeline graph: cover ``frame_size`` keeping the aspect ratio, centre crop (GPU operators)."""
    from nvidia.dali import fn
    video = fn.resize(video, size=list(frame_size), mode="not_smaller", antialias=True, subpixel_scale=False)
    return fn.crop(video, crop=list(frame_size), out_of_bounds_policy="error")


def to_torch_cuda(tensor, device: torch.device) -> torch.Tensor:
    """One DALI GPU tensor -> a torch CUDA tensor of its own (copied on the current stream)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dst = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
    feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(device))
    return dst


def _build_decoder_pipeline(batch_size: int, num_threads: int, frame_size: tuple[int, int],
                            device: torch.device, seed: int, depth: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id_of(device), seed=seed,
                  prefetch_queue_depth=depth, exec_dynamic=True,
                  exec_pipelined=False)
    def video_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames, pad_mode="none")
        return gpu_resize(video, frame_size) if gpu else video   # CPU: resized by torch

    pipe = video_pipeline()
    pipe.build()
    return pipe


class DaliBatch:
    """A submitted batch of :class:`DaliDecoder`; :meth:`result` waits for it (runs finish in order)."""

    def __init__(self, owner: "DaliDecoder", encoded: list[np.ndarray], frames: list[np.ndarray]) -> None:
        self.owner, self.encoded, self.frames = owner, encoded, frames
        self.out: list[torch.Tensor] | None = None
        self.error: DaliDecodeError | None = None

    @property
    def done(self) -> bool:
        return self.out is not None or self.error is not None

    def result(self) -> list[torch.Tensor]:
        """Per sample a (U_i, H, W, 3) uint8 tensor on the decoder's device, frame k = ``frames[i][k]``.

        Raises:
            DaliDecodeError: this batch's run failed (some sample in it; retry them one by one).
        """
        while not self.done:
            self.owner._collect_oldest()
        if self.error is not None:
            raise self.error
        return self.out


class DaliDecoder:
    """Decode batches of (file bytes, frame list) with ``fn.decoders.video`` on ``device``, up to
    ``depth`` batches in flight.

    Args:
        batch_size: most samples per batch (smaller batches are fine).
        frame_size: (H, W) output size.
        num_threads: DALI CPU threads (parallel samples on CPU; demux/feed threads with NVDEC).
        device: torch device the frames end up on; CUDA selects the ``mixed`` (NVDEC) decoder.
        seed: DALI's seed (nothing random runs in the pipeline; fixed for reproducibility).
        executor: optional thread pool that resizes the samples of a CPU batch in parallel.
        depth: batches scheduled ahead (DALI's ``prefetch_queue_depth``); 1 = synchronous.
    """

    def __init__(self, batch_size: int, frame_size: tuple[int, int], num_threads: int, device: torch.device,
                 seed: int = 0, executor: Executor | None = None, depth: int = 1) -> None:
        self.batch_size, self.frame_size = batch_size, tuple(frame_size)
        self.num_threads, self.device, self.seed = num_threads, device, seed
        self.executor, self.depth = executor, max(1, int(depth))
        self.rebuilds = 0
        self.runs = 0                          # runs scheduled, in total
        self.max_in_flight = 0                 # most runs scheduled and not yet collected at once
        self._pipe = None
        self._pending: deque[DaliBatch] = deque()   # scheduled, not collected, oldest first

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = _build_decoder_pipeline(self.batch_size, self.num_threads, self.frame_size, self.device,
                                                 self.seed, self.depth)
        return self._pipe

    def submit(self, encoded: list[np.ndarray], frames: list[np.ndarray]) -> DaliBatch:
        """Schedule one batch (``encoded``: per sample the whole file as (nbytes,) uint8; ``frames``:
        per sample sorted unique raw frame indices, all inside the file). With ``depth`` batches
        already in flight this first collects the oldest one (kept in its :class:`DaliBatch`)."""
        if not encoded or len(encoded) > self.batch_size or len(encoded) != len(frames):
            raise ValueError(f"DaliDecoder: {len(encoded)} samples for batch size {self.batch_size}")
        batch = DaliBatch(self, encoded, [np.ascontiguousarray(f, dtype=np.int32) for f in frames])
        while len(self._pending) >= self.depth:
            self._collect_oldest()
        self._schedule(batch)
        return batch

    def decode(self, encoded: list[np.ndarray], frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Decode one batch now (see :meth:`submit` and :meth:`DaliBatch.result`)."""
        if not encoded:
            return []
        return self.submit(encoded, frames).result()

    def _schedule(self, batch: DaliBatch) -> None:
        pipe = self._pipeline()
        try:
            pipe.feed_input("encoded", batch.encoded)
            pipe.feed_input("frames", batch.frames)
            pipe.schedule_run()
        except DALI_ERRORS as e:
            batch.error = DaliDecodeError(error_line(e))
            self._drop()
            return
        self._pending.append(batch)
        self.runs += 1
        self.max_in_flight = max(self.max_in_flight, len(self._pending))

    def _collect_oldest(self) -> None:
        batch = self._pending.popleft()
        try:
            (out,) = self._pipe.outputs()
            batch.out = self._to_torch(out, len(batch.encoded))
        except DALI_ERRORS as e:
            # the run failed and took the pipeline with it: later runs are innocent, resubmit them
            batch.error = DaliDecodeError(error_line(e))
            later = list(self._pending)
            self._pending.clear()
            self._drop()
            for b in later:
                self._schedule(b)

    def _drop(self) -> None:
        self._pipe = None
        self.rebuilds += 1

    def _to_torch(self, out, n: int) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            def resize(i: int) -> torch.Tensor:
                return resize_owned(torch.from_numpy(np.asarray(out[i])), self.frame_size)
            return list(self.executor.map(resize, range(n)) if self.executor else map(resize, range(n)))
        return [to_torch_cuda(out[i], self.device) for i in range(n)]

    def close(self) -> None:
        """Release the pipeline (threads, buffers); batches still in flight are lost (their
        :meth:`DaliBatch.result` raises); the next :meth:`submit` builds a new pipeline."""
        for b in self._pending:
            b.error = DaliDecodeError("decoder closed")
        self._pending.clear()
        self._pipe = None
