"""FLOPs and MFU: the FLOPs of one training forward + backward per clip, GPU peak FLOP/s, utilisation.

:func:`estimate_flops_per_clip` counts with ``torch.utils.flop_counter.FlopCounterMode``;
:func:`mfu` divides achieved by the peak FLOP/s of :data:`PEAK_BF16` (:func:`peak_flops`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak FLOP/s per GPU from NVIDIA's datasheets (no sparsity). Matched in order
# against torch.cuda.get_device_name(); more specific names first.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),       # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU (H100/H200/A100 table), None for CPU or an unknown GPU.

    ``device`` is a torch device (its CUDA name is looked up) or a GPU name string. With None the trainer
    reports no MFU rather than a made-up one.
    """
    if isinstance(device, str) and not (device == "cpu" or device.startswith("cuda")):
        name = device
    else:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    log.info("no peak FLOP/s known for %r: MFU is not reported", name)
    return None


def mfu(flops_per_clip: float | None, clips_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_clip * clips_per_s / peak`` (per device; None if unknown)."""
    if not flops_per_clip or not peak:
        return None
    return flops_per_clip * clips_per_s / peak


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the torch ops that ``fn()`` runs (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    values = ([getattr(inputs, f.name) for f in dataclasses.fields(inputs)] if dataclasses.is_dataclass(inputs)
              else list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs))
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("cannot tell the batch size of the inputs; pass batch_size")


def _scalar_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    tensors = (list(out.values()) if isinstance(out, Mapping) else list(out))
    return sum(t.float().sum() for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)


def estimate_flops_per_clip(model: nn.Module, inputs: Any, dtype: torch.dtype | None = None,
                            batch_size: int | None = None) -> float | None:
    """FLOPs of one training forward + backward of ``model(inputs)``, divided by the batch size.

    Args:
        model: the module the trainer steps (unwrapped, not DDP).
        inputs: one batch: a tensor, a dataclass/dict of tensors (first tensor's dim 0 is the batch) or
            a tuple; ``model(inputs)`` is called with it as one argument unless it is a tuple.
        dtype: autocast dtype (None = fp32), as in training.
        batch_size: clips in ``inputs`` when it cannot be read off the first tensor.

    Returns:
        FLOPs per clip, or None (with a warning) if counting fails. The loss is ``out["loss"]`` for a
        dict output, else the sum of the outputs. The extra pass leaves gradients in ``model`` (zero
        them) and updates BatchNorm running statistics once.
    """
    b = batch_size or _batch_size(inputs)
    device = next(model.parameters()).device

    def step() -> None:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        _scalar_loss(out).backward()

    try:
        return count_flops(step) / b
    except Exception as e:  # a counting failure must not stop training; MFU is then not reported
        log.warning("FLOP count failed (%s: %s): MFU is not reported", type(e).__name__, e)
        return None
