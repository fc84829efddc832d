"""The non-finite-step guard on CUDA: a bad step is skipped without a blocking host read.

(Its CPU behaviour, inside full training runs, is in tests/train/test_reliability.py; this module
imports only torch so that it runs on a GPU host without PyAV or DALI.)
"""

from __future__ import annotations

import pytest
import torch

from mscl_stream.train.guard import StepGuard

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_bad_step_skipped_on_device_and_reported_without_waiting():
    dev = torch.device("cuda")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1)).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    guard = StepGuard(net, opt, dev)
    x = torch.randn(32, 8, device=dev)
    nan = torch.tensor(float("nan"), device=dev)

    def step(poison: bool) -> torch.Tensor:
        guard.before_forward()
        loss = net(x).square().mean()
        if poison:
            loss = loss * nan
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
        ok = guard.check(loss, norm)
        guard.optimizer_step(opt, ok)
        opt.zero_grad(set_to_none=True)
        guard.after_step(ok)
        return ok

    step(False)                                 # warm-up: allocations, fused kernel selection
    torch.cuda.synchronize()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moms = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    torch.cuda.set_sync_debug_mode("error")     # any blocking device->host read in the step raises
    try:
        ok = step(True)
        seen = guard.publish(ok, 2)              # polls the copy's event, never waits
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, m in zip(net.parameters(), moms):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    # the verdict of step 2 arrives now that the device has finished (or at once, if it already had)
    seen += guard.publish(step(False), 3)
    seen += guard.flush()
    assert seen == [(2, False), (3, True)]
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
