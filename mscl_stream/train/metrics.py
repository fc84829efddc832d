"""Writing a run's metrics: JSONL/TensorBoard records, the console progress line, GPU memory peaks.

* :class:`MetricsLogger` - one JSON object per line in ``<out_dir>/metrics.jsonl`` (appended, so a
  resumed run continues the file; take the last line per step) and TensorBoard scalars under
  ``<out_dir>/tb`` when ``torch.utils.tensorboard`` imports. Only the main rank writes.
* :class:`Throughput` - clips per second since the start, the data-wait share since the last logged
  step, and when each step ended.
* :func:`format_progress` - the one-line step / throughput / ETA report.
* :func:`gpu_memory` - peak allocated and reserved memory on a CUDA device.

Stage timing lives in :mod:`mscl_stream.train.timing`, FLOPs and MFU in :mod:`mscl_stream.train.flops`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_tb_notice_done = False


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


class Throughput:
    """Clips per second of the steps done by this process, and the share of time spent waiting for data.

    Args:
        clips_per_step: clips one step trains on over all ranks (the global batch).
    """

    def __init__(self, clips_per_step: int) -> None:
        self.clips_per_step = clips_per_step
        self.t_start = time.perf_counter()
        self.clips = 0
        self.step_ends: list[float] = []     # seconds from the start to the end of each step
        self._t_window, self._wait = self.t_start, 0.0

    def wait(self, seconds: float) -> None:
        """The loop waited ``seconds`` for data (loader or look-ahead)."""
        self._wait += seconds

    def step_done(self) -> None:
        self.clips += self.clips_per_step
        self.step_ends.append(time.perf_counter() - self.t_start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def rate(self, elapsed: float) -> float:
        """Clips per second over ``elapsed`` seconds from the start."""
        return self.clips / max(elapsed, 1e-9)

    def window(self) -> tuple[float, float, float]:
        """(seconds since the start, clips/s since the start, data-wait share since the last call)."""
        now = time.perf_counter()
        elapsed = now - self.t_start
        share = self._wait / max(now - self._t_window, 1e-9)
        self._t_window, self._wait = now, 0.0
        return elapsed, self.rate(elapsed), share


def format_progress(step: int, total: int, elapsed: float, clips_per_s: float, start: int = 0) -> str:
    """One console line: ``step 250/1000 (25.0%) | 41.3 clips/s | elapsed 0:01:40 | eta 0:05:00``.

    ``step`` is the number of finished steps, ``start`` the step this process began at (a resumed run)
    and ``elapsed`` the seconds since then; the ETA assumes the mean step time of those steps. A run
    (:meth:`mscl_stream.train.run.Run.report`) prints this line where no progress bar is drawn (mscl_stream.progress).
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

