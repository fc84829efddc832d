"""Checkpoints: atomic save, safe load (``weights_only=True``), latest-file lookup, RNG capture.

A checkpoint is one ``torch.save`` file holding a plain dict. Because it is read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling), the state may only contain tensors, dicts,
lists, tuples, numbers, strings, bools and None: model/optimizer ``state_dict()``s, the resolved config as
``config.to_dict(cfg)``, the sampler state as plain types, and RNG states from :func:`rng_state`.
:func:`save_checkpoint` checks this before writing, so a bad state fails at save time, not at resume.

Layout of a run's checkpoints (``--resume auto`` relies on it)::

    <out_dir>/checkpoints/step_00000500.pt     periodic saves, zero-padded step (prune_checkpoints keeps k)
    <out_dir>/checkpoints/last.pt              the end of a run
    <out_dir>/checkpoints/diverged.pt          written before stopping on NaN losses; never auto-resumed

A run (:class:`mscl_stream.train.run.Checkpointer`) writes step files through
:func:`save_step_checkpoint` (which prunes to ``train.keep_checkpoints``) and ``--resume auto`` uses
:func:`find_resumable` (this run's newest loadable file). Temporary files of an interrupted write
(``.<name>.tmp-<pid>``) are removed by the next run that takes the folder's lock (``train/rundir.py``).

Errors a user can cause (missing, corrupt or truncated file, a checkpoint from another model or config)
are one-line :class:`UserError`\\ s; a mismatch never silently starts training from scratch.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")

LAST_NAME = "last.pt"
_SCALARS = (int, float, bool, str, type(None))


# ----------------------------------------------------------------------------- save / load


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, (torch.Tensor, *_SCALARS, torch.dtype, torch.Size)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state {where}: key {k!r} is a {type(k).__name__} (use str/int)")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint state {where}: {type(obj).__name__} cannot be loaded with weights_only=True "
                    "(convert to tensors, dicts, lists, numbers or strings)")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the previous file or the new one, never a partial file under
    ``path``. Raises TypeError (a programming error) if the state holds objects ``weights_only`` loading
    would refuse.
    """
    path = Path(path)
    _check_plain(dict(state), "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:      # disk full, quota, permissions: torch reports some as RuntimeError
        tmp.unlink(missing_ok=True)
        free = _free_gb(path.parent)
        raise UserError(f"cannot write checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        f" ({free:.1f} GB free there); the previous checkpoint is intact") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def link_checkpoint(src: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Make ``path`` name the same file as ``src`` (a hard link, swapped in atomically); False if not possible.

    The end of a run whose last step was also a step checkpoint writes nothing twice this way. On a
    filesystem without hard links, or if ``src`` is gone, the caller writes the file instead.
    """
    src, path = Path(src), Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _fsync_dir(path.parent)
    return True


def _tmp_path(path: Path) -> Path:
    """Where ``path`` is prepared before its atomic rename; the dot prefix keeps half-written files out of
    list_checkpoints' step_*.pt pattern."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _free_gb(folder: Path) -> float:
    try:
        st = os.statvfs(folder)
    except OSError:
        return float("nan")
    return st.f_bavail * st.f_frsize / 2**30


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible on every platform, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check it.

    Args:
        path: the ``.pt`` file.
        expect: dotted key -> required value, e.g. ``{"format": 1, "config.model": {...}}``; each key
            is looked up through nested dicts of the state. A missing key or a different value raises.
        map_location: where tensors land (default CPU; move them after loading).

    Raises:
        UserError: missing/corrupt/truncated file, not a dict, or an ``expect`` mismatch (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle/EOF/RuntimeError variants all mean "unreadable"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: not a readable checkpoint (corrupt or truncated? {type(e).__name__}: "
                        f"{first})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(state).__name__}, expected a dict)")
    check_expect(state, expect or {}, path)
    return state


def check_expect(state: Mapping[str, Any], expect: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise a one-line UserError at the first ``expect`` key whose value in ``state`` differs."""
    for key, want in expect.items():
        got = _lookup(state, key)
        if got is _MISSING:
            raise UserError(f"{path}: checkpoint has no {key!r} (saved by another version or program?)")
        diff = _first_difference(got, want, key)
        if diff:
            raise UserError(f"{path}: checkpoint does not match the current run: {diff}")


def differences(got: Any, want: Any, key: str) -> list[str]:
    """Every differing leaf between two nested dicts (for warnings), as ``key: old -> new``."""
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        out = []
        for k in sorted(set(got) | set(want), key=str):
            out += differences(got.get(k, _MISSING), want.get(k, _MISSING), f"{key}.{k}")
        return out
    if got is _MISSING or want is _MISSING or _first_difference(got, want, key):
        show = lambda v: "(none)" if v is _MISSING else _short(v)  # noqa: E731
        return [f"{key}: {show(got)} -> {show(want)}"]
    return []


_MISSING = object()


def _lookup(state: Mapping, dotted: str) -> Any:
    cur: Any = state
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _first_difference(got: Any, want: Any, key: str) -> str:
    """'' when equal, else a short description of the first differing leaf (recurses into dicts/lists)."""
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        for k in sorted(set(got) | set(want), key=str):
            if k not in got:
                return f"{key}.{k} missing in the checkpoint (current: {_short(want[k])})"
            if k not in want:
                return f"{key}.{k} is {_short(got[k])} in the checkpoint but unknown to the current run"
            d = _first_difference(got[k], want[k], f"{key}.{k}")
            if d:
                return d
        return ""
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)) and len(want) == len(got):
        for i, (g, w) in enumerate(zip(got, want)):
            d = _first_difference(g, w, f"{key}[{i}]")
            if d:
                return d
        return ""
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        same = (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
                and want.shape == got.shape and torch.equal(want.cpu(), got.cpu()))
    else:
        same = got == want
    return "" if same else f"{key} is {_short(got)} in the checkpoint, {_short(want)} now"


def _short(v: Any) -> str:
    s = f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def expect_from_config(cfg_dict: Mapping[str, Any], keys: Iterable[str]) -> dict:
    """``expect`` mapping for :func:`load_checkpoint` from the current ``config.to_dict(cfg)``.

    ``keys`` are dotted config paths ("model", "data.frames_per_clip"); the checkpoint is expected to
    hold the resolved config under "config", so the result maps "config.<key>" -> current value.
    """
    out = {}
    for key in keys:
        v = _lookup(cfg_dict, key)
        if v is _MISSING:
            raise KeyError(f"{key}: not a key of the config")
        out[f"config.{key}"] = v
    return out


def load_model_state(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """``module.load_state_dict(strict=True)`` with a one-line UserError instead of torch's long message.

    Names the counts and one example each of missing keys, unexpected keys and shape mismatches (a
    checkpoint of a different architecture or width).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"{what}: checkpoint does not match the architecture: " + ", ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- files of a run


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``<out_dir>/checkpoints/step_<step:08d>.pt``."""
    return Path(out_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the run's step files, oldest first (temporary files are ignored)."""
    folder = Path(out_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resumable(out_dir: str | os.PathLike, run_id: str | None,
                   map_location: str | torch.device = "cpu") -> tuple[Path, dict] | tuple[None, None]:
    """``--resume auto``: the newest checkpoint of run ``run_id`` that loads, with its state.

    Candidates are ``last.pt`` and the step files, newest written first. A file that does not load
    (truncated, corrupt) or that another run wrote (its ``run_id`` differs, or it has none while
    ``run_id`` is set) is passed over with a warning, never resumed. ``diverged.pt`` is never picked.
    Returns (None, None) when nothing qualifies.
    """
    cands = [p for _, p in list_checkpoints(out_dir)]
    last = Path(out_dir) / CKPT_DIR / LAST_NAME
    if last.is_file():
        cands.append(last)
    cands.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in cands:
        try:
            state = load_checkpoint(p, map_location=map_location)
        except UserError as e:
            log.warning("resume auto: skipping %s: %s", p.name, e)
            continue
        if run_id is not None and state.get("run_id") != run_id:
            log.warning("resume auto: skipping %s: written by run %s, this folder's run is %s", p.name,
                        state.get("run_id", "(none recorded)"), run_id)
            continue
        return p, state
    return None, None


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step files (``keep <= 0`` keeps all); returns what was deleted.

    Call it on the main rank after each periodic save; ``last.pt``/``diverged.pt`` are not touched.
    """
    if keep <= 0:
        return []
    old = [p for _, p in list_checkpoints(out_dir)[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def save_step_checkpoint(out_dir: str | os.PathLike, step: int, state: Mapping[str, Any],
                         keep: int = 3) -> Path:
    """Save ``state`` as the step file of ``step``, then :func:`prune_checkpoints` to ``keep``."""
    path = save_checkpoint(checkpoint_path(out_dir, step), state)
    prune_checkpoints(out_dir, keep)
    return path


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's RNG states (python ``random``, numpy global, torch CPU, current CUDA device).

    Everything is a tensor or a plain number so it survives ``weights_only`` loading. Only the current
    CUDA device is captured (and only if CUDA is initialised): each rank owns one device, and touching the
    others would create contexts on them. In DDP gather one dict per rank (``distributed.all_gather_objects``).
    """
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (a missing CUDA entry leaves CUDA's RNG alone)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npd = state["numpy"]
    np.random.set_state((npd["name"], npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"],
                         npd["gauss"]))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))
