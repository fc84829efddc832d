"""InfoNCE and LMCL against explicit float64 logsumexp formulas written here with loops, gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from mscl_stream.errors import UserError
from mscl_stream.losses import infonce, lmcl

D64 = torch.float64


def unit(*shape: int, gen: torch.Generator, dtype=D64) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=D64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def lse(values: list[torch.Tensor]) -> torch.Tensor:
    """log(sum(exp(v))) with the max subtracted; values are 0-d tensors."""
    m = max(v.detach() for v in values)
    return m + torch.log(sum(torch.exp(v - m) for v in values))


def ref_infonce(q, k, queue, t):
    """Loop form: mean_b [ lse(q_b.k_b / t, q_b.queue_j / t for all j) - q_b.k_b / t ]."""
    losses = []
    for b in range(q.shape[0]):
        pos = torch.dot(q[b], k[b]) / t
        negs = [torch.dot(q[b], queue[j]) / t for j in range(queue.shape[0])]
        losses.append(lse([pos] + negs) - pos)
    return sum(losses) / len(losses)


def ref_lmcl(rgb, flow, rot, t):
    """Loop form: unit vectors over channels; RGB step i vs [flow steps, rotated steps], positive flow step i."""
    def u(v):
        return v / torch.sqrt(torch.sum(v * v))

    bsz, _, steps = rgb.shape
    losses = []
    for b in range(bsz):
        cands = [u(flow[b, :, j]) for j in range(steps)] + [u(rot[b, :, j]) for j in range(steps)]
        for i in range(steps):
            r = u(rgb[b, :, i])
            logits = [torch.dot(r, c) / t for c in cands]
            losses.append(lse(logits) - logits[i])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("t", [0.07, 0.5, 1.0, 0.01])
def test_infonce_value_and_gradients_match_reference(t):
    g = torch.Generator().manual_seed(0)
    q, k, queue = unit(4, 6, gen=g), unit(4, 6, gen=g), unit(9, 6, gen=g)
    args = [x.clone().requires_grad_() for x in (q, k, queue)]
    refs = [x.clone().requires_grad_() for x in (q, k, queue)]
    got, ref = infonce(*args, temperature=t), ref_infonce(*refs, t)
    assert got.dtype == D64 and got.ndim == 0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.backward()
    ref.backward()
    for a, r in zip(args, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 result, same value to float32 precision
    got32 = infonce(q.float(), k.float(), queue.float(), temperature=t)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref.detach(), rtol=2e-5, atol=2e-5)


def test_infonce_gradcheck():
    g = torch.Generator().manual_seed(1)
    xs = [unit(3, 5, gen=g).requires_grad_(), unit(3, 5, gen=g).requires_grad_(), unit(7, 5, gen=g).requires_grad_()]
    assert torch.autograd.gradcheck(lambda q, k, queue: infonce(q, k, queue, temperature=0.2), xs)


def test_infonce_closed_form():
    # q = k = e0, queue = {e1, e2}: loss = log(1 + 2 exp(-1 / t))
    eye = torch.eye(3, dtype=D64)
    q = eye[:1]
    got = infonce(q, q.clone(), eye[1:], temperature=0.07)
    assert abs(got.item() - math.log1p(2 * math.exp(-1 / 0.07))) < 1e-15


def test_infonce_large_logits_stay_finite():
    g = torch.Generator().manual_seed(2)
    q, k, queue = unit(5, 8, gen=g), unit(5, 8, gen=g), unit(64, 8, gen=g)
    got = infonce(q.float(), k.float(), queue.float(), temperature=1e-3)        # logits up to +-1000
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref_infonce(q, k, queue, 1e-3), rtol=1e-4, atol=1e-2)


def test_infonce_released_departure3_by_concatenating_keys():
    """Departure 3 (docs/method.md): the positive key also among the negatives, obtained by the caller's concatenation."""
    g = torch.Generator().manual_seed(3)
    q, k, queue = unit(4, 6, gen=g), unit(4, 6, gen=g), unit(5, 6, gen=g)
    got = infonce(q, k, torch.cat([queue, k]), temperature=0.07)
    ref = []
    for b in range(4):
        pos = torch.dot(q[b], k[b]) / 0.07
        negs = [torch.dot(q[b], v) / 0.07 for v in list(queue) + list(k)]          # includes k_b itself
        ref.append(lse([pos] + negs) - pos)
    torch.testing.assert_close(got, sum(ref) / 4, rtol=1e-12, atol=1e-12)
    assert got > infonce(q, k, queue, temperature=0.07)


