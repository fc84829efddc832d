"""The flow-estimator protocol and the helpers every estimator shares.

An estimator is any callable object

    flow = est(frames_a, frames_b)

with ``frames_a``/``frames_b`` of shape (N, 3, H, W), dtype uint8 or floating with values in
[0, 255], on the estimator's device, returning (N, 2, H, W) float32 *forward* flow in pixels of the
given frames: channel 0 = u (to the right), channel 1 = v (downwards); a pixel (x, y) of frame a moves
to (x + u, y + v) in frame b. It also has ``name: str``, ``device: torch.device`` and
``describe() -> dict`` (name, options, weights source), which goes into logs and checkpoints.

Conventions for estimator constructors (built-ins and "package.module:factory" estimators alike):
keyword options only, ``device`` ("auto" | "cpu" | "cuda" | "cuda:1" ...) and ``chunk_size``
(pairs per chunk, 0 = automatic from a memory budget) accepted by all; an unknown option is a
one-line :class:`UserError` (see :func:`reject_unknown_options`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError

# Default memory budgets for automatic chunking: a fraction of the free device memory on a GPU
# (the trainer's activations live beside the flow network), a fixed amount of host memory on CPU.
GPU_BUDGET_FRACTION = 0.25
CPU_BUDGET_BYTES = 1 << 30


@runtime_checkable
class FlowEstimator(Protocol):
    """What the rest of mscl_stream relies on (structural: no base class needed)."""

    name: str
    device: torch.device

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8 or float in [0,255] twice -> (N,2,H,W) float32 forward flow in pixels."""
        ...

    def describe(self) -> dict:
        """{"name": ..., "options": {...}, "weights": ...} for logs and checkpoints."""
        ...


def reject_unknown_options(name: str, options: dict[str, Any], known: tuple[str, ...] | list[str]) -> None:
    """Raise a one-line UserError naming the options an estimator does not take."""
    bad = sorted(set(options) - set(known))
    if bad:
        raise UserError(f"flow estimator {name!r} does not take option(s) {', '.join(bad)}; "
                        f"it takes: {', '.join(sorted(known))}")


