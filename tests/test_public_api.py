"""The public API (docs/design.md, "Public API") stays importable from the documented paths and keeps its
contracts: shapes, dtypes and the flow convention, checked against small float64 re-computations."""

import math

import numpy as np
import torch

from mscl_stream import losses, motion
from mscl_stream.flow import available_estimators, get_estimator


def test_estimator_registry_and_flow_contract():
    names = available_estimators()
    assert {"raft_small", "raft_large", "farneback", "dis_fast", "zero"} <= set(names)
    est = get_estimator("zero", device="cpu")
    a = torch.randint(0, 256, (3, 3, 32, 40), dtype=torch.uint8)
    flow = est(a, a)
    assert flow.shape == (3, 2, 32, 40) and flow.dtype == torch.float32


def test_motion_contracts_against_float64():
    g = torch.Generator().manual_seed(0)
    flow = torch.randn(2, 3, 2, 8, 9, generator=g) * 4
    mag = flow.double().pow(2).sum(-3).sqrt().amax(dim=(-2, -1), keepdim=True).unsqueeze(-3)
    torch.testing.assert_close(motion.normalize_flow(flow).double(), flow.double() / (mag + 1e-5),
                               rtol=1e-5, atol=1e-6)

    # rotation by +90 degrees in image coordinates (v downwards): u' = u cos - v sin, v' = u sin + v cos
    angle = torch.tensor([math.pi / 2, 0.0])
    rot = motion.rotate_flow(flow, angle)
    u, v = flow[:, :, 0].double(), flow[:, :, 1].double()
    c, s = np.cos(angle.double().numpy()), np.sin(angle.double().numpy())
    c, s = torch.tensor(c).view(2, 1, 1, 1), torch.tensor(s).view(2, 1, 1, 1)
    torch.testing.assert_close(rot[:, :, 0].double(), u * c - v * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot[:, :, 1].double(), u * s + v * c, rtol=1e-5, atol=1e-5)

    rgb = motion.flow_to_color(motion.normalize_flow(flow))
    assert rgb.shape == (2, 3, 3, 8, 9) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1

    # b = (0.2 + 0.2 c) pi, c in {0..7} (docs/method.md, section 3): never 0, never a full turn
    angles = motion.fra_angles(256, generator=torch.Generator().manual_seed(1)).double()
    c = angles / math.pi / 0.2 - 1
    assert angles.shape == (256,) and torch.allclose(c, c.round(), atol=1e-5)
    assert set(c.round().long().tolist()) == set(range(8))

    scores = motion.mds_clip_scores(torch.randn(20, 2, 32, 32, generator=g))
    assert scores.shape == (20,)
    allowed = motion.mds_allowed_starts(torch.arange(10.0))
    assert allowed.dtype == torch.long and allowed.tolist() == [5, 6, 7, 8, 9]   # strictly above the median


def test_losses_against_float64_infonce():
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    t = 0.07
    qd, kd, Qd = q.double(), k.double(), queue.double()
    pos = (qd * kd).sum(1) / t
    neg = qd @ Qd.T / t
    ref = (-pos + torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1)).mean()
    torch.testing.assert_close(losses.infonce(q, k, queue, temperature=t).double(), ref, rtol=1e-5, atol=1e-6)
    feats = [torch.randn(2, 8, 4, generator=g) for _ in range(3)]
    assert losses.lmcl(*feats, temperature=t).ndim == 0
