"""One upload per step: every view's parameter table (and subset row lists) to the device as one copy.

Pinned host memory and ``non_blocking`` on CUDA, so the host never waits on the device; nothing is read
back. The table's columns are :mod:`mscl_stream.augment.params`'s ``COL_*`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mscl_stream.augment.params import VIEW_COLS, AugmentParams, param_table, subset_rows


def upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host array to the device as ONE copy: pinned host memory and ``non_blocking`` on CUDA (no sync).

    The pinned block is returned to PyTorch's caching host allocator only after the copy has run, so it
    is never overwritten in flight.
    """
    host = np.ascontiguousarray(host, dtype=np.float32)
    if device.type == "cuda":
        src = torch.empty(host.shape, dtype=torch.float32, pin_memory=True)
        src.numpy()[...] = host
    else:
        src = torch.from_numpy(host)
    return torch.empty(host.shape, dtype=torch.float32, device=device).copy_(src, non_blocking=True)


@dataclass
class UploadedView:
    """One view's parameters on the device (see :func:`upload_views`).

    table: (B, VIEW_COLS) float32 device view of the uploaded parameter table; rows / spans: the subset
    row lists (device long) and their host-side (start, end) spans (torch path only, else None).
    """

    table: torch.Tensor
    rows: torch.Tensor | None
    spans: dict | None


def upload_views(params: list[AugmentParams], extra: np.ndarray | None, device: torch.device,
                 subsets: bool) -> tuple[list[UploadedView], torch.Tensor | None]:
    """Every view's parameters (and ``extra`` (B,) per-clip values, e.g. FRA angles) in ONE upload.

    Layout of the uploaded float32 buffer: the (B, V * VIEW_COLS [+ 1]) table, then with ``subsets``
    the row lists of every view (exact as float32 below 2**24).

    Returns:
        one UploadedView per view, and ``extra`` as a (B,) device view (None without it).
    """
    b = params[0].boxes.shape[0]
    cols = [param_table(p) for p in params] + ([extra.reshape(b, 1).astype(np.float32)] if extra is not None else [])
    table = np.concatenate(cols, axis=1)
    parts, row_info = [table.ravel()], []
    if subsets:
        at = table.size
        for p in params:
            rows, spans = subset_rows(p)
            parts.append(rows.astype(np.float32))
            row_info.append((at, at + rows.size, spans))
            at += rows.size
    buf = upload(np.concatenate(parts), device)
    dev_table = buf[:table.size].view(b, table.shape[1])
    views = []
    for v, p in enumerate(params):
        rows = spans = None
        if subsets:
            lo, hi, spans = row_info[v]
            rows = buf[lo:hi].long()
        views.append(UploadedView(dev_table[:, v * VIEW_COLS:(v + 1) * VIEW_COLS], rows, spans))
    return views, (dev_table[:, -1] if extra is not None else None)
