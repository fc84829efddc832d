"""`mscl-stream plot RUN_DIR`: a picture of a run from its ``metrics.jsonl`` (one PNG).

Panels, all over the optimiser step: the loss terms (``loss/<term>``, the total ``loss/loss`` bold),
clips/s (mean since the run's start in this process, as logged), the data-wait share of the steps since
the previous logged one, the learning rate, and, when the run logged stage times (``time/<stage>``),
each stage's share of the step (median stage time / median step time of the logging window).

Which lines are plotted: those of one run, the one named in ``RUN_DIR/run.json`` (else the last run id in
the file); lines of other runs (an older run's leftovers) are left out with a note. A resumed run appends
to the file and logs some steps again: the last line per step wins (lines without a plotted value, such
as a resume's ``resume_changes`` note, are not plotted and replace nothing).
Unreadable lines (a line cut short by a kill) are skipped and counted in a note. The PNG is written
atomically (temporary file, then rename). Only matplotlib's object API is used (no pyplot state), so
plotting is safe from any thread and needs no display.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

TOTAL = "loss/loss"      # the summed, weighted loss; drawn bold among its terms


@dataclass
class RunMetrics:
    """The logged steps of one run, read from ``metrics.jsonl``.

    ``steps``: one record per logged step, ascending (the last line with plotted values for each
    step); ``final``: the last ``"final": true`` record of the run (None if it has not finished);
    ``notes``: what was left out and why (one line each).
    """

    path: Path
    run_id: str | None
    steps: list[dict[str, Any]]
    final: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _run_json_id(run_dir: Path) -> str | None:
    try:
        rid = json.loads((run_dir / "run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """Read ``run_dir/metrics.jsonl`` for one run (module docstring); UserError when there is nothing to plot."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such folder (give a pretrain run folder, train.out_dir)")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder (give a pretrain run folder, train.out_dir)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such file (pretrain writes it when log.jsonl is true)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    rows, bad = [], []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            bad.append(n)
            continue
        if isinstance(rec, dict):
            rows.append(rec)
        else:
            bad.append(n)
    if not rows:
        what = f"{len(bad)} line(s), none of them a JSON object" if bad else "empty"
        raise UserError(f"{path}: {what}; nothing to plot (no logged step yet?)")

    ids = [r.get("run_id") for r in rows]
    wanted = _run_json_id(run_dir)
    if wanted is None or wanted not in ids:
        named = [i for i in ids if isinstance(i, str)]
        if wanted is not None:
            raise UserError(f"{path}: no line of run {wanted} (named in run.json); the file holds "
                            f"{', '.join(sorted(set(named))) or 'lines without a run id'}")
        wanted = named[-1] if named else None
    notes = []
    if bad:
        notes.append(f"skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
                     f"{', ...' if len(bad) > 5 else ''})")
    others: dict[str, int] = {}
    for i in ids:
        if i != wanted:
            others[str(i)] = others.get(str(i), 0) + 1
    if others:
        notes.append(f"left out {sum(others.values())} line(s) of other runs "
                     f"({', '.join(f'{k}: {v}' for k, v in others.items())}); plotted run {wanted}")

    by_step: dict[int, dict[str, Any]] = {}
    final = None
    for r in rows:
        if r.get("run_id") != wanted:
            continue
        if r.get("final"):
            final = r
        elif isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool) and _plotted(r):
            by_step[r["step"]] = r
    if not by_step:
        raise UserError(f"{path}: run {wanted} has no logged step yet; nothing to plot")
    return RunMetrics(path, wanted, [by_step[s] for s in sorted(by_step)], final, notes)


def _plotted(rec: dict[str, Any]) -> bool:
    """Whether a step record carries a value some panel plots."""
    return any(k in ("clips_per_s", "data_wait_share", "lr") or k.startswith(("loss/", "time/")) for k in rec)


