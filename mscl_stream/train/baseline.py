"""The conventional loader the benchmarks compare against: PyAV decode in torch DataLoader workers.

It draws exactly the same samples as the streaming loader (same ClipSampler), decodes them with PyAV in
``data.num_threads`` worker processes, collates on the host and copies each batch to the device, i.e.
what a typical PyTorch video pipeline does. Only ``mscl-stream bench --baselines`` uses it.
"""

from __future__ import annotations

import numpy as np
import torch

from mscl_stream.config import Config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.data.manifest import VideoRecord, read_manifest
from mscl_stream.data.pyav_decode import decode_frames
from mscl_stream.data.sampler import ClipSampler, flow_steps
from mscl_stream.train.step import resolve_device


class _Clips(torch.utils.data.Dataset):
    """Item ``i`` = the sampler's sample at position ``i`` of the current epoch, decoded by PyAV."""

    def __init__(self, sampler: ClipSampler, records: list[VideoRecord], size: tuple[int, int]):
        self.sampler, self.records, self.size = sampler, records, size

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int):
        spec = self.sampler.spec(i)
        frames = decode_frames(self.records[spec.video_idx].path, spec.all_frames(), self.size, threads=1)
        idx = np.stack([spec.frames_a, spec.frames_b])
        partners = np.stack([spec.partners_a, spec.partners_b])
        return (torch.from_numpy(frames), torch.from_numpy(idx), torch.from_numpy(partners),
                self.records[spec.video_idx].label, spec.video_idx)


class PyAVDataLoader:
    """Iterable over ClipBatch on the device, fed by a torch DataLoader with PyAV workers."""

    def __init__(self, cfg: Config, records: list[VideoRecord], device: torch.device):
        d = cfg.data
        self.sampler = ClipSampler(records, d, seed=d.seed)
        self.t, self.steps, self.device, self.stats = d.frames_per_clip, torch.from_numpy(flow_steps(d)), device, {}
        self.loader = torch.utils.data.DataLoader(
            _Clips(self.sampler, records, tuple(d.frame_size)), batch_size=d.batch_size, shuffle=False,
            num_workers=d.num_threads, pin_memory=device.type == "cuda", drop_last=True,
            prefetch_factor=d.prefetch if d.num_threads else None, persistent_workers=False)

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
        for frames, idx, partners, labels, vids in self.loader:
            x = frames.to(dev, non_blocking=True).permute(0, 1, 4, 2, 3)  # (B, 2T+2F, 3, H, W)
            yield ClipBatch(
                rgb_a=x[:, :t].contiguous(), rgb_b=x[:, t:2 * t].contiguous(),
                partner_a=x[:, 2 * t:2 * t + f].contiguous(), partner_b=x[:, 2 * t + f:].contiguous(),
                flow_steps=self.steps.to(dev), frames_a=idx[:, 0].to(dev), frames_b=idx[:, 1].to(dev),
                partners_a=partners[:, 0].to(dev), partners_b=partners[:, 1].to(dev),
                labels=labels.to(dev), video_idx=vids.to(dev))


def pyav_dataloader(cfg: Config) -> PyAVDataLoader:
    return PyAVDataLoader(cfg, read_manifest(cfg.data.manifest, cfg.data.split), resolve_device(cfg.train.device))
