"""Loading a configuration: YAML in, dotted overrides, type coercion and range checks up front.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load``, applies ``key.sub=value``
overrides (values parsed as YAML scalars), checks names, types and ranges against the dataclass tree
of :mod:`mscl_stream.config.schema`, and raises :class:`ConfigError` (a one-line message naming the
key) before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mscl_stream.config.schema import Config
from mscl_stream.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line naming the offending key."""


# Renamed keys: the old dotted name is refused with a line naming the new one.
RENAMED_KEYS = {"data.num_threads": "data.decode_workers"}


# Environment opt-in for "package.module:factory" estimators (FlowConfig.allow_import does the same).
ALLOW_IMPORT_ENV = "MSCL_STREAM_ALLOW_IMPORT"


# ----------------------------------------------------------------------------- conversion


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples where needed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value is False and "off" in typing.get_args(tp):
            value = "off"  # YAML 1.1 reads a bare `off` as false
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _number(key, value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


_FLOAT_RE = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$")


def _number(key: str, value: Any) -> float:
    """A finite float from a YAML number or a numeric string.

    PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string, not a float; users write it anyway,
    so a string that reads as a decimal number is accepted. ``.inf``/``.nan`` (and "inf"/"nan") are not.
    """
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        value = float(value.strip().replace("_", ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in RENAMED_KEYS:
            raise ConfigError(f"{key}: renamed to {RENAMED_KEYS[key]} (same meaning and value)")
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key + ".")
        elif isinstance(cur, dict) and isinstance(v, dict) and k == "weights":
            unknown = set(v) - set(cur)
            if unknown:
                raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown loss term (known: {', '.join(cur)})")
            cur.update({n: _coerce(f"{key}.{n}", w, float) for n, w in v.items()})
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def apply_override(cfg: Config, override: str) -> None:
    """Apply one ``key.sub=value`` override; the value is parsed as a YAML scalar/list."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides look like key.sub=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e.__class__.__name__})") from None
    nested: Any = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    _merge(cfg, nested)


def validate(cfg: Config, *, manifest: bool = True) -> Config:
    """Range and consistency checks; raises ConfigError naming the key.

    ``manifest=False`` skips the check that ``data.manifest`` exists: `index` writes that file.
    """
    d, a, f, m, o, t = cfg.data, cfg.augment, cfg.flow, cfg.model, cfg.optim, cfg.train

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(d.frames_per_clip >= 2, "data.frames_per_clip", "must be >= 2")
    need(d.frame_stride >= 1, "data.frame_stride", "must be >= 1")
    need(d.flow_gap >= 1, "data.flow_gap", "must be >= 1")
    need(d.max_shift >= 0 and d.max_shift % 2 == 0, "data.max_shift", "must be even and >= 0")
    need(d.clips_per_video >= 1, "data.clips_per_video", "must be >= 1")
    need(d.repeat_samples >= 1, "data.repeat_samples", "must be >= 1 (1 = off)")
    need(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(d.decode_workers >= 1, "data.decode_workers", "must be >= 1")
    need(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    need(d.mds_candidates >= 2, "data.mds_candidates", "must be >= 2 (candidate windows per sample)")
    h, w = d.frame_size
    need(h % 8 == 0 and w % 8 == 0, "data.frame_size", f"{h}x{w}: both sides must be multiples of 8 "
         f"(try {max(8, h // 8 * 8)}x{max(8, w // 8 * 8)})")
    if f.estimator.startswith("raft"):
        need(min(h, w) >= 128, "data.frame_size",
             f"{h}x{w} is below RAFT's 128 px minimum; use e.g. 128x176 (flow runs before the 112 crop)")
    need(a.out_size >= 8 and a.out_size <= min(h, w), "augment.out_size", f"must be in [8, {min(h, w)}]")
    need(0 < a.crop_area[0] <= a.crop_area[1] <= 1, "augment.crop_area", "needs 0 < lo <= hi <= 1")
    need(0 < a.crop_ratio[0] <= a.crop_ratio[1], "augment.crop_ratio", "needs 0 < lo <= hi")
    for k in ("flip_p", "jitter_p", "gray_p", "blur_p"):
        need(0.0 <= getattr(a, k) <= 1.0, f"augment.{k}", "must be a probability in [0, 1]")
    need(f.iters >= 1, "flow.iters", "must be >= 1")
    need(f.chunk_size >= 0, "flow.chunk_size", "must be >= 0")
    need(m.feat_dim >= 1, "model.feat_dim", "must be >= 1")
    need(m.rgb_width >= 1, "model.rgb_width", "must be >= 1 (64 = torchvision's r3d_18)")
    need(m.queue_size >= d.batch_size, "model.queue_size", f"must be >= data.batch_size ({d.batch_size})")
    need(0.0 <= m.momentum < 1.0, "model.momentum", "must be in [0, 1)")
    need(cfg.loss.temperature > 0, "loss.temperature", "must be > 0")
    for term, wt in cfg.loss.weights.items():
        need(wt >= 0, f"loss.weights.{term}", f"{wt}: must be >= 0 (0 disables the term)")
    need(any(v > 0 for v in cfg.loss.weights.values()), "loss.weights", "at least one term must be > 0")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(o.base_batch >= 1, "optim.base_batch", "must be >= 1")
    need(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = no clipping)")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(all(v >= 0 for v in a.jitter), "augment.jitter", "strengths must be >= 0")
    need(0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma", "needs 0 < lo <= hi")
    e = cfg.eval
    need(e.clips >= 1, "eval.clips", "must be >= 1")
    need(e.crops in (1, 3), "eval.crops", "must be 1 (centre) or 3 (ends and centre)")
    need(e.segments >= 0 and e.test_short_side >= 0 and e.test_crop >= 0, "eval.segments",
         "eval.segments, eval.test_short_side and eval.test_crop must be >= 0 (0 = not used / default)")
    need(e.epochs >= 1 and e.batch_size >= 1 and e.base_batch >= 1, "eval.epochs",
         "eval.epochs, eval.batch_size and eval.base_batch must be >= 1")
    need(e.lr > 0, "eval.lr", "must be > 0")
    need(e.weight_decay >= 0, "eval.weight_decay", "must be >= 0")
    need(e.clip_grad >= 0, "eval.clip_grad", "must be >= 0 (0 = no clipping)")
    need(e.max_steps >= 0, "eval.max_steps", "must be >= 0")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", "must be >= 0")
    need(t.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = keep every step file)")
    need(not (t.overwrite and t.resume), "train.overwrite", "cannot be combined with --resume (overwrite starts anew)")
    need(cfg.log.every >= 1, "log.every", "must be >= 1")
    need(":" not in f.estimator or f.allow_import or os.environ.get(ALLOW_IMPORT_ENV) == "1", "flow.estimator",
         f"{f.estimator!r} names code to import and run; allow it with flow.allow_import=true "
         f"(or {ALLOW_IMPORT_ENV}=1), or register the estimator by name (docs/reliability.md)")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"{t.device!r}: use auto, cpu, cuda or cuda:N")
    if manifest and d.manifest and "{split}" not in d.manifest:   # a {split} pattern: eval --splits checks each
        need(Path(d.manifest).is_file(), "data.manifest", f"{d.manifest}: no such file (run `mscl-stream index`)")
    if f.weights not in ("", "none") and ("/" in f.weights or f.weights.endswith((".pt", ".pth"))):
        need(Path(f.weights).is_file(), "flow.weights", f"{f.weights}: no such file")
    if t.resume not in ("", "auto"):
        need(Path(t.resume).is_file(), "train.resume", f"{t.resume}: no such file")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                check: bool = True, manifest: bool = True) -> Config:
    """Build a Config from defaults, an optional YAML file and dotted overrides, then validate it.

    ``check=False`` skips validation; ``manifest=False`` validates all but the existence of ``data.manifest``.
    """
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: {path}: no such file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"config: {path}: cannot read ({e.strerror or e})") from None
        _merge(cfg, data)
    for ov in overrides:
        apply_override(cfg, ov)
    return validate(cfg, manifest=manifest) if check else cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""
    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    """Inverse of :func:`to_dict` (no validation of files: used to read checkpoints)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
