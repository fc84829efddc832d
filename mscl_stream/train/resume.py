"""Resuming a pretrain run: which checkpoint to continue from, and whether the run may continue from it.

Rank 0 chooses the checkpoint (``train.resume``: a path, or ``auto`` for this folder's run's newest
loadable one) and every rank loads the same file. Settings that define the run must match the
checkpoint (:data:`RESUME_MUST_MATCH`) and so must the manifest's content, or the resume is refused
with a one-line error; settings a resumed run may change (:data:`RESUME_MAY_CHANGE`) are reported.
The policy is described in docs/reliability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mscl_stream.config import Config, to_dict
from mscl_stream.distributed import all_gather_objects, release
from mscl_stream.errors import UserError
from mscl_stream.train.checkpoint import (check_expect, differences, expect_from_config, find_resumable,
                                          list_checkpoints, load_checkpoint)

log = logging.getLogger("mscl_stream.train.run")   # the run's messages, under the run machinery's name

# Settings that define the run must match the checkpoint, or the resume is refused; the manifest's
# content (SHA-256) must match too.
RESUME_MUST_MATCH = ("data.frames_per_clip", "data.frame_stride", "data.flow_gap", "data.flow_frames",
                     "data.batch_size", "data.frame_size", "data.mds", "augment.out_size", "model", "loss",
                     "flow.estimator", "flow.weights", "flow.iters", "flow.options", "train.seed")
# Settings a resumed run may change (lowering the learning rate after a spike, extending the schedule):
# each change is logged as a warning and recorded in the metrics.
RESUME_MAY_CHANGE = ("optim", "train.epochs", "train.max_steps", "augment", "data.manifest", "data.split")


def resume_point(cfg: Config, dist, run, out: Path, manifest_id: dict | None,
                 must_match: Sequence[str] = RESUME_MUST_MATCH) -> tuple[Path | None, dict | None]:
    """(checkpoint path, its state) every rank resumes from, or (None, None) for a fresh start.

    Rank 0 decides (``run`` is its locked run folder) and the others load the file it chose; a refusal
    on rank 0 stops every rank with the same one-line UserError. The checkpoint's config must equal
    ``cfg`` at the ``must_match`` keys.
    """
    chosen, state, refusal = None, None, None
    if dist.is_main and cfg.train.resume:
        try:
            chosen, state = _choose_checkpoint(cfg, run, out)
        except UserError as e:
            refusal = str(e)
    decided = all_gather_objects((str(chosen) if chosen else None, refusal))[0]
    if decided[1]:
        release(dist)
        raise UserError(decided[1])
    ckpt_path = Path(decided[0]) if decided[0] else None
    if ckpt_path is not None:
        if state is None:                 # other ranks read the file rank 0 chose
            state = load_checkpoint(ckpt_path)
        check_expect(state, expect_from_config(to_dict(cfg), must_match), ckpt_path)
        if dist.is_main:
            _check_resume_data(state, manifest_id, ckpt_path)
    return ckpt_path, state


def changed_settings(state: dict, cfg: Config, may_change: Sequence[str] = RESUME_MAY_CHANGE) -> list[str]:
    """The ``may_change`` settings that differ from the checkpoint's, one line each."""
    return [d for k in may_change for d in differences(_get(state["config"], k), _get(to_dict(cfg), k), k)]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def _choose_checkpoint(cfg: Config, run, out: Path) -> tuple[Path, dict] | tuple[None, None]:
    """(path, state) this start resumes from (main rank), or (None, None): fresh; UserError if unsafe."""
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        st = load_checkpoint(path)
        theirs = st.get("run_id")
        if run.previous_run_id and theirs != run.previous_run_id:
            raise UserError(f"train.resume: {path} belongs to run {theirs or '(unrecorded)'}, but "
                            f"{out} holds run {run.previous_run_id}; resume into that run's own folder or an "
                            f"empty train.out_dir")
        return path, st
    path, st = find_resumable(out, run.previous_run_id)
    if path is None and (list_checkpoints(out) or (out / "checkpoints" / "last.pt").is_file()):
        raise UserError(f"train.resume=auto: {out} holds checkpoints, but none of run "
                        f"{run.previous_run_id or '(unrecorded)'} that loads (see the warnings); use "
                        f"--resume PATH, --overwrite, or another train.out_dir")
    return path, st


def _check_resume_data(state: dict, manifest_id: dict | None, path: Path) -> None:
    """Refuse a resume whose manifest content differs from the checkpoint's (same size is not enough)."""
    theirs = state.get("manifest")
    if manifest_id is None or not theirs:
        if manifest_id is not None:
            log.warning("resume: %s records no manifest identity (older checkpoint): data not compared", path)
        return
    if theirs.get("sha256") != manifest_id["sha256"]:
        raise UserError(f"data.manifest: {manifest_id['path']} ({manifest_id['bytes']} bytes) is not the "
                        f"manifest {path.name} was trained on ({theirs.get('path')}, {theirs.get('bytes')} bytes, "
                        f"different SHA-256); resume with that manifest or start a new run")
    if theirs.get("path") != manifest_id["path"]:
        log.info("resume: same manifest content at a new path (%s, was %s)", manifest_id["path"], theirs.get("path"))
