"""NVIDIA optical-flow hardware (NVOFA) through DALI's ``fn.optical_flow``.

Each pair becomes a 2-frame FHWC uint8 sequence fed to a small DALI pipeline on the estimator's GPU.
The hardware returns one vector per ``grid`` x ``grid`` block, already in input pixels (DALI's
documented convention); we upsample that field bilinearly to the frame size without rescaling the
vectors. GPU-only: on a machine without CUDA, or a GPU whose driver does not expose the optical-flow
engine, building or first use fails with a one-line UserError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError
from mscl_stream.flow.base import check_pair, reject_unknown_options, run_chunked
from mscl_stream.machine import resolve_device

_GRIDS = (1, 2, 4)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


class DALIOpticalFlow:
    """Hardware optical flow (protocol: mscl_stream.flow.base).

    Args:
        grid: output grid g (4 on every NVOFA generation; 1 and 2 on Ampere and newer).
        preset: speed/quality in [0, 1] (0 = slowest, best quality; DALI's meaning).
        chunk_size: pairs per DALI batch (0 = 64).
        device: "auto" or a CUDA device.
    """

    OPTIONS = ("grid", "preset", "chunk_size", "device")

    def __init__(self, **options):
        reject_unknown_options("dali_of", options, self.OPTIONS)
        self.name = "dali_of"
        if not torch.cuda.is_available():
            raise UserError("dali_of needs an NVIDIA GPU with the optical-flow engine; CUDA is not available here")
        self.device = resolve_device(options.get("device", "auto"))
        if self.device.type != "cuda":
            raise UserError(f"dali_of runs on a CUDA device only, got device={self.device}")
        self.grid = int(options.get("grid", 4))
        if self.grid not in _GRIDS:
            raise UserError(f"dali_of: grid must be one of {_GRIDS}, got {self.grid}")
        self.preset = float(options.get("preset", 0.0))
        if not 0.0 <= self.preset <= 1.0:
            raise UserError(f"dali_of: preset must be in [0, 1], got {self.preset}")
        self.chunk_size = int(options.get("chunk_size", 0)) or 64
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UserError(f"dali_of needs nvidia-dali ({e})") from None
        self._pipes: dict[int, object] = {}

    def _pipeline(self, batch: int):
        """A built pipeline for up to ``batch`` pairs (cached per batch capacity)."""
        pipe = self._pipes.get(batch)
        if pipe is not None:
            return pipe
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch, num_threads=1, device_id=self.device.index, prefetch_queue_depth=1)
        def of_pipe():
            seq = fn.external_source(name="pairs", device="gpu", layout="FHWC", dtype=types.UINT8)
            return fn.optical_flow(seq, output_grid=self.grid, hint_grid=4, preset=self.preset,
                                   image_type=types.RGB)

        try:
            pipe = of_pipe()
            pipe.build()
        except Exception as e:  # DALI raises RuntimeError with the driver's message
            raise UserError(f"dali_of: NVIDIA optical-flow hardware unavailable on "
                            f"{torch.cuda.get_device_name(self.device)} ({_first_line(e)})") from None
        self._pipes[batch] = pipe
        return pipe

    def _chunk(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n, _, h, w = frames_a.shape
        # (n, 2, H, W, 3) uint8 sequences [b, a]: the engine returns, on the grid of the second frame,
        # vectors pointing into the first ([a, b] gives the negated motion), so [b, a] yields the
        # forward flow of a.
        seq = torch.stack([frames_b, frames_a], dim=1).permute(0, 1, 3, 4, 2)
        if seq.dtype != torch.uint8:
            seq = seq.round().clamp(0, 255).to(torch.uint8)
        seq = seq.contiguous()
        capacity = 1 << max(0, (n - 1).bit_length())          # few distinct pipelines: powers of two
        pipe = self._pipeline(capacity)
        stream = torch.cuda.current_stream(self.device)
        try:
            pipe.feed_input("pairs", [seq[i] for i in range(n)], cuda_stream=stream.cuda_stream)
            (out,) = pipe.run()
            dense = out.as_tensor()                            # (n, 1, H/g, W/g, 2)
            coarse = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, coarse, cuda_stream=stream)
        except Exception as e:
            raise UserError(f"dali_of failed on {torch.cuda.get_device_name(self.device)} "
                            f"for {n} pairs of {h}x{w}: {_first_line(e)}") from None
        coarse = coarse[:, 0].permute(0, 3, 1, 2)             # (n, 2, H/g, W/g), input pixels
        if coarse.shape[-2:] == (h, w):
            return coarse.contiguous()
        # vectors are already in input pixels: only the sampling grid changes
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8/float [0,255] x2 on the GPU -> (N,2,H,W) float32 forward flow in pixels."""
        check_pair(frames_a, frames_b, self.name, device=self.device)
        n, _, h, w = frames_a.shape
        if n == 0:
            return torch.zeros(0, 2, h, w, device=self.device)
        return run_chunked(self._chunk, frames_a, frames_b, self.chunk_size)

    def describe(self) -> dict:
        return {"name": self.name, "weights": None,
                "options": {"grid": self.grid, "preset": self.preset, "chunk_size": self.chunk_size,
                            "device": str(self.device)}}
