"""What machine and library versions produced a number: recorded in every benchmark result."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys

import torch

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
