"""`mscl-stream flow-check`: run a flow estimator on a few frame pairs of a video and look at it.

Decodes ``pairs`` pairs (r, r + gap) spread evenly over the video with PyAV at the working size,
runs the estimator (and optionally a reference estimator), writes PNGs of both frames and the
colour-coded flows, reports the mean endpoint error against the reference, prints a summary and
writes ``flow_check.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator
from mscl_stream.machine import resolve_device

_RAFT = ("raft_small", "raft_large")


def _count_frames(path: Path) -> int:
    import av
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise UserError(f"{path} has no video stream")
            n = c.streams.video[0].frames
            if n > 0:
                return int(n)
            return sum(1 for _ in c.decode(video=0))   # containers without a frame count (webm)
    except av.error.FFmpegError as e:
        raise UserError(f"cannot open video {path}: {e}") from None


def _decode_frames_av(path: Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames at ``indices`` (decoded in order), resized by FFmpeg."""
    import av
    want = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    h, w = size
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                got[i] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
            if i >= want[-1]:
                break
    missing = [i for i in want if i not in got]
    if missing:
        raise UserError(f"{path}: could not decode frames {missing[:4]} (video shorter than its header says?)")
    return np.stack([got[i] for i in indices])


def _decode(path: Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    try:   # the data package's PyAV path (same colours and resize as the training loader)
        from mscl_stream.data.pyav_decode import decode_frames
    except ImportError:
        return _decode_frames_av(path, indices, size)
    try:
        return np.asarray(decode_frames(path, indices, size))
    except RuntimeError as e:     # its DecodeError: a damaged file or a short video
        raise UserError(f"cannot decode {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None


def _colour(flows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N,2,H,W) flow, (N,) display scale -> (N,3,H,W) uint8 colour-wheel images."""
    x = flows / (scale.view(-1, 1, 1, 1) + 1e-5)
    try:
        from mscl_stream.motion import flow_to_color
    except ImportError:
        from torchvision.utils import flow_to_image
        return torch.stack([flow_to_image(f) for f in x])
    return (flow_to_color(x) * 255).round().to(torch.uint8)


def _write_png(path: Path, chw_uint8: torch.Tensor) -> None:
    from PIL import Image      # a torchvision dependency
    tmp = path.with_suffix(".png.tmp")
    Image.fromarray(chw_uint8.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def _build(name: str, weights: str, device: torch.device):
    opts: dict = {"device": device}
    if name in _RAFT or weights not in ("", "none"):
        opts["weights"] = weights     # non-RAFT estimators reject it with a clear message
    return get_estimator(name, **opts)


def flow_check(video: str | Path, estimator: str = "raft_small", reference: str | None = None,
               out_dir: str | Path = "runs/flow-check", pairs: int = 4, gap: int = 8,
               size: tuple[int, int] = (128, 176), weights: str = "none", device: str = "auto") -> dict:
    """Run ``estimator`` on ``pairs`` frame pairs of ``video``; write PNGs and a JSON summary.

    Args:
        video: any file PyAV decodes.
        estimator, reference: registered names or "package.module:factory"; ``weights`` goes to
            the RAFT estimators among them.
        out_dir: created if needed; receives pair<i>_frames.png (a | b), pair<i>_<name>.png and
            flow_check.json.
        pairs, gap: pairs (r, r + gap), r spread evenly over [0, frames - 1 - gap].
        size: (H, W) working size the frames are resized to.
        device: "auto", "cpu", "cuda", ...

    Returns:
        The summary dict written to JSON (estimators' describe(), pair indices, mean |flow| per pair,
        seconds, and with a reference the mean EPE per pair and overall).
    """
    path = Path(video)
    if not path.is_file():
        raise UserError(f"video not found: {path}")
    if pairs < 1 or gap < 1:
        raise UserError(f"pairs and gap must be >= 1, got pairs={pairs}, gap={gap}")
    h, w = (int(s) for s in size)
    if h < 8 or w < 8:
        raise UserError(f"size must be at least 8x8, got {h}x{w}")
    n_frames = _count_frames(path)
    if n_frames <= gap:
        raise UserError(f"{path} has {n_frames} frames; a pair needs more than gap={gap}")
    starts = sorted(set(int(round(r)) for r in np.linspace(0, n_frames - 1 - gap, pairs)))
    frames = _decode(path, starts + [r + gap for r in starts], (h, w))
    dev = resolve_device(device)
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2).to(dev)     # (2P, 3, H, W) uint8
    frames_a, frames_b = batch[:len(starts)], batch[len(starts):]

    names = [estimator] + ([reference] if reference else [])
    results: dict[str, dict] = {}
    flows: dict[str, torch.Tensor] = {}
    for name in names:
        est = _build(name, weights, dev)
        est(frames_a[:1], frames_b[:1])                       # warm-up (allocations, autotuning)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        flow = est(frames_a, frames_b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        flows[name] = flow.float()
        mag = torch.linalg.vector_norm(flow.float(), dim=1)
        results[name] = {"describe": est.describe(), "seconds": seconds,
                         "mean_magnitude": mag.mean(dim=(1, 2)).tolist(),
                         "max_magnitude": mag.amax(dim=(1, 2)).tolist()}

    summary: dict = {"video": str(path), "frames": n_frames, "size": [h, w], "gap": gap,
                     "pairs": [[r, r + gap] for r in starts], "device": str(dev), "estimators": results}
    if reference:
        epe = torch.linalg.vector_norm(flows[estimator] - flows[reference], dim=1).mean(dim=(1, 2))
        summary["epe_vs_reference"] = {"reference": reference, "per_pair": epe.tolist(),
                                       "mean": float(epe.mean())}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one display scale per pair for all estimators, so their colours are comparable
    scale = torch.stack([torch.linalg.vector_norm(f, dim=1).amax(dim=(1, 2)) for f in flows.values()]).amax(0)
    for i, r in enumerate(starts):
        _write_png(out / f"pair{i}_frames.png", torch.cat([frames_a[i], frames_b[i]], dim=-1))
    for name, flow in flows.items():
        images = _colour(flow, scale)
        safe = name.replace(":", "_").replace("/", "_")
        for i in range(len(starts)):
            _write_png(out / f"pair{i}_{safe}.png", images[i])
    tmp = out / "flow_check.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "flow_check.json")
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path) -> None:
    print(f"flow-check: {s['video']} ({s['frames']} frames) at {s['size'][0]}x{s['size'][1]}, "
          f"{len(s['pairs'])} pairs with gap {s['gap']} on {s['device']}")
    for name, r in s["estimators"].items():
        mags = ", ".join(f"{m:.2f}" for m in r["mean_magnitude"])
        print(f"  {name:<12} weights={r['describe'].get('weights')}  {r['seconds'] * 1000:.1f} ms  "
              f"mean |flow| per pair: {mags} px")
    if "epe_vs_reference" in s:
        e = s["epe_vs_reference"]
        print(f"  mean EPE vs {e['reference']}: {e['mean']:.3f} px "
              f"(per pair: {', '.join(f'{x:.3f}' for x in e['per_pair'])})")
    print(f"  wrote PNGs and flow_check.json to {out}")