def test_infonce_under_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(4)
    q, k, queue = (unit(4, 16, gen=g, dtype=torch.float32), unit(4, 16, gen=g, dtype=torch.float32),
                   unit(32, 16, gen=g, dtype=torch.float32))
    plain = infonce(q, k, queue)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = infonce(q, k, queue)
        half_in = infonce(q.bfloat16(), k.bfloat16(), queue)
    assert auto.dtype == torch.float32 and half_in.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)
    ref = ref_infonce(q.bfloat16().double(), k.bfloat16().double(), queue.double(), 0.07)
    torch.testing.assert_close(half_in.double(), ref, rtol=1e-5, atol=1e-5)


def test_infonce_rejects_bad_input():
    q = torch.eye(4)[:2]
    with pytest.raises(UserError, match="empty"):
        infonce(q, q, torch.zeros(0, 4))
    with pytest.raises(UserError, match="temperature"):
        infonce(q, q, q, temperature=0.0)
    with pytest.raises(UserError, match="queue"):
        infonce(q, q, torch.zeros(3, 5))
    with pytest.raises(UserError, match="q and k"):
        infonce(q, q[:1], q)


@pytest.mark.parametrize("t", [0.07, 1.0])
def test_lmcl_value_and_gradients_match_reference(t):
    g = torch.Generator().manual_seed(5)
    # unnormalised features with per-step scales: normalisation over channels is part of the loss
    feats = [torch.randn(3, 6, 4, generator=g, dtype=D64) * torch.rand(3, 1, 4, generator=g, dtype=D64) * 5
             for _ in range(3)]
    args = [x.clone().requires_grad_() for x in feats]
    refs = [x.clone().requires_grad_() for x in feats]
    got, ref = lmcl(*args, temperature=t), ref_lmcl(*refs, t)
    assert got.dtype == D64 and got.ndim == 0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.backward()
    ref.backward()
    for a, r in zip(args, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)
    got32 = lmcl(*(x.float() for x in feats), temperature=t)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref.detach(), rtol=2e-5, atol=2e-5)


def test_lmcl_gradcheck():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, 5, 4, generator=g, dtype=D64).requires_grad_() for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: lmcl(a, b, c, temperature=0.3), xs)


def test_lmcl_closed_form_and_target_is_the_same_step():
    # C = 8 one-hots: rgb step i == flow step i == e_i, rotated steps e_{4+i}: logits are 1/t on the
    # diagonal and 0 elsewhere, so loss = log(exp(1/t) + 7) - 1/t.
    eye = torch.eye(8, dtype=D64)
    rgb = eye[:, :4].unsqueeze(0)                                                  # (1, 8, 4)
    rot = eye[:, 4:].unsqueeze(0)
    t = 0.07
    expected = math.log(math.exp(1 / t) + 7) - 1 / t
    assert abs(lmcl(rgb, rgb.clone(), rot, temperature=t).item() - expected) < 1e-12
    # the positive is the same step: a time-reversed flow makes every positive orthogonal
    reversed_flow = rgb.flip(-1)
    assert lmcl(rgb, reversed_flow, rot, temperature=t).item() > 10.0
    # a rotated step equal to the RGB step is a hard negative: log 2 at t -> 0
    assert abs(lmcl(rgb, rgb.clone(), rgb.clone(), temperature=t).item() - math.log(2 + 6 * math.exp(-1 / t))) < 1e-9


def test_lmcl_under_autocast_and_bad_input():
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 16, 4, generator=g) for _ in range(3)]
    plain = lmcl(*feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lmcl(*feats)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="share"):
        lmcl(feats[0], feats[1][:, :, :3], feats[2])
    with pytest.raises(UserError, match="temperature"):
        lmcl(*feats, temperature=-1.0)
    with pytest.raises(UserError, match="rgb_feats"):
        lmcl(feats[0][0], feats[1][0], feats[2][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(8)
    q, k, queue = unit(8, 128, gen=g, dtype=torch.float32), unit(8, 128, gen=g, dtype=torch.float32), \
        unit(4096, 128, gen=g, dtype=torch.float32)
    feats = [torch.randn(8, 128, 4, generator=g) for _ in range(3)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = infonce(q.cuda(), k.cuda(), queue.cuda())
        b = lmcl(*(f.cuda() for f in feats))
    torch.testing.assert_close(a.cpu(), infonce(q, k, queue), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.cpu(), lmcl(*feats), rtol=1e-4, atol=1e-4)
