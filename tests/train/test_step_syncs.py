"""No host syncs in the steady step's input path: a CPU counter (runs here) and the CUDA ground truth.

CPU: ``OpCounter`` classifies tensors as host or device while make_inputs runs and counts what would
be a sync on CUDA (host reads of device data, blocking host-to-device copies). It is first shown to
catch each kind of sync in a deliberately bad function, so a passing make_inputs test means something.
CUDA: ``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mscl_stream.config import AugmentConfig, Config, DataConfig, LogConfig, ModelConfig, TrainConfig
from mscl_stream.data.batch import ClipBatch
from mscl_stream.train.opcount import OpCounter
from mscl_stream.train.inputs import make_inputs

B, T, NF, H, W = 4, 4, 2, 24, 32


def _cfg(backend: str = "auto", device: str = "cpu") -> Config:
    return Config(data=DataConfig(batch_size=B, frames_per_clip=T, frame_size=[H, W]),
                  augment=AugmentConfig(out_size=16, jitter_p=1.0, blur_p=0.5, gray_p=0.5, backend=backend),
                  model=ModelConfig(queue_size=8), train=TrainConfig(device=device, amp="fp32"),
                  log=LogConfig(tensorboard=False))


def _batch(device: torch.device) -> tuple[ClipBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def u8(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (B, n, 3, H, W), generator=g, dtype=torch.uint8)

    idx = torch.arange(T).expand(B, T)
    batch = ClipBatch(rgb_a=u8(T), rgb_b=u8(T), partner_rgb_a=u8(NF), partner_rgb_b=u8(NF),
                      flow_steps=torch.tensor([0, 2]), frame_idx_a=idx, frame_idx_b=idx, partner_idx_a=idx[:, :NF],
                      partner_idx_b=idx[:, :NF], labels=torch.zeros(B, dtype=torch.long),
                      video_idx=torch.arange(B)).to(device)
    flow = (torch.randn(2, B, NF, 2, H, W, generator=g) * 2).to(device)
    return batch, flow[0], flow[1]


def test_counter_catches_syncs():
    x = torch.rand(8, 3)                      # made before counting: a device tensor to the counter
    with OpCounter() as counter:
        with counter.region() as c:
            host_rows = torch.tensor([0, 2])  # host-made
            x.index_select(0, host_rows)      # pageable index into device data: a blocking copy on CUDA
            float(x.sum())                    # .item(): a host read
            bool((x > 0).all())               # bool(tensor): a host read
            x.tolist()                        # python-side read
            torch.tensor([1.0, 2.0]).to(x.device)          # blocking upload
            dev = torch.empty(2, device=x.device)
            dev.copy_(torch.tensor([1.0, 2.0]), non_blocking=True)   # the allowed async upload
            host_rows.tolist()                # host data: no sync
    assert c.host_reads == 3, c.as_dict()
    assert c.blocking_copies == 2, c.as_dict()
    assert c.async_uploads == 1


def test_steady_make_inputs_has_no_host_syncs_on_cpu_counter():
    batch, fa, fb = _batch(torch.device("cpu"))
    cfg = _cfg("torch")
    gen = torch.Generator().manual_seed(0)
    with OpCounter() as counter:
        make_inputs(batch, fa, fb, cfg, gen)                 # warm-up: device constants cached
        with counter.region() as c:
            make_inputs(batch, fa, fb, cfg, gen)
    assert c.host_reads == 0, c.read_ops
    assert c.blocking_copies == 0, c.copy_ops
    assert c.async_uploads == 1                              # every parameter in one upload


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here: sync check not run)")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_steady_make_inputs_has_no_syncs_on_cuda(backend):
    dev = torch.device("cuda")
    batch, fa, fb = _batch(dev)
    cfg = _cfg(backend, "cuda")
    gen = torch.Generator().manual_seed(0)
    make_inputs(batch, fa, fb, cfg, gen)                     # warm-up: compile, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = make_inputs(batch, fa, fb, cfg, gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.rgb_q.is_cuda and torch.isfinite(out.rgb_q.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here: sync check not run)")
def test_steady_training_step_has_no_syncs_on_cuda(tmp_path):
    """Steps 3 and 4 of a resident-batch run under sync debug mode "error" (steps 1-2 warm up)."""
    from mscl_stream.commands.bench import ResidentLoader
    from mscl_stream.train.trainer import pretrain
    cfg = _cfg("auto", "cuda")
    cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, estimator="raft_small", weights="none"),
                              data=dataclasses.replace(cfg.data, frame_size=[128, 128]),
                              train=dataclasses.replace(cfg.train, max_steps=5, out_dir=str(tmp_path), ckpt_every=0,
                                                        amp="bf16"),
                              log=dataclasses.replace(cfg.log, every=1000))
    batch, _, _ = _batch(torch.device("cuda"))
    batch = ClipBatch(**{k: (torch.nn.functional.interpolate(v.flatten(0, 1).float(), size=(128, 128)).to(
        torch.uint8).view(*v.shape[:3], 128, 128) if v.dim() == 5 else v) for k, v in batch.tensors().items()})

    def on_step(step, model, b):
        torch.cuda.set_sync_debug_mode("error" if 2 <= step < 4 else 0)

    try:
        pretrain(cfg, loader=ResidentLoader(batch, 5), on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_triton_backend_on_cpu_without_interpreter_is_a_user_error(monkeypatch):
    from mscl_stream.augment import augment_backend
    from mscl_stream.errors import UserError
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert augment_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        augment_backend("triton", torch.device("cpu"))
