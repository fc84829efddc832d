"""DaliDecoder (``data.dali_mode=decoder``): whole files through ``fn.decoders.video``, pipelined.

``external_source`` feeds the encoded bytes of each sample's file and its sorted unique frame list to
``fn.decoders.video`` (``device="mixed"``: NVDEC; ``"cpu"``: FFmpeg, VP8/VP9/MJPEG only). The operator
opens a decoder and builds a frame index per sample per run (DALI 2.4 keeps neither between runs), then
decodes the list in one forward sweep with seeks; samples of a batch decode in parallel on the
pipeline's thread pool. ``depth`` batches are in flight (:mod:`mscl_stream.data.dali.pipeline`: the
scheduling, the geometry, and what a failed run does).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor

import numpy as np
import torch

from mscl_stream.data.dali.pipeline import (DALI_ERRORS, DaliDecodeError, RunCounts, build_pipeline, error_line,
                                            fit_in_graph, resize_owned, to_torch_cuda)


def _decoder_graph(device: torch.device, frame_size: tuple[int, int]):
    """The pipeline graph: fed bytes and frame lists -> decoded frames (resized in the graph on a GPU)."""
    def graph():
        from nvidia.dali import fn, types
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        mode = "mixed" if device.type == "cuda" else "cpu"
        video = fn.decoders.video(encoded, device=mode, frames=frames, pad_mode="none")
        return fit_in_graph(video, frame_size, device)
    return graph


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


class DaliDecoder(RunCounts):
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
        super().__init__()
        self.batch_size, self.frame_size = batch_size, tuple(frame_size)
        self.num_threads, self.device, self.seed = num_threads, device, seed
        self.executor, self.depth = executor, max(1, int(depth))
        self._pipe = None
        self._pending: deque[DaliBatch] = deque()   # scheduled, not collected, oldest first

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(_decoder_graph(self.device, self.frame_size), self.batch_size,
                                        self.num_threads, self.device, self.seed, self.depth)
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
        self.count_run(len(self._pending))

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
                return resize_owned(out[i], self.frame_size)
            return list(self.executor.map(resize, range(n)) if self.executor else map(resize, range(n)))
        return [to_torch_cuda(out[i], self.device) for i in range(n)]

    def close(self) -> None:
        """Release the pipeline (threads, buffers); batches still in flight are lost (their
        :meth:`DaliBatch.result` raises); the next :meth:`submit` builds a new pipeline."""
        for b in self._pending:
            b.error = DaliDecodeError("decoder closed")
        self._pending.clear()
        self._pipe = None
