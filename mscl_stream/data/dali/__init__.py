"""DALI decode engines: which one a sample meets, and when DALI decodes at all.

The loader has two decode paths. This package is the DALI one; the other is PyAV
(:mod:`mscl_stream.data.pyav_decode`). :meth:`mscl_stream.data.loader.ClipLoader._route` picks one per
file with the helpers below (docs/data.md, "Choosing the decoder"):

* ``data.decoder: pyav``, DALI not installed, or a file DALI already failed on: PyAV.
* ``data.decoder: auto`` on CPU: DALI's CPU engines (FFmpeg inside DALI) for the codecs
  :func:`dali_can_decode` allows there (VP8, VP9, MJPEG); PyAV for every other codec.
* ``data.decoder: auto`` on a GPU: PyAV, frames uploaded to the GPU, unless the
  GPU's name starts with an entry of :data:`AUTO_DALI_ON_GPU` (a DALI engine measured at least
  :data:`AUTO_DALI_MIN_SPEEDUP` times PyAV's samples/s there); then NVDEC, with that entry's
  ``data.dali_mode`` in place of the configured one, for the codecs DALI decodes on a GPU (also H.264,
  HEVC, AV1, MPEG-4), and PyAV for the others.
* ``data.decoder: dali``: DALI (CPU engines on CPU, NVDEC on a GPU, the configured ``data.dali_mode``)
  for every file; a codec DALI cannot decode on that device is a one-line error, and so is DALI not
  being installed.
* At run time, whatever the setting: a sample whose DALI run fails is decoded again alone with
  ``fn.decoders.video``; if that fails too, PyAV decodes it and its file goes to PyAV from then on
  (a sample neither decodes is skipped).

PyAV runs in threads on CPU and in worker processes on a GPU host (``data.pyav_workers: auto``).

Which DALI engine decodes is ``data.dali_mode``:

* ``decoder`` (default): :class:`~mscl_stream.data.dali.decoder.DaliDecoder`, ``fn.decoders.video`` fed
  each sample's whole file and its sorted unique frames; CPU or GPU.
* ``reader``: :class:`~mscl_stream.data.dali.reader.DaliFrameReader`, ``fn.experimental.readers.video``
  over per-frame file lists (one decoder kept open along a sample's frames); CPU or GPU.
* ``legacy``: the same class with ``fn.readers.video``, one sequence per window; GPU only, and windows
  it cannot express (they wrap around the video's end) go to ``fn.decoders.video`` alongside.

Modules: :mod:`~mscl_stream.data.dali.pipeline` (what every engine shares: building and scheduling a
pipeline, errors, geometry, outputs to torch), :mod:`~mscl_stream.data.dali.decoder` and
:mod:`~mscl_stream.data.dali.reader` (the engines), :mod:`~mscl_stream.data.dali.source` (the loader's
look-ahead: samples submitted by epoch position, several batches early).
"""

from __future__ import annotations

import torch

from mscl_stream.data.probe import DALI_CPU_CODECS, DALI_GPU_CODECS

# FFmpeg decoder names that denote the same codec as the names DALI's tables use
_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "av1_cuvid": "av1", "h265": "hevc",
            "libvpx": "vp8", "libvpx-vp9": "vp9", "mpeg4video": "mpeg4"}

# data.decoder=auto on a GPU: DALI only on a GPU where benchmarks/nvdec_access.py (k400 profile, batch 64)
# measured a DALI variant at least AUTO_DALI_MIN_SPEEDUP times the samples/s of PyAV in one worker
# process per CPU core, with that variant's data.dali_mode. GPU name prefix -> mode; docs/data.md
# ("Choosing the decoder") holds the measurements behind each entry. No entry yet: the pipelined
# engines have not been measured on a GPU, and the synchronous path lost to PyAV there (benchmarks/README.md).
AUTO_DALI_ON_GPU: dict[str, str] = {}
AUTO_DALI_MIN_SPEEDUP = 1.2


def canonical_codec(codec: str) -> str:
    """Manifest codec name -> the name used in DALI's codec tables (lower case, aliases resolved)."""
    c = (codec or "").strip().lower()
    return _ALIASES.get(c, c)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_can_decode(codec: str, device: torch.device) -> bool:
    """Whether DALI 2.4 decodes ``codec`` on ``device`` (CPU: VP8/VP9/MJPEG; CUDA: also H.264, HEVC,
    AV1, MPEG-4) and DALI itself imports."""
    table = DALI_GPU_CODECS if device.type == "cuda" else DALI_CPU_CODECS
    return canonical_codec(codec) in table and dali_available()


def auto_dali_mode_on_gpu(gpu_name: str) -> str | None:
    """The ``data.dali_mode`` that ``data.decoder=auto`` uses on this GPU, or None for PyAV."""
    return next((m for prefix, m in AUTO_DALI_ON_GPU.items() if gpu_name.startswith(prefix)), None)
