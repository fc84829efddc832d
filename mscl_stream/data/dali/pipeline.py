"""What every DALI engine shares: building and scheduling a pipeline, its errors, the geometry of its
frames, and its outputs as torch tensors.

Scheduling: every engine is pipelined: ``depth`` runs in flight (DALI's ``prefetch_queue_depth``),
scheduled with ``schedule_run`` and collected in order with ``outputs``, so DALI decodes while the
caller trains. :func:`build_pipeline` uses ``exec_dynamic=True`` with ``exec_pipelined=False``, because
a pipelined executor's first ``schedule_run`` runs ``prefetch_queue_depth`` iterations at once
(expecting that many fed batches); without it every ``schedule_run`` is one run, still asynchronous, up
to ``prefetch_queue_depth`` of them queued (checked on CPU: three runs scheduled, all decoded while the
caller slept).

Measured with DALI 2.4 (CPU): duplicates or backward steps in a ``frames`` list seek and decode again,
so callers pass sorted unique frames and gather afterwards. ``pad_mode="none"`` makes a frame past the
end an error instead of a padded frame. Any decode error invalidates a pipeline ("Current pipeline
object is no longer valid."): the engines drop it, report which samples were in the failing run, and
resubmit the innocent ones to a fresh pipeline.

Geometry: on a GPU, ``fn.resize(mode="not_smaller")`` + ``fn.crop`` in the graph cover the working size
keeping the aspect ratio and centre-crop it (:func:`fit_in_graph`); on the CPU the frames leave the
pipeline at their size and torch does the same resize (:func:`resize_owned`; cheaper than DALI's CPU
resize, docs/data.md); :func:`mscl_stream.data.frame_sink.cover_crop` reproduces it for PyAV.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mscl_stream.data.frame_sink import cover_crop

# what DALI raises for a failed run (a decode error surfaces as IndexError from outputs() in 2.4)
DALI_ERRORS = (RuntimeError, IndexError, ValueError)


class DaliDecodeError(RuntimeError):
    """A DALI run failed (some file in it could not be decoded); the pipeline has been dropped."""


def error_line(e: BaseException) -> str:
    """The last non-empty line of a DALI error (its cause; the rest is a C++ stack)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class RunCounts:
    """What an engine's pipelining reached (the loader's ``dali_runs``, ``dali_max_in_flight`` and
    ``dali_rebuilds``)."""

    def __init__(self) -> None:
        self.runs = 0                          # runs scheduled, in total
        self.max_in_flight = 0                 # most runs scheduled and not yet collected at once
        self.rebuilds = 0                      # pipelines dropped after a failed run

    def count_run(self, in_flight: int) -> None:
        """One more run scheduled; ``in_flight`` runs are now scheduled and not collected."""
        self.runs += 1
        self.max_in_flight = max(self.max_in_flight, in_flight)


def device_id_of(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def build_pipeline(graph: Callable[[], tuple], batch_size: int, num_threads: int, device: torch.device,
                   seed: int, depth: int):
    """A built pipeline running ``graph`` (its outputs, in DALI operators) on ``device``, ``depth`` runs
    queued at most, one iteration per ``schedule_run`` (module docstring)."""
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id_of(device),
                        seed=seed, prefetch_queue_depth=depth, exec_dynamic=True, exec_pipelined=False)()
    pipe.build()
    return pipe


def fit_in_graph(video, frame_size: tuple[int, int], device: torch.device):
    """Pipeline graph: on a GPU, cover ``frame_size`` keeping the aspect ratio and centre crop (GPU
    operators); on the CPU, ``video`` unchanged (torch resizes it afterwards: :func:`resize_owned`)."""
    if device.type != "cuda":
        return video
    from nvidia.dali import fn
    video = fn.resize(video, size=list(frame_size), mode="not_smaller", antialias=True, subpixel_scale=False)
    return fn.crop(video, crop=list(frame_size), out_of_bounds_policy="error")


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


def resize_owned(frames, size: tuple[int, int]) -> torch.Tensor:
    """Host frames (a DALI CPU tensor or a numpy array, (N, h, w, 3) uint8) -> :func:`resize_cover_crop`
    into memory of its own (DALI reuses its output buffers next run)."""
    full = torch.from_numpy(np.asarray(frames))
    small = resize_cover_crop(full, size)
    shared = small.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    return small.clone() if shared else small


def to_torch_cuda(tensor, device: torch.device) -> torch.Tensor:
    """One dense DALI GPU tensor -> a torch CUDA uint8 tensor of its own (copied on the current stream)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dst = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
    feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(device))
    return dst
