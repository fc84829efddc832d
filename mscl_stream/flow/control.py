"""Control estimators: flow that carries no motion, for ablations (``flow.estimator: zero``).

A study of what the flow estimator buys needs a floor: the same training with flow that says nothing
about the video. ``zero`` returns zero flow for every pair, so the flow branch sees blank (white)
colour-wheel images and the RGB-flow terms have nothing to align with. It is weight-free and works at
any frame size, unlike a random-weight RAFT (which needs >= 128 px and would change the frame size of
a study run at smaller shapes).
"""

from __future__ import annotations

import torch

from mscl_stream.flow.base import check_pair, reject_unknown_options


class ZeroFlow:
    """Zero flow for every pair (protocol: mscl_stream.flow.base).

    Args:
        device: where the flow is returned ("auto" = the input's device).
    """

    OPTIONS = ("device",)

    def __init__(self, **options):
        reject_unknown_options("zero", options, self.OPTIONS)
        dev = options.get("device", "auto")
        self._device = None if dev in (None, "auto") else torch.device(dev)
        self.name = "zero"

    @property
    def device(self) -> torch.device:
        return self._device or torch.device("cpu")

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) twice -> (N,2,H,W) float32 zeros on the input's device."""
        check_pair(frames_a, frames_b, self.name, check_range=False)
        n, _, h, w = frames_a.shape
        return torch.zeros(n, 2, h, w, dtype=torch.float32, device=frames_a.device)

    def describe(self) -> dict:
        return {"name": self.name, "options": {}, "weights": None}
