"""Measuring a run: per-stage timers, JSONL/TensorBoard logging, progress lines, FLOPs and MFU.

The numbers a throughput claim rests on come from here, so each one says what it measures:

* :class:`StageTimer` - time per named stage (data_wait, flow, motion_augment, forward_backward,
  optimizer) and per step, with CUDA events on a GPU (no device sync around stages), warm-up steps
  left out, per-step medians, and the gap between the stages' sum and the measured step.
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
import statistics
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
    """Per-stage and per-step times of training steps, without synchronising the device.

    Usage::

        timer = StageTimer(device, warmup_steps=2)
        for step ...:
            timer.begin_step()                    # a step boundary (also measures the whole step)
            with timer("flow"):
                flow = estimator(a, b)
            ...
        rec.update(timer.summary())               # {"time/flow": median s per step, "time/step": ..., ...}
        timer.report()                            # medians, stage sum vs step time, the gap

    On CUDA each stage records two CUDA events on the current stream (no host sync); a step's time runs
    from its ``begin_step`` event to the next one, so it includes whatever ran outside the stages. Events
    are read when they have completed (``query()``), and ``summary`` / ``totals`` / ``report`` wait for the
    last one (one sync per call: do it on logged steps). Events time the stream: a stage is charged
    with the device time between its two events, including idle time while the host was still queueing
    work; work on other streams is not seen. On CPU ``time.perf_counter`` is used.

    The first ``warmup_steps`` steps (capture, autotuning, first launches) are left out of everything
    reported. A stage that runs twice in one step counts once, with the sum. ``enabled = False`` turns
    timing off (nothing recorded).
    """

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True,
                 warmup_steps: int = 0) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.enabled = enabled
        self.warmup_steps = warmup_steps
        self._events = self.device.type == "cuda"
        self._open: dict | None = None            # the step being recorded
        self._pending: list[dict] = []            # closed steps whose events may not have completed
        self._seen = 0                            # steps closed so far (warm-up ones included)
        self._steps: list[dict] = []              # resolved post-warm-up steps: {"step": s, "stages": {name: s}}
        self._window = 0                          # index into _steps where the current summary window starts

    # ---------------------------------------------------------------- recording
    def _mark(self):
        if self._events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _secs(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self._events else b - a

    def begin_step(self) -> None:
        """Close the current step (if any) and start the next one."""
        if not self.enabled:
            return
        mark = self._mark()
        if self._open is not None:
            self._open["end"] = mark
            self._pending.append(self._open)
        self._open = {"start": mark, "stages": [], "end": None}
        self._resolve(wait=False)

    def abandon_step(self) -> None:
        """Drop the step begun last without counting it (the loop found no batch: the epoch is over)."""
        self._open = None

    def __call__(self, name: str):
        return self._measure(name) if self.enabled else nullcontext()

    @contextmanager
    def _measure(self, name: str) -> Iterator[None]:
        if self._open is None:                   # stages without begin_step: one implicit step
            self._open = {"start": self._mark(), "stages": [], "end": None}
        a = self._mark()
        try:
            yield
        finally:
            self._open["stages"].append((name, a, self._mark()))

    def _resolve(self, wait: bool) -> None:
        while self._pending:
            st = self._pending[0]
            if self._events and not st["end"].query():
                if not wait:
                    return
                st["end"].synchronize()
            self._pending.pop(0)
            self._seen += 1
            if self._seen <= self.warmup_steps:
                continue
            stages: dict[str, float] = defaultdict(float)
            for name, a, b in st["stages"]:
                stages[name] += self._secs(a, b)
            self._steps.append({"step": self._secs(st["start"], st["end"]), "stages": dict(stages)})

    def _flush(self) -> None:
        # the open step ends at its last stage's end (what follows it, e.g. a checkpoint, is no step work)
        if self._open is not None and self._open["stages"]:
            self._open["end"] = self._open["stages"][-1][2]
            self._pending.append(self._open)
            self._open = None
        self._resolve(wait=True)

    # ---------------------------------------------------------------- reading
    @staticmethod
    def _median(xs: list[float]) -> float:
        return statistics.median(xs) if xs else math.nan

    def _stats(self, steps: list[dict]) -> dict[str, Any]:
        names = list(dict.fromkeys(n for st in steps for n in st["stages"]))
        med = {n: self._median([st["stages"][n] for st in steps if n in st["stages"]]) for n in names}
        sums = [sum(st["stages"].values()) for st in steps]
        return {"stages": med, "step": self._median([st["step"] for st in steps]),
                "stage_sum": self._median(sums),
                "gap": self._median([st["step"] - s for st, s in zip(steps, sums)])}

    def summary(self, prefix: str = "time/") -> dict[str, float]:
        """Median seconds per step of each stage, of the whole step and of the gap (step minus the sum of
        its stages) over the steps since the previous ``summary()``; waits for their events."""
        self._resolve(wait=True)
        steps = self._steps[self._window:]
        self._window = len(self._steps)
        if not steps:
            return {}
        st = self._stats(steps)
        return {**{f"{prefix}{k}": v for k, v in st["stages"].items()}, f"{prefix}step": st["step"],
                f"{prefix}stage_gap": st["gap"]}

    def totals(self) -> dict[str, float]:
        """Total measured seconds per stage over all post-warm-up steps (closes the open step)."""
        self._flush()
        out: dict[str, float] = defaultdict(float)
        for st in self._steps:
            for k, v in st["stages"].items():
                out[k] += v
        return dict(out)

    def counts(self) -> dict[str, int]:
        """In how many post-warm-up steps each stage was measured (closes the open step)."""
        self._flush()
        out: dict[str, int] = defaultdict(int)
        for st in self._steps:
            for k in st["stages"]:
                out[k] += 1
        return dict(out)

    def report(self) -> dict[str, Any]:
        """Steady-state stage timing of the run: per-step medians, their sum against the measured step.

        Returns ``{"method", "warmup_steps", "steps", "stage_median_s": {stage: s}, "step_median_s",
        "stage_sum_median_s", "gap_median_s", "step_total_s", "gap_share"}`` (gap = step time not inside any stage:
        host work between stages, logging, idle device); closes the open step.
        """
        self._flush()
        st = self._stats(self._steps)
        return {"method": "cuda events" if self._events else "perf_counter", "warmup_steps": self.warmup_steps,
                "steps": len(self._steps), "stage_median_s": st["stages"], "step_median_s": st["step"],
                "stage_sum_median_s": st["stage_sum"], "gap_median_s": st["gap"],
                "step_total_s": sum(x["step"] for x in self._steps),
                "gap_share": st["gap"] / st["step"] if self._steps and st["step"] > 0 else math.nan}


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


def format_progress(step: int, total: int, elapsed: float, clips_per_s: float, start: int = 0) -> str:
    """One console line: ``step 250/1000 (25.0%) | 41.3 clips/s | elapsed 0:01:40 | eta 0:05:00``.

    ``step`` is the number of finished steps, ``start`` the step this process began at (a resumed run)
    and ``elapsed`` the seconds since then; the ETA assumes the mean step time of those steps. The
    trainer prints this line where no progress bar is drawn (mscl_stream.progress).
    """
    frac = step / total if total > 0 else 0.0
    eta = elapsed / (step - start) * (total - step) if step > start else math.inf
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
