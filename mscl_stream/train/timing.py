"""Per-stage timing of training steps: :class:`StageTimer`, with CUDA events on a GPU.

Times each named stage (data_wait, flow, motion_augment, forward_backward, optimizer) and each step
without a device sync around stages, leaves warm-up steps out, reports per-step medians and the gap
between the stages' sum and the measured step (docs/performance.md).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

STAGES = ("data_wait", "flow", "motion_augment", "forward_backward", "optimizer")


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

