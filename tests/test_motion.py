"""Motion ops against independent float64 numpy references (docs/method.md, sections 2-4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mscl_stream import motion
from mscl_stream.errors import UserError

Q = 1.0 / 255


# ------------------------------------------------------------------ references (numpy, float64)

def np_wheel() -> np.ndarray:
    """Middlebury wheel written out segment by segment: (55, 3) in 0..255."""
    ry, yg, gc, cb, bm, mr = 15, 6, 4, 11, 13, 6
    w = np.zeros((55, 3))
    i = 0
    w[i:i + ry, 0] = 255
    w[i:i + ry, 1] = np.floor(255 * np.arange(ry) / ry)
    i += ry
    w[i:i + yg, 0] = 255 - np.floor(255 * np.arange(yg) / yg)
    w[i:i + yg, 1] = 255
    i += yg
    w[i:i + gc, 1] = 255
    w[i:i + gc, 2] = np.floor(255 * np.arange(gc) / gc)
    i += gc
    w[i:i + cb, 1] = 255 - np.floor(255 * np.arange(cb) / cb)
    w[i:i + cb, 2] = 255
    i += cb
    w[i:i + bm, 2] = 255
    w[i:i + bm, 0] = np.floor(255 * np.arange(bm) / bm)
    i += bm
    w[i:i + mr, 2] = 255 - np.floor(255 * np.arange(mr) / mr)
    w[i:i + mr, 0] = 255
    return w


WHEEL = np_wheel()


def np_color_px(u: float, v: float) -> np.ndarray:
    """One vector -> colour in [0, 1] (scalar float64 code, quantised)."""
    a = math.atan2(-v, -u) / math.pi
    fk = (a + 1) / 2 * 54
    k0 = int(math.floor(fk))
    k1 = 0 if k0 + 1 == 55 else k0 + 1
    f = fk - k0
    col = (1 - f) * (WHEEL[k0] / 255) + f * (WHEEL[k1] / 255)   # the authors' op order
    r = math.hypot(u, v)
    col = 1 - r * (1 - col) if r <= 1 else col * 0.75
    return np.floor(255 * col) / 255


def np_color255(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised numpy colour code: (...,) -> (..., 3) integers 0..255 as float64."""
    a = np.arctan2(-v, -u) / np.pi
    fk = (a + 1) / 2 * 54
    k0 = np.floor(fk).astype(int)
    k1 = np.where(k0 + 1 == 55, 0, k0 + 1)
    f = (fk - k0)[..., None]
    col = (1 - f) * (WHEEL[k0] / 255) + f * (WHEEL[k1] / 255)
    r = np.hypot(u, v)[..., None]
    col = np.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    return np.floor(255 * col)


def np_bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample img (H, W) at pixel-centre coordinates ys x xs, clamped to the image, loops."""
    h, w = img.shape
    out = np.zeros((len(ys), len(xs)))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                         + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def np_crop(img: np.ndarray, box, s: int) -> np.ndarray:
    """Crop (H, W) with a relative box, resize to s x s (pixel-edge box, align_corners=False)."""
    h, w = img.shape
    x0, y0, x1, y1 = box
    xs = (x0 + (np.arange(s) + 0.5) * (x1 - x0) / s) * w - 0.5
    ys = (y0 + (np.arange(s) + 0.5) * (y1 - y0) / s) * h - 0.5
    return np_bilinear(img, ys, xs)


def np_upsample(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize (align_corners=False; negative source coordinates clamp to 0)."""
    hi, wi = img.shape
    ys = np.maximum((np.arange(h) + 0.5) * hi / h - 0.5, 0)
    xs = np.maximum((np.arange(w) + 0.5) * wi / w - 0.5, 0)
    return np_bilinear(img, ys, xs)


def literal_views(flow, boxes, flips, angles, s, negate_u=True):
    """Section 2 step by step in float64: normalise, FRA copy, crop+resize, flip, encode."""
    b, nf = flow.shape[:2]
    base = np.zeros((b, 3, nf, s, s))
    rot = np.zeros((b, 3, nf, s, s))
    for i in range(b):
        c, sn = math.cos(angles[i]), math.sin(angles[i])
        for t in range(nf):
            u, v = flow[i, t, 0], flow[i, t, 1]
            m = np.sqrt(u ** 2 + v ** 2).max() + 1e-5
            u, v = u / m, v / m
            for out, (uu, vv) in ((base, (u, v)), (rot, (u * c - v * sn, u * sn + v * c))):
                cu, cv = np_crop(uu, boxes[i], s), np_crop(vv, boxes[i], s)
                if flips[i]:
                    cu, cv = cu[:, ::-1], cv[:, ::-1]
                    if negate_u:
                        cu = -cu
                for y in range(s):
                    for x in range(s):
                        out[i, :, t, y, x] = np_color_px(cu[y, x], cv[y, x])
    return base, rot


def np_mds_scores(flows: np.ndarray) -> np.ndarray:
    """Section 4 steps 1-5 in float64 with scipy's Sobel."""
    n, _, h, w = flows.shape
    ws = []
    for j in range(n):
        u, v = flows[j]
        mb = np.sqrt(sum(ndimage.sobel(ch, axis=ax) ** 2 for ch in (u, v) for ax in (0, 1)))
        ph, pw = h // 28, w // 28
        pooled = mb[:ph * 28, :pw * 28].reshape(ph, 28, pw, 28).mean(axis=(1, 3))
        att = np_upsample(pooled, h, w)
        att = att / att.max()
        m = np.sqrt(u ** 2 + v ** 2).max() + 1e-5
        ws.append(att[..., None] * np_color255(u / m, v / m))
    s = np.zeros(n)
    for j in range(n - 1):
        s[j] = np.sqrt(((ws[j] - ws[j + 1]) ** 2).sum(-1)).mean()
    return np.array([sum(s[i + 4 * k] for k in range(8) if i + 4 * k < n) / 8 for i in range(n)])


def smooth_flow(rng, n, h, w, scale=3.0):
    """Random flows with spatial structure (upsampled noise) so Sobel/pooling see real edges."""
    coarse = torch.from_numpy(rng.normal(size=(n, 2, max(h // 8, 2), max(w // 8, 2))))
    return (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False) * scale).numpy()


# ------------------------------------------------------------------ colour wheel

def test_wheel_table_matches_segments():
    assert np.array_equal(motion.colorwheel().numpy(), WHEEL)


@pytest.mark.parametrize("u,v,expected255", [
    (0.0, 0.0, (255, 255, 255)),                   # zero motion: white
    (1.0, 0.0, WHEEL[0]),                          # right: a = -1, fk = 0 -> red
    (-1.0, 0.0, WHEEL[27]),                        # left: a = 0, fk = 27 (CB segment)
    (0.0, -1.0, (WHEEL[40] + WHEEL[41]) / 2),      # up (v < 0): a = 1/2, fk = 40.5
    (0.0, 1.0, (WHEEL[13] + WHEEL[14]) / 2),       # down: a = -1/2, fk = 13.5
    (0.5, 0.0, (255, 127.5, 127.5)),               # r = 0.5: halfway to white
    (2.0, 0.0, (191.25, 0, 0)),                    # r > 1: wheel * 0.75
    (0.0, -0.6, 255 - 0.6 * (255 - (WHEEL[40] + WHEEL[41]) / 2)),
])
def test_flow_to_color_hand_picked(u, v, expected255):
    flow = torch.tensor([u, v], dtype=torch.float32).reshape(2, 1, 1)
    got = motion.flow_to_color(flow).reshape(3).double().numpy()
    want = np.floor(np.asarray(expected255, dtype=np.float64)) / 255
    # floor(255 * c) of an exact k/255 may land on k - 1 in binary floating point: allow 1 level
    assert np.all(np.abs(got - want) <= Q + 1e-9), (got * 255, want * 255)
    assert np.allclose(got, np_color_px(u, v), atol=Q + 1e-9)


def test_flow_to_color_random_vs_scalar_reference():
    rng = np.random.default_rng(0)
    flow = rng.uniform(-1.3, 1.3, size=(2, 2, 9, 11))
    got = motion.flow_to_color(torch.from_numpy(flow).float()).double().numpy()
    assert got.shape == (2, 3, 9, 11)
    want = np.zeros_like(got)
    for i in range(2):
        for y in range(9):
            for x in range(11):
                want[i, :, y, x] = np_color_px(flow[i, 0, y, x], flow[i, 1, y, x])
    levels = np.abs(np.round(got * 255) - np.round(want * 255))
    assert levels.max() <= 1
    assert (levels > 0).mean() < 0.03           # float32 vs float64 ties at k/255 only
    # float64 input runs in float64: exact
    got64 = motion.flow_to_color(torch.from_numpy(flow)).numpy()
    assert np.abs(got64 - want).max() < 1e-12


# ------------------------------------------------------------------ rotation, normalisation, FRA

def test_rotate_flow_quarter_turn_and_broadcast():
    flow = torch.zeros(1, 2, 1, 1)
    flow[0, 0] = 1.0
    out = motion.rotate_flow(flow, torch.tensor([math.pi / 2]))
    assert torch.allclose(out.reshape(2), torch.tensor([0.0, 1.0]), atol=1e-6)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 4, 2, 5, 6))
    ang = rng.uniform(0, 2 * np.pi, size=3)
    got = motion.rotate_flow(torch.from_numpy(f), torch.from_numpy(ang)).numpy()
    assert got.shape == f.shape
    for i in range(3):
        c, s = np.cos(ang[i]), np.sin(ang[i])
        assert np.allclose(got[i, :, 0], f[i, :, 0] * c - f[i, :, 1] * s)
        assert np.allclose(got[i, :, 1], f[i, :, 0] * s + f[i, :, 1] * c)


def test_normalize_flow_per_frame():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2, 3, 2, 7, 8)) * np.array([1, 10, 100])[None, :, None, None, None]
    got = motion.normalize_flow(torch.from_numpy(f)).numpy()
    for i in range(2):
        for t in range(3):
            m = np.sqrt(f[i, t, 0] ** 2 + f[i, t, 1] ** 2).max()
            assert np.allclose(got[i, t], f[i, t] / (m + 1e-5))
            assert abs(np.sqrt((got[i, t] ** 2).sum(0)).max() - 1) < 1e-4


def test_fra_angles_values_and_distribution():
    gen = torch.Generator().manual_seed(0)
    b = motion.fra_angles(8000, generator=gen)
    assert b.shape == (8000,) and b.dtype == torch.float32
    bins = np.round((b.double().numpy() / np.pi - 0.2) / 0.2, 6)
    assert np.all(bins == np.round(bins)) and bins.min() >= 0 and bins.max() <= 7
    counts = np.bincount(bins.astype(int), minlength=8)
    assert np.all(np.abs(counts - 1000) < 150), counts          # ~4.8 sigma
    again = motion.fra_angles(8000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, again)


# ------------------------------------------------------------------ crop and flow views

@pytest.mark.parametrize("compat", ["default", "released"])
def test_flow_views_match_literal_order(compat):
    rng = np.random.default_rng(4)
    b, nf, h, w, s = 3, 2, 18, 26, 10
    flow = smooth_flow(rng, b * nf, h, w).reshape(b, nf, 2, h, w) + rng.normal(size=(b, nf, 2, h, w))
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.12, 0.3, 0.55, 0.95], [0.4, 0.05, 0.97, 0.6]])
    flips = np.array([True, False, True])
    angles = (0.2 + 0.2 * np.array([0, 3, 7])) * np.pi
    base, rot = motion.flow_views(torch.from_numpy(flow).float(), torch.from_numpy(boxes).float(),
                                  torch.from_numpy(flips), torch.from_numpy(angles).float(),
                                  out_size=s, compat=compat, backend="torch")
    wb, wr = literal_views(flow, boxes, flips, angles, s, negate_u=compat == "default")
    for got, want in ((base, wb), (rot, wr)):
        assert got.shape == (b, 3, nf, s, s) and got.dtype == torch.float32
        levels = np.abs(np.round(got.double().numpy() * 255) - np.round(want * 255))
        assert levels.max() <= 1, levels.max()         # float32 vs float64: k/255 ties only
        assert (levels > 0).mean() < 0.01
    if compat == "default":
        # flipping must change the colours: the flipped sample differs from its unflipped views
        nb, _ = motion.flow_views(torch.from_numpy(flow).float(), torch.from_numpy(boxes).float(),
                                  torch.zeros(b, dtype=torch.bool), torch.from_numpy(angles).float(),
                                  out_size=s, backend="torch")
        assert not torch.allclose(nb[0], base[0].flip(-1))   # u negated: not a mirror of the image
        assert torch.equal(nb[1], base[1])


def test_flow_views_rejects_bad_shapes():
    flow = torch.zeros(2, 1, 2, 8, 8)
    ok = dict(boxes=torch.tensor([[0, 0, 1, 1.0]] * 2), flips=torch.zeros(2, dtype=torch.bool),
              angles=torch.zeros(2))
    with pytest.raises(UserError):
        motion.flow_views(flow[:, :, :1], **ok)
    with pytest.raises(UserError):
        motion.flow_views(flow, **{**ok, "angles": torch.zeros(3)})
    with pytest.raises(UserError):
        motion.flow_views(flow, **ok, compat="paper")


