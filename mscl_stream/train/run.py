"""One training run's machinery, the same for every training loop: folder, resume, signals, checkpoints, metrics.

:class:`Run` owns everything that does not depend on what is trained:

* the run folder (``train.out_dir``, :mod:`.rundir`): checked and locked before any expensive work,
  claimed for this run's id once the loop is about to start;
* the resume point (:mod:`.resume`): the checkpoint every rank continues from, chosen by rank 0;
* SIGINT/SIGTERM (:mod:`.signals`): a request to checkpoint and stop at a step boundary;
* checkpoint files (:class:`Checkpointer`: step files pruned to ``train.keep_checkpoints``, ``last.pt``
  as a hard link when the run ended on a step checkpoint, ``diverged.pt``);
* ``metrics.jsonl`` / TensorBoard (:class:`.metrics.MetricsLogger`), the progress bar or line, and
  ``metrics.png`` at the end;
* on every exit: progress and metrics closed, the process group left (only when the run's
  ``init_distributed`` call created it: a command running several fine-tunes keeps one group), signals
  restored, lock released.

The loop hands over its state as a :class:`TrainState` (model, optimizer, loader position, RNGs,
counters); the run writes and restores it without knowing what it holds. The pretraining loop
(:class:`mscl_stream.train.trainer.Trainer`) is one such loop::

    with Run(cfg, dist) as run:              # folder locked, stop signals installed
        run.choose_resume(data_id)           # before anything expensive is built
        state = Loop(cfg, ...)               # a TrainState: builds its model, optimizer, loader
        run.restore(state)                   # the resume point's state, if there is one
        run.begin(total, initial=step)       # folder claimed, config.yaml, metrics, progress
        while ...:                           # the loop's own steps, then per step:
            run.report(step, record, rate=..., elapsed=...) or run.tick(step)
            if run.should_stop(logged): raise run.interrupted(step, run.checkpoint("step", state))
        run.checkpoint("last", state)
        run.finish(result)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mscl_stream.config import Config, dump_config, to_dict
from mscl_stream.distributed import DistInfo, all_gather_objects, release
from mscl_stream.errors import Interrupted, UserError
from mscl_stream.progress import Progress
from mscl_stream.train.checkpoint import CKPT_DIR, link_checkpoint, save_checkpoint, save_step_checkpoint
from mscl_stream.train.metrics import MetricsLogger, format_progress
from mscl_stream.train.plot import plot_run_or_warn
from mscl_stream.train.resume import RESUME_MAY_CHANGE, RESUME_MUST_MATCH, changed_settings, resume_point
from mscl_stream.train.rundir import RunDir, new_run_id, open_run_dir
from mscl_stream.train.signals import StopSignals, should_stop

log = logging.getLogger(__name__)


class TrainState(Protocol):
    """What a training loop gives the run so that it can checkpoint and resume it."""

    def position(self) -> dict:
        """Where the run stands, plain numbers (``{"step", "epoch", ...}``; ``"step"`` required). Two equal
        positions must mean the same state: ``last.pt`` then links the step file instead of a second write."""

    def state_dict(self) -> dict:
        """The state every rank shares (model, optimizer, ...); rank 0's is written."""

    def rank_state(self) -> dict:
        """This rank's own state (loader position, RNGs); every rank's is written, one entry per rank."""

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        """Restore a checkpoint: the whole file's content and this rank's entry of its ``"ranks"``."""


