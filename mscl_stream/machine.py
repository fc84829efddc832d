"""The machine: which device a run uses, and what machine and library versions produced a number."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys

import torch

from mscl_stream.errors import UserError

_LIBRARIES = ("torchvision", "numpy", "triton", "nvidia.dali", "kornia", "av", "cv2")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), falling back to ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict:
    """Date, platform, CPU, load, GPU (when ``device`` is CUDA or CUDA is present) and library versions."""
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": sys.version.split()[0], "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(), "torch": torch.__version__, "gpu": None}
    for mod in _LIBRARIES:
        try:   # optional dependencies may be absent on a given machine: record that, don't fail
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        index = dev.index if dev is not None and dev.index is not None else 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Map "auto"/None to CUDA when available (else CPU); validate explicit CUDA requests.

    Raises:
        UserError: CUDA requested but not available, or an unparsable device string.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev
