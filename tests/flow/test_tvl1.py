"""Batched TV-L1: numerics against float64 loop re-computations, known-motion accuracy, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator
from mscl_stream.flow.tvl1 import TVL1
from mscl_stream.flow.tvl1_ops import (centered_gradient, median_filter_reference, pyramid_sizes, tvl1_inner_reference,
                                       warp)

# Small schedules keep CPU time low; they still resolve a few pixels of motion at 112 px.
FAST = dict(nscales=3, warps=3, outer_iterations=3, inner_iterations=30)


# ----------------------------------------------------------------------------- float64 references

def _loops_iteration(u1, u2, p11, p12, p21, p22, ix, iy, rc, lam, theta, tau):
    """One iteration written pixel by pixel after OpenCV's tvl1flow.cpp (estimateV, divergence,
    estimateU, forwardGradient, estimateDualVariables), float64."""
    h, w = u1.shape
    lt, taut = lam * theta, tau / theta
    v1, v2 = np.empty_like(u1), np.empty_like(u2)
    for y in range(h):
        for x in range(w):
            g = ix[y, x] ** 2 + iy[y, x] ** 2
            rho = rc[y, x] + ix[y, x] * u1[y, x] + iy[y, x] * u2[y, x]
            if rho < -lt * g:
                d1, d2 = lt * ix[y, x], lt * iy[y, x]
            elif rho > lt * g:
                d1, d2 = -lt * ix[y, x], -lt * iy[y, x]
            elif g > 1.1920929e-07:
                d1, d2 = -rho / g * ix[y, x], -rho / g * iy[y, x]
            else:
                d1 = d2 = 0.0
            v1[y, x], v2[y, x] = u1[y, x] + d1, u2[y, x] + d2

    def div(a, b):
        out = np.empty_like(a)
        for y in range(h):
            for x in range(w):
                out[y, x] = a[y, x] - (a[y, x - 1] if x > 0 else 0.0) + b[y, x] - (b[y - 1, x] if y > 0 else 0.0)
        return out

    n1 = v1 + theta * div(p11, p12)
    n2 = v2 + theta * div(p21, p22)
    err = float(((n1 - u1) ** 2 + (n2 - u2) ** 2).sum())

    def fgrad(a):
        gx, gy = np.zeros_like(a), np.zeros_like(a)
        for y in range(h):
            for x in range(w):
                gx[y, x] = a[y, x + 1] - a[y, x] if x < w - 1 else 0.0
                gy[y, x] = a[y + 1, x] - a[y, x] if y < h - 1 else 0.0
        return gx, gy

    (a1x, a1y), (a2x, a2y) = fgrad(n1), fgrad(n2)
    g1 = 1 + taut * np.hypot(a1x, a1y)
    g2 = 1 + taut * np.hypot(a2x, a2y)
    return (n1, n2, (p11 + taut * a1x) / g1, (p12 + taut * a1y) / g1, (p21 + taut * a2x) / g2,
            (p22 + taut * a2y) / g2, err)


def _blob_texture(seed: int, h: int, w: int, nblob: int = 350):
    """A smooth analytic texture T(x, y) (sum of Gaussian blobs), float64, roughly in [0, 1]."""
    g = np.random.default_rng(seed)
    cx, cy = g.uniform(-12, w + 12, nblob), g.uniform(-12, h + 12, nblob)
    s, a = g.uniform(1.5, 4.5, nblob), g.uniform(-1, 1, nblob)

    def tex(x, y):
        out = np.zeros_like(x)
        for i in range(nblob):
            out += a[i] * np.exp(-((x - cx[i]) ** 2 + (y - cy[i]) ** 2) / (2 * s[i] ** 2))
        return out
    return tex


def _to_frames(img: np.ndarray, lo: float, hi: float) -> torch.Tensor:
    g = (img - lo) / (hi - lo) * 215.0 + 20.0
    return torch.tensor(g, dtype=torch.float32).expand(3, *img.shape).clone()


def _known_motion_pair(seed: int, h: int = 112, w: int = 112, amp: float = 3.0):
    """Frame a = T(x + f(x)), frame b = T(x): the forward flow of frame a is exactly f."""
    tex = _blob_texture(seed, h, w)
    g = np.random.default_rng(seed + 7)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    c, ph = g.uniform(-1, 1, 6), g.uniform(0, 2 * np.pi, 4)
    u = amp * (0.5 * c[0] + 0.3 * c[1] * np.sin(2 * np.pi * y / h + ph[0]) + 0.2 * c[2] * np.cos(2 * np.pi * x / w + ph[1]))
    v = amp * (0.5 * c[3] + 0.3 * c[4] * np.cos(2 * np.pi * x / w + ph[2]) + 0.2 * c[5] * np.sin(2 * np.pi * y / h + ph[3]))
    a_img, b_img = tex(x + u, y + v), tex(x, y)
    lo, hi = min(a_img.min(), b_img.min()), max(a_img.max(), b_img.max())
    return (_to_frames(a_img, lo, hi), _to_frames(b_img, lo, hi),
            torch.tensor(np.stack([u, v]), dtype=torch.float32))


@pytest.fixture(scope="module")
def motion_pairs():
    pairs = [_known_motion_pair(s) for s in (0, 1)]
    return (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
            torch.stack([p[2] for p in pairs]))


def _epe(flow: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return (flow - gt).norm(dim=1).mean(dim=(1, 2))


# ----------------------------------------------------------------------------- building blocks

def test_inner_iteration_matches_float64_loops():
    rng = np.random.default_rng(0)
    h, w = 7, 9
    u1, u2 = rng.normal(0, 2, (2, h, w))
    p = rng.normal(0, 0.4, (4, h, w))
    ix, iy = rng.normal(0, 15, (2, h, w))
    rc = rng.normal(0, 25, (h, w))
    ix[2:4, 2:5] = iy[2:4, 2:5] = 0.0          # flat: the "no gradient" case
    lam, theta, tau = 0.15, 0.3, 0.25
    t = lambda *a: torch.tensor(np.stack(a)[None], dtype=torch.float32)  # noqa: E731
    u, pt, wd = t(u1, u2), t(*p), t(ix, iy, rc)
    ref = (u1, u2, *p)
    for _ in range(3):
        *ref, err = _loops_iteration(*ref, ix, iy, rc, lam, theta, tau)
        u, pt, act, e = tvl1_inner_reference(u, pt, wd, torch.tensor([True]), l_t=lam * theta,
                                             theta=theta, taut=tau / theta, eps2=0.0)
        np.testing.assert_allclose(u[0].numpy(), np.stack(ref[:2]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pt[0].numpy(), np.stack(ref[2:]), rtol=1e-4, atol=1e-5)
        assert float(e[0]) == pytest.approx(err, rel=1e-4)
        assert bool(act[0])


def test_inactive_pair_is_frozen_and_threshold_stops():
    g = torch.Generator().manual_seed(1)
    u, p, wd = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g) * 10
    u2, p2, act, err = tvl1_inner_reference(u, p, wd, torch.tensor([True, False]), l_t=0.045, theta=0.3,
                                            taut=0.25 / 0.3, eps2=1e9)
    assert torch.equal(u2[1], u[1]) and torch.equal(p2[1], p[1])
    assert not torch.equal(u2[0], u[0])
    assert act.tolist() == [False, False]          # pair 0 met the (huge) threshold


def test_median_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 2, 11, 14, generator=torch.Generator().manual_seed(2))
    for k in (3, 5):
        ref = ndimage.median_filter(x.double().numpy(), size=(1, 1, k, k), mode="nearest")
        np.testing.assert_array_equal(median_filter_reference(x, k).double().numpy(), ref)


def test_centered_gradient_and_warp():
    img = torch.arange(5 * 6, dtype=torch.float32).view(1, 1, 5, 6) ** 1.5
    dx, dy = centered_gradient(img)
    a = img[0, 0].double().numpy()
    assert dx[0, 0, 2, 3] == pytest.approx(0.5 * (a[2, 4] - a[2, 2]), rel=1e-5)
    assert dx[0, 0, 2, 0] == pytest.approx(0.5 * (a[2, 1] - a[2, 0]), rel=1e-5)     # one-sided, halved
    assert dy[0, 0, 4, 1] == pytest.approx(0.5 * (a[4, 1] - a[3, 1]), rel=1e-5)
    flow = torch.zeros(1, 2, 5, 6)
    flow[:, 0], flow[:, 1] = 2.0, 0.5
    out = warp(img, flow)[0, 0].double().numpy()
    assert out[1, 1] == pytest.approx(0.5 * (a[1, 3] + a[2, 3]), rel=1e-5)   # bilinear at (x+2, y+0.5)
    assert out[4, 5] == pytest.approx(a[4, 5], rel=1e-5)                        # replicated border


def test_pyramid_sizes_follow_zoom_and_min_side():
    assert pyramid_sizes(128, 176, 5, 0.8) == [(128, 176), (102, 141), (82, 113), (66, 90), (53, 72)]
    assert pyramid_sizes(24, 40, 5, 0.5) == [(24, 40)]          # 12 px would be under 16


# ----------------------------------------------------------------------------- the estimator

def test_shape_dtype_and_uint8_input():
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(2, 3, 36, 44, generator=g) * 255).to(torch.uint8)
    b = torch.roll(a, 1, dims=3)
    est = TVL1(nscales=2, warps=1, outer_iterations=1, inner_iterations=5)
    flow = est(a, b)
    assert flow.shape == (2, 2, 36, 44) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all()
    assert torch.equal(flow, est(a.float(), b.float()))


def test_sign_convention_shift_right():
    tex = _blob_texture(5, 64, 100)
    y, x = np.mgrid[0:64, 0:100].astype(np.float64)
    img = tex(x, y)
    a = _to_frames(img[:, 3:83], img.min(), img.max())[None]
    b = _to_frames(img[:, 0:80], img.min(), img.max())[None]    # b(x) = a(x - 3): content moves right
    flow = TVL1(**FAST)(a, b)
    interior = flow[0, :, 8:-8, 8:-8]
    assert float(interior[0].median()) == pytest.approx(3.0, abs=0.2)
    assert float(interior[1].median()) == pytest.approx(0.0, abs=0.2)


def test_epe_on_known_smooth_motion(motion_pairs):
    a, b, gt = motion_pairs
    zero = gt.norm(dim=1).mean(dim=(1, 2))
    epe = _epe(TVL1(**FAST)(a, b), gt)
    assert (zero > 1.0).all()                    # the motion is a few px, not nothing
    assert (epe < 0.5).all(), epe
    assert (epe < 0.25 * zero).all(), (epe, zero)


def test_pair_alone_equals_pair_in_batch(motion_pairs):
    a, b = (t[..., 16:80, 16:80] for t in motion_pairs[:2])
    g = torch.Generator().manual_seed(4)
    other = (torch.rand(1, 3, 64, 64, generator=g) * 255)    # noise: stops at other iterations
    est = TVL1(nscales=2, warps=2, outer_iterations=2, inner_iterations=20)
    batch = est(torch.cat([other, a]), torch.cat([other.flip(-1), b]))
    alone = est(a[1:2], b[1:2])
    assert float((batch[2] - alone[0]).abs().max()) < 1e-4


def test_stopping_rule_counts_iterations():
    g = torch.Generator().manual_seed(6)
    a = torch.rand(2, 3, 32, 40, generator=g) * 255
    b = torch.roll(a, 1, dims=3)
    sched = dict(nscales=2, zoom=0.5, warps=2, outer_iterations=2, inner_iterations=3)   # 2 levels
    loose = TVL1(epsilon=1e6, **sched)
    loose(a, b)
    assert loose.last_stats["iterations"] == 2 * 2 * 1          # one iteration per warp, then stop
    assert loose.last_stats["medians"] == 2 * 2                 # the median before it, no more
    never = TVL1(epsilon=0.0, **sched)
    never(a, b)
    assert never.last_stats["iterations"] == 2 * 2 * 2 * 3      # levels * warps * outer * inner


def test_registry_and_describe():
    est = get_estimator("tvl1", device="cpu", nscales=2, warps=1)
    assert isinstance(est, TVL1) and est.name == "tvl1"
    d = est.describe()
    assert d["name"] == "tvl1" and d["options"]["nscales"] == 2 and d["options"]["backend"] == "torch"


@pytest.mark.parametrize("kwargs", [dict(zoom=1.2), dict(median_filter=4), dict(median_filter=7), dict(tau=0.5),
                                    dict(warps=0), dict(use_kernel="yes"), dict(chunk_size=-1)])
def test_bad_options_are_user_errors(kwargs):
    with pytest.raises(UserError):
        TVL1(**kwargs)


def test_bad_inputs_are_user_errors():
    est = TVL1(nscales=1, warps=1)
    a = torch.rand(1, 3, 20, 20) * 255
    with pytest.raises(UserError):
        est(a, a[:, :, :, :19])
    with pytest.raises(UserError):
        est(a[:, :1], a[:, :1])
    with pytest.raises(UserError):
        est(a / 255 - 0.5, a)
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            TVL1(use_kernel=True)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gpu_matches_eager_and_batches_consistently(motion_pairs):
    pytest.importorskip("triton")
    a, b, gt = (t.cuda() for t in motion_pairs)
    fused = TVL1(device="cuda", **FAST)
    assert fused.fused and fused.describe()["options"]["backend"] == "triton"
    eager = TVL1(device="cuda", use_kernel=False, **FAST)
    ff, fe = fused(a, b), eager(a, b)
    assert (_epe(ff, gt) < 0.5).all()
    # the same algorithm; FMA contraction on the GPU may flip a rare stopping decision
    assert float((ff - fe).norm(dim=1).mean()) < 0.02
    assert abs(float(_epe(ff, gt).mean() - _epe(fe, gt).mean())) < 0.02
    alone = fused(a[1:2], b[1:2])
    assert float((alone[0] - ff[1]).abs().max()) < 1e-5