def check_pair(frames_a: torch.Tensor, frames_b: torch.Tensor, name: str = "flow",
               device: torch.device | None = None, check_range: bool = True) -> None:
    """Validate an estimator's inputs; one-line UserError on any problem.

    Args:
        frames_a, frames_b: (N, 3, H, W) uint8 or floating in [0, 255], same shape and device.
        name: estimator name for the message.
        device: if given, the inputs must live on a device of this type (and index, for CUDA).
        check_range: for floating inputs, check min >= 0, max <= 255 and no NaN (one reduction; on a
            GPU this synchronises once per call).
    """
    for label, t in (("frames_a", frames_a), ("frames_b", frames_b)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != 3:
            raise UserError(f"{name}: {label} must have shape (N, 3, H, W), got {tuple(t.shape)}")
        if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
            raise UserError(f"{name}: {label} must be uint8 or floating in [0, 255], got {t.dtype}")
    if frames_a.shape != frames_b.shape:
        raise UserError(f"{name}: frames_a {tuple(frames_a.shape)} and frames_b {tuple(frames_b.shape)} differ in shape")
    if frames_a.device != frames_b.device:
        raise UserError(f"{name}: frames_a on {frames_a.device} but frames_b on {frames_b.device}")
    if device is not None and not _same_device(frames_a.device, device):
        raise UserError(f"{name}: inputs are on {frames_a.device} but the estimator runs on {device}; "
                        f"move the frames there first")
    if check_range and frames_a.numel() > 0:
        for label, t in (("frames_a", frames_a), ("frames_b", frames_b)):
            if t.dtype.is_floating_point:
                lo, hi = torch.aminmax(t)
                lo, hi = float(lo), float(hi)
                if not (lo >= 0.0 and hi <= 255.0):   # also false for NaN
                    raise UserError(f"{name}: {label} values must be in [0, 255] (got min {lo:.3g}, "
                                    f"max {hi:.3g}); scale [0, 1] frames by 255")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad the last two dims up to multiples of ``multiple``, split evenly around the image.

    Args:
        x: (N, C, H, W) floating tensor.
        multiple: e.g. 8 for RAFT.

    Returns:
        (padded (N, C, H', W'), pads (left, right, top, bottom)) for :func:`crop_padding`.
    """
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph == 0 and pw == 0:
        return x, pads
    # "replicate" keeps border texture: zero padding would create strong artificial edges that
    # attract matches near the border.
    return F.pad(x, pads, mode="replicate"), pads


def crop_padding(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on (..., H', W') -> (..., H, W)."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


def auto_chunk_size(bytes_per_pair: float, device: torch.device, n: int,
                    fraction: float = GPU_BUDGET_FRACTION, cpu_budget: int = CPU_BUDGET_BYTES) -> int:
    """Pairs per chunk so that one chunk's working memory fits the budget.

    Args:
        bytes_per_pair: the estimator's estimate of peak working memory per pair.
        device: where it runs; on CUDA the budget is ``fraction`` of the currently free memory.
        n: number of pairs in the batch (the result is at most n, at least 1).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = free * fraction
    else:
        budget = cpu_budget
    return int(max(1, min(n, math.floor(budget / max(bytes_per_pair, 1.0)))))


def run_chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], frames_a: torch.Tensor,
                frames_b: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Apply ``fn`` to consecutive chunks of at most ``chunk_size`` pairs and concatenate.

    Args:
        fn: (n, 3, H, W) x2 -> (n, 2, H, W).
        frames_a, frames_b: (N, 3, H, W).
        chunk_size: >= 1.

    Returns:
        (N, 2, H, W) flow.
    """
    n = frames_a.shape[0]
    if chunk_size >= n:
        return fn(frames_a, frames_b)
    outs = [fn(frames_a[i:i + chunk_size], frames_b[i:i + chunk_size]) for i in range(0, n, chunk_size)]
    return torch.cat(outs, dim=0)


def to_float255(frames: torch.Tensor) -> torch.Tensor:
    """uint8 or floating frames in [0, 255] -> float32 in [0, 255] (no copy when already float32)."""
    return frames.float() if frames.dtype != torch.float32 else frames


def validate_estimator(est: Any, label: str, size: tuple[int, int] = (128, 128)) -> None:
    """Check an object against the protocol by running it on one tiny pair.

    128 px is the smallest size that RAFT-like networks accept; a smooth random texture shifted by
    one pixel gives a well-posed pair for any estimator.

    Raises:
        UserError: a missing attribute, a call that fails, or an output of the wrong shape, dtype or
            device.
    """
    for attr in ("name", "device", "describe"):
        if not hasattr(est, attr):
            raise UserError(f"flow estimator from {label!r} has no attribute {attr!r} (see mscl_stream.flow.base)")
    if not callable(est) or not callable(est.describe):
        raise UserError(f"flow estimator from {label!r} must be callable and have a describe() method")
    try:
        desc = est.describe()
    except Exception as e:  # a user's code: report whatever it raised, in one line
        raise UserError(f"flow estimator from {label!r}: describe() failed: {type(e).__name__}: {e}") from None
    if not isinstance(desc, dict):
        raise UserError(f"flow estimator from {label!r}: describe() must return a dict, got {type(desc).__name__}")
    try:
        dev = torch.device(est.device)
    except (RuntimeError, TypeError):
        raise UserError(f"flow estimator from {label!r}: device {est.device!r} is not a torch device") from None
    h, w = size
    g = torch.Generator().manual_seed(0)
    tex = F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w + 1), mode="bilinear",
                        align_corners=False) * 255
    a = tex[..., :w].contiguous().to(dev)
    b = tex[..., 1:].contiguous().to(dev)   # content moves one pixel left
    try:
        out = est(a, b)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"flow estimator from {label!r} failed on a 1x3x{h}x{w} test pair: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 2, h, w) or out.dtype != torch.float32:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"flow estimator from {label!r} must return a (N,2,H,W) float32 tensor; "
                        f"for a 1x3x{h}x{w} pair it returned {got}")
    if not _same_device(out.device, dev):
        raise UserError(f"flow estimator from {label!r} returned flow on {out.device}, expected {dev}")
