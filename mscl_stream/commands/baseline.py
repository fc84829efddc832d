"""The conventional loaders the benchmarks compare against (only ``mscl-stream bench --baselines``).

* :class:`PyAVDataLoader`: PyAV decode in ``data.decode_workers`` torch DataLoader worker processes,
  host collation, a copy to the device: what a typical PyTorch video pipeline does.
* :class:`PrecomputedFlowLoader`: the authors' pipeline. Flow is computed once for every frame pair
  (r, r + flow_gap) of every video and written to disk (float16 .npy per video); workers then decode
  the RGB frames with PyAV and read the flow of the sampled pairs back from disk, so the training step
  skips the flow network. Its disk footprint and one-off compute time are reported.

Both draw exactly the same samples as the streaming loader (same ClipSampler).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from mscl_stream.config import Config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.data.pyav_decode import decode_frames
from mscl_stream.data.sampler import ClipSampler, flow_steps, read_pretraining_manifest
from mscl_stream.machine import resolve_device

log = logging.getLogger(__name__)


class _Clips(torch.utils.data.Dataset):
    """Item ``i`` = the sampler's sample at position ``i`` of the current epoch, decoded by PyAV."""

    def __init__(self, sampler: ClipSampler, records: list[VideoRecord], size: tuple[int, int],
                 flow_dir: Path | None = None):
        self.sampler, self.records, self.size, self.flow_dir = sampler, records, size, flow_dir

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int):
        spec = self.sampler.spec(i)
        frames = decode_frames(self.records[spec.video_idx].path, spec.all_frames(), self.size, threads=1)
        idx = np.stack([spec.frame_idx_a, spec.frame_idx_b])
        partners = np.stack([spec.partner_idx_a, spec.partner_idx_b])
        flows = torch.empty(0)
        if self.flow_dir is not None:   # (2, F, 2, H, W) rows r - start of the video's flow file
            rec, steps = self.records[spec.video_idx], self.sampler.steps
            table = np.load(self.flow_dir / f"{spec.video_idx:06d}.npy", mmap_mode="r")
            flows = torch.from_numpy(np.stack([table[idx[0][steps] - rec.start], table[idx[1][steps] - rec.start]]))
        return (torch.from_numpy(frames), torch.from_numpy(idx), torch.from_numpy(partners),
                self.records[spec.video_idx].label, spec.video_idx, flows)


class PyAVDataLoader:
    """Iterable over ClipBatch on the device, fed by a torch DataLoader with PyAV workers.

    ``mp_context`` starts the workers ("forkserver": see the comment at the DataLoader; None: torch's
    default, fork on Linux).
    """

    def __init__(self, cfg: Config, records: list[VideoRecord], device: torch.device,
                 flow_dir: Path | None = None, mp_context: str | None = "forkserver"):
        d = cfg.data
        self.sampler = ClipSampler(records, d, seed=d.seed)
        self.t, self.steps, self.device, self.stats = d.frames_per_clip, torch.from_numpy(flow_steps(d)), device, {}
        self.loader = torch.utils.data.DataLoader(
            _Clips(self.sampler, records, tuple(d.frame_size), flow_dir), batch_size=d.batch_size, shuffle=False,
            num_workers=d.decode_workers, pin_memory=device.type == "cuda", drop_last=True,
            prefetch_factor=d.prefetch if d.decode_workers else None, persistent_workers=False,
            # forkserver, not fork: forked workers deadlocked in libswscale on an H100 (its slice-thread
            # pool, copied mid-use from a parent that had decoded with FFmpeg threads: the precomputed
            # baseline decodes every video in-process first); start-up cost only, outside steady state
            multiprocessing_context=mp_context if d.decode_workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        t, f, dev = self.t, len(self.steps), self.device
        for frames, idx, partners, labels, vids, flows in self.loader:
            x = frames.to(dev, non_blocking=True).permute(0, 1, 4, 2, 3)  # (B, 2T+2F, 3, H, W)
            flows = flows.to(dev, non_blocking=True) if flows.numel() else None
            yield ClipBatch(
                rgb_a=x[:, :t].contiguous(), rgb_b=x[:, t:2 * t].contiguous(),
                partner_rgb_a=x[:, 2 * t:2 * t + f].contiguous(), partner_rgb_b=x[:, 2 * t + f:].contiguous(),
                flow_steps=self.steps.to(dev), frame_idx_a=idx[:, 0].to(dev), frame_idx_b=idx[:, 1].to(dev),
                partner_idx_a=partners[:, 0].to(dev), partner_idx_b=partners[:, 1].to(dev),
                labels=labels.to(dev), video_idx=vids.to(dev),
                # contiguous, like the estimators' output that the flow-encode kernel normally gets
                flow_a=flows[:, 0].contiguous() if flows is not None else None,
                flow_b=flows[:, 1].contiguous() if flows is not None else None)


def pyav_dataloader(cfg: Config) -> PyAVDataLoader:
    return PyAVDataLoader(cfg, read_pretraining_manifest(cfg.data), resolve_device(cfg.train.device))


@torch.no_grad()
def precompute_flows(cfg: Config, records: list[VideoRecord], estimator, out_dir: Path, chunk: int = 256) -> dict:
    """Flow of every pair (r, r + flow_gap) of every video, wrapping inside [start, end) like the sampler.

    Writes ``out_dir/<row>.npy`` of shape (frames, 2, H, W) float16 per manifest row.

    Returns:
        {"videos", "pairs", "bytes", "seconds"}: what the authors' pipeline pays once, up front.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    size, gap = tuple(cfg.data.frame_size), cfg.data.flow_gap
    chunk = min(chunk, max((r.frame_end - r.start for r in records), default=1))
    t0, pairs, nbytes = time.perf_counter(), 0, 0
    for row, rec in enumerate(records):
        n = rec.frame_end - rec.start
        frames = torch.from_numpy(decode_frames(rec.path, np.arange(rec.start, rec.frame_end), size))
        frames = frames.permute(0, 3, 1, 2).to(estimator.device)
        parts = []
        for i in range(0, n, chunk):
            # every chunk has the same shape (the last one wraps to the video's first pairs): one
            # cuDNN autotune and one CUDA-graph capture in all, not one per video length
            src = torch.from_numpy(np.arange(i, i + chunk) % n).to(frames.device)
            parts.append(estimator(frames[src], frames[(src + gap) % n])[:min(chunk, n - i)])
        path = out_dir / f"{row:06d}.npy"
        np.save(path, torch.cat(parts).to(torch.float16).cpu().numpy())
        pairs, nbytes = pairs + n, nbytes + path.stat().st_size
        log.info("precomputed flow %d/%d: %s (%d pairs, %.1f s so far)", row + 1, len(records), rec.path, n,
                 time.perf_counter() - t0)
    return {"videos": len(records), "pairs": pairs, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def precomputed_flow_loader(cfg: Config, estimator, flow_dir: Path) -> tuple[PyAVDataLoader, dict]:
    """Precompute every video's flow into ``flow_dir``, then a loader that reads it back with the frames."""
    records = read_pretraining_manifest(cfg.data)      # the rows the streaming loader samples, in its order
    cost = precompute_flows(cfg, records, estimator, Path(flow_dir))
    return PyAVDataLoader(cfg, records, resolve_device(cfg.train.device), flow_dir=Path(flow_dir)), cost
