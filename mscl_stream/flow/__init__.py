"""Swappable in-batch optical flow: the estimator registry.

    from mscl_stream.flow import get_estimator, available_estimators
    est = get_estimator("raft_small", weights="raft_small.pth", iters=12, device="cuda")
    flow = est(frames_a, frames_b)   # (N,3,H,W) uint8/float [0,255] -> (N,2,H,W) float32, pixels

Names map to lazy factories (nothing heavy is imported until an estimator is built). Plug-ins add
names in two ways: ``register_estimator(name, factory)`` in code, or a package that declares an entry
point in the group ``mscl_stream.flow_estimators`` (``myflow = mypkg.flow:make_estimator`` in its
pyproject.toml), found by name once installed. A name of the form "package.module:factory" imports
``factory`` and calls it with the options; a config may use that form only with ``flow.allow_import:
true`` (or MSCL_STREAM_ALLOW_IMPORT=1), because it runs whatever code it names. Estimators not built in
are checked against the protocol (mscl_stream.flow.base) on a tiny input.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from typing import Any, Callable

from mscl_stream.errors import UserError
from mscl_stream.flow.base import FlowEstimator, validate_estimator

__all__ = ["FlowEstimator", "get_estimator", "available_estimators", "register_estimator",
           "estimator_from_config"]

# name -> ("module:attribute", fixed keyword options). Built-ins are imported only when asked for.
_BUILTIN: dict[str, tuple[str, dict[str, Any]]] = {
    "raft_small": ("mscl_stream.flow.raft:RAFT", {"model": "small"}),
    "raft_large": ("mscl_stream.flow.raft:RAFT", {"model": "large"}),
    "tvl1": ("mscl_stream.flow.tvl1:TVL1", {}),
    "dis_ultrafast": ("mscl_stream.flow.opencv:OpenCVFlow", {"method": "dis_ultrafast"}),
    "dis_fast": ("mscl_stream.flow.opencv:OpenCVFlow", {"method": "dis_fast"}),
    "dis_medium": ("mscl_stream.flow.opencv:OpenCVFlow", {"method": "dis_medium"}),
    "farneback": ("mscl_stream.flow.opencv:OpenCVFlow", {"method": "farneback"}),
    "dali_of": ("mscl_stream.flow.dali_hw:DALIOpticalFlow", {}),
    "zero": ("mscl_stream.flow.control:ZeroFlow", {}),   # control for ablations: no motion at all
}
# Estimators added at run time with register_estimator (validated when built).
_REGISTERED: dict[str, Callable[..., Any]] = {}
# Installed packages declare estimators here (importlib.metadata entry points; loaded only when built).
ENTRY_POINT_GROUP = "mscl_stream.flow_estimators"
_SPEC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plug-in estimators by name (reading metadata imports nothing)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_estimators() -> list[str]:
    """Registered names (built-ins and register_estimator additions), sorted.

    A name is listed whether or not its optional dependency (OpenCV, a GPU) is present here; building
    it then fails with a one-line error saying what is missing.
    """
    return sorted(set(_BUILTIN) | set(_REGISTERED) | set(_entry_points()))


def register_estimator(name: str, factory: Callable[..., Any] | str) -> None:
    """Add (or replace) an estimator name.

    Args:
        name: the name for get_estimator / the config's ``flow.estimator``; no ":" allowed.
        factory: a callable ``factory(**options) -> estimator``, or a "package.module:factory" string
            imported when the estimator is first built.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise UserError(f"estimator name must be a non-empty string without ':', got {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise UserError(f"factory for {name!r} must be callable or a 'package.module:factory' string")
    _REGISTERED[name] = factory


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not _SPEC_RE.match(spec):
        raise UserError(f"estimator {spec!r}: expected the form 'package.module:factory' (Python names)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"estimator {spec!r}: cannot import module {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"estimator {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"estimator {spec!r}: {attr!r} is not callable")
    return obj


def _call_factory(label: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    try:
        return factory(**options)
    except UserError:
        raise
    except TypeError as e:   # usually a wrong keyword option
        raise UserError(f"estimator {label!r}: bad options {sorted(options)}: {e}") from None


def get_estimator(name: str, *, validate: bool | None = None, allow_import: bool = True,
                  **options: Any) -> FlowEstimator:
    """Build a flow estimator by name.

    Args:
        name: a name from :func:`available_estimators` (built in, registered, or an installed plug-in's
            entry point) or "package.module:factory".
        validate: run the protocol check on a tiny input (default: only for estimators not built in).
        allow_import: whether a "package.module:factory" name may be imported (code calling this
            function may; a config only with ``flow.allow_import``, see :func:`estimator_from_config`).
        **options: estimator options, e.g. ``weights``, ``iters``, ``precision``, ``device``,
            ``chunk_size`` for RAFT (see each estimator's docstring).

    Raises:
        UserError: unknown name (the message lists the known ones), an import failure, a bad option or
            a factory whose result breaks the protocol.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"flow estimator name must be a non-empty string, got {name!r}")
    builtin = False
    if name in _REGISTERED:
        factory = _REGISTERED[name]
        if isinstance(factory, str):
            factory = _import_factory(factory)
    elif name in _BUILTIN:
        spec, fixed = _BUILTIN[name]
        factory = _import_factory(spec)
        clash = sorted(set(fixed) & set(options))
        if clash:
            raise UserError(f"estimator {name!r} fixes option(s) {', '.join(clash)}; choose another name instead")
        options = {**fixed, **options}
        builtin = True
    elif name in (plugins := _entry_points()):
        try:
            factory = plugins[name].load()
        except Exception as e:   # an installed plug-in that fails to import: one line, naming it
            raise UserError(f"estimator {name!r} (entry point {plugins[name].value!r}): cannot load it: "
                            f"{type(e).__name__}: {e}") from None
    elif ":" in name:
        if not allow_import:
            raise UserError(f"estimator {name!r} names code to import and run; allow it with "
                            f"flow.allow_import=true (or MSCL_STREAM_ALLOW_IMPORT=1), or register it by name")
        factory = _import_factory(name)
    else:
        raise UserError(f"unknown flow estimator {name!r}; known: {', '.join(available_estimators())} "
                        f"(or 'package.module:factory')")
    est = _call_factory(name, factory, options)
    if validate if validate is not None else not builtin:
        validate_estimator(est, name)
    return est


def estimator_from_config(flow_cfg: Any, device: str = "auto") -> FlowEstimator:
    """Build the estimator a :class:`mscl_stream.config.FlowConfig` describes.

    Options that are still at their FlowConfig defaults are not passed to non-RAFT estimators (so
    ``flow.estimator: dis_fast`` works without clearing RAFT's knobs); options set explicitly are
    passed, and an estimator that does not take one says so. ``flow.options`` is passed verbatim.
    """
    from mscl_stream.config import FlowConfig

    defaults = FlowConfig()
    knobs = ("weights", "iters", "precision", "compile", "cuda_graph", "chunk_size")
    raft = flow_cfg.estimator in ("raft_small", "raft_large")
    options: dict[str, Any] = {}
    for key in knobs:
        value = getattr(flow_cfg, key)
        if raft or value != getattr(defaults, key):
            options[key] = value
    options.update(dict(flow_cfg.options or {}))
    options["device"] = device
    allow = bool(getattr(flow_cfg, "allow_import", False)) or os.environ.get("MSCL_STREAM_ALLOW_IMPORT") == "1"
    return get_estimator(flow_cfg.estimator, allow_import=allow, **options)