def _num(v: Any) -> float:
    """A logged value as a float; null (non-finite when written), strings and the like -> NaN (a gap)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return math.nan


def panels(m: RunMetrics) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """What each panel plots: ``{panel: {label: (steps, values)}}``, empty panels left out.

    Panels: ``"loss"`` (``loss/<term>`` keys, label = term), ``"clips_per_s"``, ``"data_wait_share"``,
    ``"lr"``, ``"stage_share"`` (``time/<stage> / time/step`` per stage; ``time/stage_gap`` as
    ``outside stages``). A series holds the steps whose record has the key.
    """
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}

    def add(panel: str, label: str, step: int, value: float) -> None:
        xs, ys = out.setdefault(panel, {}).setdefault(label, ([], []))
        xs.append(step)
        ys.append(value)

    for r in m.steps:
        s = r["step"]
        for k, v in r.items():
            if k.startswith("loss/"):
                add("loss", k[len("loss/"):], s, _num(v))
        for k in ("clips_per_s", "data_wait_share", "lr"):
            if k in r:
                add(k, k, s, _num(r[k]))
        step_t = _num(r.get("time/step"))
        if step_t > 0:
            for k, v in r.items():
                if k.startswith("time/") and k != "time/step":
                    name = "outside stages" if k == "time/stage_gap" else k[len("time/"):]
                    add("stage_share", name, s, _num(v) / step_t)
    return out


_TITLES = {"loss": ("loss terms", "loss"), "clips_per_s": ("throughput (mean since start)", "clips/s"),
           "data_wait_share": ("data-wait share of the step", "share"), "lr": ("learning rate", "lr"),
           "stage_share": ("stage time / step time (window medians)", "share")}


def figure(m: RunMetrics):
    """A matplotlib Figure of ``panels(m)``: one axes per panel, one line per series (label = series)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = panels(m)
    order = [p for p in ("loss", "clips_per_s", "data_wait_share", "lr", "stage_share") if p in data]
    if not order:
        raise UserError(f"{m.path}: run {m.run_id} logged no loss, clips/s, data wait, lr or step time; "
                        "nothing to plot")
    rows = 1 + math.ceil((len(order) - 1) / 2) if order and order[0] == "loss" else math.ceil(len(order) / 2)
    fig = Figure(figsize=(13, 3.6 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, 2)
    slots = []
    rest = order
    if order and order[0] == "loss":
        slots.append(fig.add_subplot(grid[0, :]))
        rest = order[1:]
    first = 1 if slots else 0
    for i in range(len(rest)):
        slots.append(fig.add_subplot(grid[first + i // 2, i % 2]))
    for ax, panel in zip(slots, order):
        title, ylabel = _TITLES[panel]
        series = data[panel]
        for label, (xs, ys) in sorted(series.items(), key=lambda kv: (kv[0] == "loss", kv[0])):
            bold = panel == "loss" and label == TOTAL[len("loss/"):]
            ax.plot(xs, ys, label="total (loss)" if bold else label, linewidth=2.6 if bold else 1.2,
                    color="black" if bold else None, marker="." if len(xs) < 30 else None, zorder=3 if bold else 2)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if panel in ("data_wait_share", "stage_share"):
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(_percent())
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(series) > 1:
            ax.legend(fontsize=8, ncol=3 if panel == "loss" else 2, loc="best", framealpha=0.8)
    done = m.final
    head = f"run {m.run_id or '(no run id)'}: {len(m.steps)} logged steps up to step {m.steps[-1]['step']}"
    if done is not None and isinstance(done.get("clips_per_s"), (int, float)):
        head += f"; finished, {done['clips_per_s']:.3g} clips/s overall"
    elif done is None:
        head += "; not finished (no final line)"
    fig.suptitle(head + ("\n" + "; ".join(m.notes) if m.notes else ""), fontsize=11)
    return fig


def _percent():
    from matplotlib.ticker import PercentFormatter
    return PercentFormatter(xmax=1.0, decimals=None)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, dpi: int = 90) -> Path:
    """Write the PNG of ``run_dir`` (default ``run_dir/metrics.png``) atomically; returns its path.

    Raises:
        UserError: no run folder or metrics file, nothing readable in it, matplotlib missing, or the
            PNG cannot be written.
    """
    m = read_metrics(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plot: matplotlib is not installed (pip install matplotlib)") from None
    for note in m.notes:
        log.warning("%s: %s", m.path, note)
    dest = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    if dest.suffix.lower() != ".png":
        raise UserError(f"{dest}: the output must be a .png file")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        figure(m).savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"{dest}: cannot write it ({e.strerror or type(e).__name__})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def plot_run_or_warn(run_dir: str | os.PathLike) -> Path | None:
    """:func:`plot_run` for the end of pretrain: any failure is one warning, never an error."""
    try:
        return plot_run(run_dir)
    except Exception as e:     # the run is finished and saved: a picture must not fail it
        log.warning("metrics plot not written (%s: %s); make it later with `mscl-stream plot %s`",
                    type(e).__name__, e, run_dir)
        return None
