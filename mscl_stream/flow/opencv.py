"""Classical CPU flow from OpenCV: DIS (ultrafast / fast / medium presets) and Farneback.

Frames are converted to 8-bit grayscale on the host and pairs are spread over a thread pool (OpenCV
releases the GIL inside its calls). The flow comes back on the input's device, in the project's
convention (channel 0 = u right, 1 = v down, forward a -> b), which is OpenCV's own.
OpenCV is an optional dependency: building one of these without it is a one-line error.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mscl_stream.errors import UserError
from mscl_stream.flow.base import check_pair, reject_unknown_options, run_chunked

METHODS = ("dis_ultrafast", "dis_fast", "dis_medium", "farneback")

# Farneback parameters (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags): the values
# OpenCV's own samples use, which handle the few-pixel motions of 8-frame gaps at 112-256 px.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("OpenCV flow estimators need opencv-python-headless: "
                        "pip install 'mscl_stream[opencv]'") from None
    return cv2


def to_gray_u8(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) RGB uint8 or float [0,255] (any device) -> (N, H, W) uint8 luma (BT.601, as cv2)."""
    x = frames.detach().float()
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return gray.round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


class OpenCVFlow:
    """OpenCV flow estimator (protocol: mscl_stream.flow.base).

    Args:
        method: "dis_ultrafast", "dis_fast", "dis_medium" or "farneback".
        threads: worker threads over pairs (0 = all cores).
        chunk_size: pairs moved to the host at a time (0 = all at once).
        device: accepted for uniformity; OpenCV always computes on the CPU and the flow is returned
            on the input's device.
    """

    OPTIONS = ("method", "threads", "chunk_size", "device")

    def __init__(self, **options):
        reject_unknown_options(options.get("method", "opencv"), options, self.OPTIONS)
        method = options.get("method", "dis_fast")
        if method not in METHODS:
            raise UserError(f"unknown OpenCV flow method {method!r}; choose one of {', '.join(METHODS)}")
        self.cv2 = _import_cv2()
        self.name = method
        self.device = torch.device("cpu")
        self.threads = int(options.get("threads", 0)) or (os.cpu_count() or 1)
        self.chunk_size = int(options.get("chunk_size", 0))
        if self.threads < 1 or self.chunk_size < 0:
            raise UserError(f"{method}: threads must be >= 1 (or 0 = all cores) and chunk_size >= 0")
        self._pool: ThreadPoolExecutor | None = None

    def _dis(self):
        # A fresh object per pair: a reused DIS instance carries buffers over from its previous call
        # (results would then depend on batch order and thread assignment); creating one is cheap
        # next to the flow itself.
        preset = {"dis_ultrafast": self.cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                  "dis_fast": self.cv2.DISOPTICAL_FLOW_PRESET_FAST,
                  "dis_medium": self.cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[self.name]
        return self.cv2.DISOpticalFlow_create(preset)

    def pair(self, gray_a: np.ndarray, gray_b: np.ndarray) -> np.ndarray:
        """(H, W) uint8 twice -> (H, W, 2) float32 forward flow."""
        if self.name == "farneback":
            f = FARNEBACK
            return self.cv2.calcOpticalFlowFarneback(gray_a, gray_b, None, f["pyr_scale"], f["levels"],
                                                     f["winsize"], f["iterations"], f["poly_n"],
                                                     f["poly_sigma"], f["flags"])
        return self._dis().calc(gray_a, gray_b, None)

    def _chunk(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        ga, gb = to_gray_u8(frames_a), to_gray_u8(frames_b)
        n = ga.shape[0]
        if n == 1 or self.threads == 1:
            flows = [self.pair(ga[i], gb[i]) for i in range(n)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"flow-{self.name}")
            flows = list(self._pool.map(self.pair, ga, gb))
        out = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2)        # (n, 2, H, W)
        return out.to(frames_a.device, non_blocking=False).contiguous()

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8/float [0,255] x2 (any device) -> (N,2,H,W) float32 on the input's device."""
        check_pair(frames_a, frames_b, self.name)
        n, _, h, w = frames_a.shape
        if n == 0:
            return torch.zeros(0, 2, h, w, device=frames_a.device)
        return run_chunked(self._chunk, frames_a, frames_b, self.chunk_size or n)

    def describe(self) -> dict:
        opts = {"threads": self.threads, "chunk_size": self.chunk_size, "opencv": self.cv2.__version__}
        if self.name == "farneback":
            opts.update(FARNEBACK)
        return {"name": self.name, "weights": None, "options": opts}

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
