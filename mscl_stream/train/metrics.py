"""Measuring a run: per-stage timers, JSONL/TensorBoard logging, progress lines, FLOPs and MFU.

The numbers a throughput claim rests on come from here, so each one says what it measures:

* :class:`StageTimer` - wall time per named stage (data_wait, flow, motion_augment, forward_backward,
  optimizer). On CUDA it synchronises the device around a stage, which costs overlap, so the trainer
  enables it only on the steps it logs.
* :class:`MetricsLogger` - one JSON object per line in ``<out_dir>/metrics.jsonl`` (appended, so a
  resumed run continues the file; take the last line per step) and TensorBoard scalars under
  ``<out_dir>/tb`` when ``torch.utils.tensorboard`` imports. Only the main rank writes.
* :func:`flops_per_clip` / :func:`estimate_flops_per_clip` count the FLOPs of one forward + backward
  with ``torch.utils.flop_counter.FlopCounterMode``; :func:`mfu` divides achieved by peak FLOP/s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

STAGES = ("data_wait", "flow", "motion_augment", "forward_backward", "optimizer")

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

_tb_notice_done = False


# ----------------------------------------------------------------------------- stage timer


class StageTimer:
    """Accumulates wall time per stage name.

    Usage::

        timer = StageTimer(device)
        timer.enabled = step % log_every == 0     # measure only logged steps
        with timer("flow"):
            flow = estimator(a, b)
        rec.update(timer.summary())               # {"time/flow": seconds per measured call, ...}

    When ``enabled`` is False a stage is not timed at all (no synchronisation, nothing recorded). When
    enabled on a CUDA device the device is synchronised before and after the stage, so asynchronous
    kernels are charged to the stage that launched them.
    """

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.enabled = enabled
        self._total: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self._win_total: dict[str, float] = defaultdict(float)
        self._win_count: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str):
        return self._measure(name) if self.enabled else nullcontext()

    @contextmanager
    def _measure(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self._total[name] += dt
            self._count[name] += 1
            self._win_total[name] += dt
            self._win_count[name] += 1

    def summary(self, prefix: str = "time/") -> dict[str, float]:
        """Mean seconds per measured call of each stage since the previous ``summary()``; resets that window."""
        out = {f"{prefix}{k}": self._win_total[k] / self._win_count[k] for k in self._win_total if self._win_count[k]}
        self._win_total.clear()
        self._win_count.clear()
        return out

    def totals(self) -> dict[str, float]:
        """Total measured seconds per stage over the whole run (only the steps that were measured)."""
        return dict(self._total)

    def counts(self) -> dict[str, int]:
        """How many calls of each stage were measured."""
        return dict(self._count)


# ----------------------------------------------------------------------------- logging


def _plain(v: Any) -> Any:
    """JSON-safe value: tensors -> numbers/lists, non-finite floats -> None (JSON has no NaN)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    if hasattr(v, "item"):  # numpy scalars
        return _plain(v.item())
    return str(v)


class MetricsLogger:
    """Writes metric records as JSONL and TensorBoard scalars; a no-op on non-main ranks.

    Args:
        out_dir: run folder; creates ``metrics.jsonl`` and ``tb/`` in it.
        is_main: only the main rank writes anything.
        tensorboard: write TensorBoard scalars if ``torch.utils.tensorboard`` imports (else one info line).
        jsonl: write ``metrics.jsonl``.
    """

    def __init__(self, out_dir: str | Path, is_main: bool = True, tensorboard: bool = True,
                 jsonl: bool = True) -> None:
        global _tb_notice_done
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self._file = None
        self._tb = None
        self._last_step = 0
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if not _tb_notice_done:
                    log.info("tensorboard is not installed: metrics go to %s only (pip install tensorboard)",
                             self.out_dir / "metrics.jsonl")
                    _tb_notice_done = True
            else:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    @property
    def jsonl_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record: ``{"step": int, ...}``.

        Every entry goes to the JSON line (plus ``"time"``, unix seconds); numeric scalar entries also go
        to TensorBoard at ``record["step"]`` (or the last step seen). Nested dicts are flattened for
        TensorBoard as ``outer/inner``.
        """
        if not self.is_main:
            return
        rec = _plain(dict(record))
        if isinstance(rec.get("step"), int):
            self._last_step = rec["step"]
        if self._file is not None:
            self._file.write(json.dumps({"time": round(time.time(), 3), **rec}) + "\n")
        if self._tb is not None:
            for k, v in _flatten(rec).items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, self._last_step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_progress(step: int, total: int, elapsed: float, clips_per_s: float) -> str:
    """One console line: ``step 250/1000 (25.0%) | 41.3 clips/s | elapsed 0:01:40 | eta 0:05:00``.

    ``step`` is the number of finished steps; the ETA assumes the mean step time so far.
    """
    frac = step / total if total > 0 else 0.0
    eta = elapsed / step * (total - step) if step > 0 else math.inf
    return (f"step {step}/{total} ({100 * frac:.1f}%) | {clips_per_s:.1f} clips/s | elapsed {_hms(elapsed)} "
            f"| eta {_hms(eta)}")


def gpu_memory(device: torch.device | str) -> dict[str, float]:
    """Peak allocated / reserved GiB on a CUDA device since start (empty dict on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


# ----------------------------------------------------------------------------- FLOPs and MFU


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
