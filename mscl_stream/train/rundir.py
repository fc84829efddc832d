"""A run directory owns one run: a lock, a run id, refusal to mix runs, stale leftovers removed.

Layout of ``train.out_dir`` (see docs/reliability.md)::

    .lock            {"pid", "host", "start_ticks", "run_id", "since"} while a process trains here
    run.json         {"run_id", "created", "seed", "manifest": identity} of the run this folder holds
    config.yaml      the resolved config of the latest start (fresh or resumed)
    metrics.jsonl    one JSON object per logged step, each with "run_id"
    metrics.png      the run's picture, written at the end (`mscl-stream plot`)
    checkpoints/     step_*.pt (the last train.keep_checkpoints), last.pt, diverged.pt

:func:`open_run_dir` checks everything a user can get wrong about the folder before any expensive work
(a file in its place, no write permission, a pseudo file system, ``checkpoints`` being a file, another
live run holding the lock, an earlier run without ``--resume``/``--overwrite``) and raises a one-line
:class:`UserError`. The lock is released by :meth:`RunDir.release` (:class:`mscl_stream.train.run.Run`
calls it on every exit) and, should that never run (kill -9), recognised as stale by the next start:
same host, and the PID is gone or belongs to a process started at another time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_NAME = "run.json"
CKPT_DIR = "checkpoints"
# What a run writes; --overwrite removes exactly these (anything else in the folder is left alone).
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "metrics.png", "tb", CKPT_DIR)


def _start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:   # the command name (field 2) may hold spaces: split after its closing parenthesis
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    """Whether process ``pid`` still runs and is the same process (start time) that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                          # exists, owned by someone else
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def manifest_identity(path: str | os.PathLike) -> dict:
    """What identifies a manifest's content: resolved path, size in bytes, SHA-256 of the bytes."""
    p = Path(path).resolve()
    data = p.read_bytes()
    return {"path": str(p), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<8 hex>``: sorts by start time, unique across hosts."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


@dataclass
class RunDir:
    """An opened run folder. ``run_id`` is None until :meth:`claim` (fresh) or adopted from run.json."""

    path: Path
    lock_path: Path
    previous_run_id: str | None     # the run this folder held when opened (from run.json), if any
    run_id: str | None = None
    _held: bool = True

    @property
    def checkpoints(self) -> Path:
        return self.path / CKPT_DIR

    def claim(self, run_id: str, seed: int, manifest: dict | None) -> None:
        """Record ``run_id`` as this folder's run (run.json, atomic) and in the lock."""
        self.run_id = run_id
        info = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": seed,
                "manifest": manifest}
        old = self.path / RUN_NAME
        if old.is_file() and self.previous_run_id == run_id:
            try:
                info["created"] = json.loads(old.read_text()).get("created", info["created"])
            except (OSError, ValueError):
                pass
        _write_atomic(self.path / RUN_NAME, json.dumps(info, indent=1) + "\n")
        _write_atomic(self.lock_path, json.dumps({**_lock_owner(), "run_id": run_id}) + "\n")

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self._held:
            return
        self._held = False
        try:
            owner = json.loads(self.lock_path.read_text())
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.lock_path.unlink()
        except (OSError, ValueError):
            pass


def _lock_owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _acquire(lock: Path) -> None:
    """Create ``lock`` atomically (link of a complete temp file); take over a stale one; else refuse."""
    tmp = lock.with_name(f".lock.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_lock_owner()) + "\n")
    except OSError as e:
        raise UserError(f"train.out_dir: {lock.parent}: cannot write there ({_why(e)})") from None
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)          # atomic; fails if a lock exists
                return
            except FileExistsError:
                pass
            except OSError as e:
                raise UserError(f"train.out_dir: {lock.parent}: cannot create the run lock ({_why(e)})") from None
            try:
                owner = json.loads(lock.read_text())
            except FileNotFoundError:
                continue                    # released meanwhile: try again
            except (OSError, ValueError):
                owner = {}
            host, pid = owner.get("host"), owner.get("pid")
            stale = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid, owner.get("start_ticks"))
            if not stale:
                who = (f"process {pid} on {host}" if pid else "an unknown process")
                raise UserError(f"train.out_dir: {lock.parent} is in use by {who} (run "
                                f"{owner.get('run_id', '?')}, since {owner.get('since', '?')}); use another "
                                f"train.out_dir, or delete {lock} if that process is gone")
            log.warning("removing the stale lock of process %s (no longer running) in %s", pid, lock.parent)
            lock.unlink(missing_ok=True)
        raise UserError(f"train.out_dir: {lock.parent}: could not take the run lock (contended)")
    finally:
        tmp.unlink(missing_ok=True)


def _previous_run_id(out: Path) -> str | None:
    p = out / RUN_NAME
    if not p.is_file():
        return None
    try:
        rid = json.loads(p.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return rid if isinstance(rid, str) else "unknown"


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete half-written checkpoint files (``.<name>.tmp-<pid>``) left by a killed process."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.warning("removed %d stale temporary checkpoint file(s) in %s (a write was interrupted)",
                    len(removed), folder)
    return removed


def open_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunDir:
    """Check and lock ``out_dir`` for one run (main rank only); raises UserError naming the problem.

    Args:
        out_dir: ``train.out_dir``.
        resume: the run continues from a checkpoint (``--resume``): an earlier run in the folder is allowed.
        overwrite: replace an earlier run: its files (:data:`RUN_FILES`) are deleted once the lock is held.

    Returns:
        The locked :class:`RunDir` (call ``release()`` on every exit path).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.out_dir: {out} exists and is not a folder")
    try:
        resolved = out.resolve()
    except OSError as e:
        raise UserError(f"train.out_dir: {out}: {_why(e)}") from None
    if resolved.parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise UserError(f"train.out_dir: {out} is on a pseudo file system ({'/' + resolved.parts[1]}); "
                        "choose a folder on a disk")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"train.out_dir: {out}: a parent is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"train.out_dir: {out}: cannot create it ({_why(e)})") from None
    ck = out / CKPT_DIR
    if ck.exists() and not ck.is_dir():
        raise UserError(f"train.out_dir: {ck} is a file; checkpoints need a folder there")
    lock = out / LOCK_NAME
    _acquire(lock)
    rd = RunDir(path=out, lock_path=lock, previous_run_id=_previous_run_id(out))
    try:
        # an empty checkpoints/ (left by a start that failed before training) does not make a run
        others = sorted(p.name for p in out.iterdir()
                        if p.name != LOCK_NAME and not (p.name.startswith(".") and ".tmp-" in p.name)
                        and not (p == ck and p.is_dir() and not any(ck.iterdir())))
        if others and not resume:
            if not overwrite:
                held = (f"run {rd.previous_run_id}" if rd.previous_run_id
                        else f"{len(others)} entries ({', '.join(others[:3])})")
                raise UserError(f"train.out_dir: {out} already holds {held}; continue it with --resume auto, "
                                f"replace it with --overwrite (train.overwrite=true), or choose another folder")
            for name in RUN_FILES:
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            log.warning("overwrite: removed the files of run %s in %s", rd.previous_run_id or "?", out)
            rd.previous_run_id = None
        ck.mkdir(exist_ok=True)
        probe = ck / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        remove_stale_temp_files(ck)
    except OSError as e:
        rd.release()
        raise UserError(f"train.out_dir: {out}: cannot write there ({_why(e)})") from None
    except BaseException:
        rd.release()
        raise
    return rd