class Checkpointer:
    """Writes a :class:`TrainState` as a checkpoint; rank 0 writes, every rank contributes its rank state.

    A checkpoint holds ``{**state.state_dict(), "ranks": [rank_state of each rank], **state.position(),
    **meta}``. Writes are atomic (:func:`.checkpoint.save_checkpoint`); ``tag`` "step" writes
    ``step_<step>.pt`` and prunes to ``keep``, any other tag writes ``<tag>.pt``.
    """

    def __init__(self, out: Path, dist: DistInfo, keep: int, meta: dict) -> None:
        self.out, self.dist, self.keep, self.meta = out, dist, keep, meta
        self._step_file: tuple[dict, Path] | None = None     # (position, path) of the latest step file

    def save(self, tag: str, state: TrainState) -> Path | None:
        """Write checkpoint ``tag`` of ``state``; its path on rank 0, None on the others (collective)."""
        per_rank = all_gather_objects(state.rank_state())
        if not self.dist.is_main:
            return None
        pos = state.position()
        named = self.out / CKPT_DIR / f"{tag}.pt"
        if tag == "last" and self._step_file is not None and self._step_file[0] == pos and \
                link_checkpoint(self._step_file[1], named):
            return named      # the run ended on a step checkpoint: the same state, not written twice
        ckpt = {**state.state_dict(), "ranks": per_rank, **pos, **self.meta}
        if tag == "step":
            path = save_step_checkpoint(self.out, pos["step"], ckpt, keep=self.keep)
            self._step_file = (pos, path)
            return path
        return save_checkpoint(named, ckpt)