# ------------------------------------------------------------------ MDS

def test_sobel_matches_scipy_reflect_and_nearest():
    rng = np.random.default_rng(5)
    flows = rng.normal(size=(2, 2, 9, 12))
    got = motion.motion_boundaries(torch.from_numpy(flows)).numpy()
    for mode in ("reflect", "nearest"):      # the same thing for a 3x3 kernel
        for j in range(2):
            want = np.sqrt(sum(ndimage.sobel(flows[j, c], axis=ax, mode=mode) ** 2
                               for c in (0, 1) for ax in (0, 1)))
            assert np.allclose(got[j], want, atol=1e-10)


def test_motion_attention_matches_numpy_pool_and_upsample():
    rng = np.random.default_rng(6)
    flows = smooth_flow(rng, 2, 60, 90)           # 2 x 3 pooling cells, remainders dropped
    got = motion.motion_attention(torch.from_numpy(flows)).numpy()
    for j in range(2):
        mb = np.sqrt(sum(ndimage.sobel(flows[j, c], axis=ax) ** 2 for c in (0, 1) for ax in (0, 1)))
        pooled = mb[:56, :84].reshape(2, 28, 3, 28).mean(axis=(1, 3))
        att = np_upsample(pooled, 60, 90)
        assert np.allclose(got[j], att / att.max(), atol=1e-10)
    assert np.array_equal(motion.motion_attention(torch.zeros(1, 2, 28, 28)).numpy(), np.zeros((1, 28, 28)))
    with pytest.raises(UserError):
        motion.motion_attention(torch.zeros(1, 2, 27, 40))


def test_mds_clip_scores_match_numpy_reference():
    rng = np.random.default_rng(7)
    flows = smooth_flow(rng, 13, 56, 60)
    want = np_mds_scores(flows)
    got32 = motion.mds_clip_scores(torch.from_numpy(flows).float(), chunk=4).double().numpy()
    got64 = motion.mds_clip_scores(torch.from_numpy(flows)).numpy()
    assert np.allclose(got64, want, rtol=1e-9, atol=1e-9)
    assert np.allclose(got32, want, rtol=2e-3)


def test_mds_allowed_starts_numpy_median():
    rng = np.random.default_rng(8)
    for n in (1, 2, 7, 10):
        c = rng.integers(0, 4, size=n).astype(np.float64)     # ties on purpose
        got = motion.mds_allowed_starts(torch.from_numpy(c)).numpy()
        assert np.array_equal(got, np.nonzero(c > np.median(c))[0])
    assert motion.mds_allowed_starts(torch.ones(6)).numel() == 0


def test_mds_picks_the_changing_half():
    rng = np.random.default_rng(9)
    n = 48
    steady = np.repeat(smooth_flow(rng, 1, 56, 56), n, axis=0)
    flows = steady.copy()
    flows[:n // 2] = smooth_flow(rng, n // 2, 56, 56)   # new motion pattern every frame
    allowed = motion.mds_allowed_starts(motion.mds_clip_scores(torch.from_numpy(flows).float()))
    assert allowed.tolist() == list(range(n // 2))


def test_mds_video_starts_pairs_and_raw_indices():
    n, gap = 30, 8
    frames = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    rng = np.random.default_rng(10)
    table = torch.from_numpy(smooth_flow(rng, n, 32, 32)).float()
    table[12:] = table[12]                                # motion changes only in the first raw frames
    seen = []

    def estimator(a, b):
        ia, ib = a[:, 0, 0, 0].long(), b[:, 0, 0, 0].long()
        seen.extend(zip(ia.tolist(), ib.tolist()))
        return table[ia]

    starts = motion.mds_video_starts(frames, estimator, flow_gap=gap, batch=4)
    count = (n - 1 - gap) // 2 + 1
    assert seen == [(2 * j, 2 * j + gap) for j in range(count)]
    flows = table[torch.arange(count) * 2]
    expected = motion.mds_allowed_starts(motion.mds_clip_scores(flows))
    assert starts == [2 * int(i) for i in expected] and len(starts) > 0
    assert all(s % 2 == 0 for s in starts)
    with pytest.raises(UserError):
        motion.mds_video_starts(frames[:gap], estimator, flow_gap=gap)