class Run:
    """A training run's folder, resume point, stop signals, checkpoints, metrics and progress.

    Args:
        cfg: the configuration; read here: ``train.out_dir``, ``resume``, ``overwrite``, ``seed``,
            ``keep_checkpoints``, ``log.tensorboard``, ``log.jsonl``.
        dist: this process's place in the job.
        name: what the progress bar counts steps of ("pretrain").
        must_match, may_change: config keys a resumed checkpoint must match, and those it may change
            with a warning (:mod:`.resume`; the defaults are pretraining's).
    """

    def __init__(self, cfg: Config, dist: DistInfo, *, name: str = "pretrain",
                 must_match: Sequence[str] = RESUME_MUST_MATCH, may_change: Sequence[str] = RESUME_MAY_CHANGE):
        self.cfg, self.dist, self.name = cfg, dist, name
        self.must_match, self.may_change = must_match, may_change
        self.out = Path(cfg.train.out_dir)
        self.folder: RunDir | None = None          # the locked folder (rank 0)
        self.signals = StopSignals()
        self.resume_path: Path | None = None       # the checkpoint this start continues from
        self.resume_state: dict | None = None      # its content, until begin()
        self.data_id: dict | None = None           # identity of the training data (manifest), if known
        self.run_id: str | None = None             # this run's id (rank 0)
        self.checkpointer: Checkpointer | None = None
        self.metrics: MetricsLogger | None = None
        self.progress: Progress | None = None

    # ---------------------------------------------------------------- before the loop
    def __enter__(self) -> "Run":
        """Check and lock the folder (rank 0; a refusal there stops every rank), then catch SIGINT/SIGTERM."""
        if self.cfg.train.overwrite and self.cfg.train.resume:
            raise UserError("train.overwrite: cannot be combined with --resume (overwrite starts the run anew)")
        err = None
        if self.dist.is_main:
            try:
                self.folder = open_run_dir(self.out, resume=bool(self.cfg.train.resume),
                                           overwrite=self.cfg.train.overwrite)
            except UserError as e:
                err = str(e)
        errors = [e for e in all_gather_objects(err) if e]
        if errors:
            release(self.dist)
            raise UserError(errors[0])
        self.signals.__enter__()
        return self

    def choose_resume(self, data_id: dict | None = None) -> Path | None:
        """Decide the resume point (``train.resume``) and this run's id; refuses a checkpoint that does not
        fit the config or ``data_id`` (UserError on every rank). Returns the checkpoint's path or None."""
        self.data_id = data_id
        self.resume_path, self.resume_state = resume_point(self.cfg, self.dist, self.folder, self.out, data_id,
                                                           must_match=self.must_match)
        if self.dist.is_main:
            self.run_id = (self.resume_state or {}).get("run_id") or new_run_id()
        return self.resume_path

    def restore(self, state: TrainState) -> None:
        """Load the resume point into ``state`` (nothing on a fresh start)."""
        st = self.resume_state
        if st is None:
            if self.cfg.train.resume == "auto" and self.dist.is_main:
                log.info("resume=auto: no checkpoint in %s, starting run %s", self.out, self.run_id)
            return
        if len(st["ranks"]) != self.dist.world_size:
            raise UserError(f"train.resume: checkpoint was written by {len(st['ranks'])} ranks, this run has "
                            f"{self.dist.world_size}; resume with the same number of processes")
        state.load_state_dict(st, st["ranks"][self.dist.rank])
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d), run %s", self.resume_path, st["step"], st["epoch"],
                     st.get("run_id", "(unrecorded)"))

    def begin(self, total: int, initial: int = 0) -> None:
        """Claim the folder for this run (run.json, config.yaml), open metrics and progress; the loop starts."""
        cfg, main = self.cfg, self.dist.is_main
        if main:   # the folder becomes this run's only now: a start that failed before left it empty
            self.folder.claim(self.run_id, cfg.train.seed, self.data_id)
            dump_config(cfg, self.out / "config.yaml")
        self.checkpointer = Checkpointer(self.out, self.dist, cfg.train.keep_checkpoints,
                                         {"config": to_dict(cfg), "run_id": self.run_id, "manifest": self.data_id})
        self.metrics = MetricsLogger(self.out, is_main=main, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl)
        if main and self.resume_state is not None:
            changed = changed_settings(self.resume_state, cfg, self.may_change)
            if changed:
                log.warning("resume: settings changed since the checkpoint: %s", "; ".join(changed))
                self.metrics.log({"step": initial, "run_id": self.run_id, "resume_changes": changed})
        self.resume_state = None                   # restored: the loop holds it now
        # a bar on a terminal (stderr), else the line report() passes at logged steps (stdout)
        self.progress = Progress(total, self.name, unit="step", initial=initial, interval=None,
                                 plain=lambda s: print(s, flush=True), enabled=main)

    # ---------------------------------------------------------------- during the loop
    def report(self, step: int, record: dict, *, rate: float, elapsed: float, notes: Sequence[str] = ()) -> None:
        """A logged step: ``record`` to the metrics, the progress line with ``rate`` (clips/s) and ``notes``."""
        self.metrics.log(record)
        line = format_progress(step, self.progress.total, elapsed, rate, start=self.progress.initial)
        self.progress.update(step, postfix=", ".join([f"{rate:.1f} clips/s", *notes]),
                             line=line + "".join(f" | {n}" for n in notes))

    def tick(self, step: int) -> None:
        """A step that is not logged: the bar moves (no line)."""
        self.progress.update(step)

    def should_stop(self, logged: bool) -> bool:
        """Whether SIGINT/SIGTERM asked to stop (agreed by all ranks at logged steps under DDP)."""
        return should_stop(self.signals, self.dist.world_size, logged, self.dist.device)

    def interrupted(self, step: int, path: Path | None) -> Interrupted:
        """The exception that ends a run stopped by a signal at ``step`` after writing checkpoint ``path``."""
        return Interrupted(f"stopped by {self.signals.name} at step {step}; checkpoint "
                           f"{path or self.out / CKPT_DIR} written (continue with --resume auto)", self.signals.number)

    def checkpoint(self, tag: str, state: TrainState) -> Path | None:
        """Write checkpoint ``tag`` ("step", "last", "diverged") of ``state`` (collective; path on rank 0)."""
        return self.checkpointer.save(tag, state)

    # ---------------------------------------------------------------- after the loop
    def finish(self, result: dict) -> None:
        """The final metrics record, then ``metrics.png`` (a failure to draw it only warns)."""
        self.metrics.log({"final": True, **result})
        self.metrics.close()
        if self.dist.is_main and self.cfg.log.jsonl:
            plot_run_or_warn(self.out)

    def __exit__(self, *exc) -> None:
        try:
            if self.progress is not None:
                self.progress.close()
            if self.metrics is not None:
                self.metrics.close()
            release(self.dist)
        finally:
            self.signals.__exit__(*exc)
            if self.folder is not None:
                self.folder.release()
