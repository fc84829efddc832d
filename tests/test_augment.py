"""On-device RGB augmentation: shared crop geometry, per-clip parameters, statistics, determinism.

References are independent of the code under test: scipy's map_coordinates (float64 bilinear) for the
crop, torchvision's functional colour ops and blur for the jitter chain, torchvision's
RandomResizedCrop.get_params for the box distribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy.ndimage import map_coordinates
from torchvision.transforms import RandomResizedCrop

from mscl_stream.augment import (AugmentParams, apply_params, augment_view, blur_kernel_size, crop_resize,
                                 sample_crop_boxes, sample_params)
from mscl_stream.config import AugmentConfig
from mscl_stream.errors import UserError

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
GEOMETRY_ONLY = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def unnormalise(frames: torch.Tensor) -> np.ndarray:
    """(B, 3, T, S, S) normalised -> (B, T, 3, S, S) float64 in 0..255."""
    x = frames.double().permute(0, 2, 1, 3, 4).numpy()
    return (x * STD[:, None, None] + MEAN[:, None, None]) * 255.0


def sample_coords(box: np.ndarray, h: int, w: int, s: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-index sample positions of an S x S crop (pixel k centred at k + 0.5, align_corners=False)."""
    x0, y0, x1, y1 = box.astype(np.float64)
    c = (np.arange(s) + 0.5) / s
    xs = w * (x0 + c * (x1 - x0)) - 0.5
    ys = h * (y0 + c * (y1 - y0)) - 0.5
    return ys, (xs[::-1] if flip else xs)


def ref_crop(img: np.ndarray, box: np.ndarray, s: int, flip: bool) -> np.ndarray:
    """(C, H, W) -> (C, S, S) float64 bilinear crop; 'nearest' mode = coordinates clamped to the edges."""
    ys, xs = sample_coords(box, img.shape[1], img.shape[2], s, flip)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([map_coordinates(ch.astype(np.float64), [yy, xx], order=1, mode="nearest") for ch in img])


def test_shapes_dtypes_and_pixel_edge_boxes():
    cfg = AugmentConfig(out_size=24)
    rgb = torch.randint(0, 256, (3, 5, 3, 32, 40), dtype=torch.uint8)
    v = augment_view(rgb, cfg, torch.Generator().manual_seed(0))
    assert v.frames.shape == (3, 3, 5, 24, 24) and v.frames.dtype == torch.float32
    assert v.frames.is_contiguous()
    assert v.boxes.shape == (3, 4) and v.boxes.dtype == torch.float32
    assert v.flips.shape == (3,) and v.flips.dtype == torch.bool
    px = v.boxes.double() * torch.tensor([40, 32, 40, 32], dtype=torch.float64)
    assert torch.allclose(px, px.round(), atol=1e-4)                       # edges on pixel boundaries
    assert (v.boxes[:, 0] >= 0).all() and (v.boxes[:, 2] <= 1).all() and (v.boxes[:, 0] < v.boxes[:, 2]).all()
    assert (v.boxes[:, 1] >= 0).all() and (v.boxes[:, 3] <= 1).all() and (v.boxes[:, 1] < v.boxes[:, 3]).all()


def test_one_box_for_every_frame_linear_translation():
    """Frame t = x + 2y + t (exact in uint8): bilinear crops keep it affine, so if every frame of a clip
    shares one box, output frame t+1 - frame t == 1 everywhere (edge clamping included)."""
    b, t, h, w, s = 8, 5, 24, 32, 16
    yy, xx = np.mgrid[0:h, 0:w]
    clip = np.stack([xx + 2 * yy + k for k in range(t)])[:, None].repeat(3, 1)      # (T, 3, H, W)
    rgb = torch.from_numpy(clip.astype(np.uint8))[None].repeat(b, 1, 1, 1, 1)
    v = augment_view(rgb, AugmentConfig(out_size=s, **GEOMETRY_ONLY), torch.Generator().manual_seed(3))
    out = unnormalise(v.frames)
    np.testing.assert_allclose(np.diff(out, axis=1), 1.0, atol=2e-3)
    # the clips really got different boxes (otherwise the test says little)
    assert len({tuple(bx) for bx in v.boxes.tolist()}) == b


def test_shifted_copies_stay_shifted_and_box_reproduces_output():
    """Frame t = base shifted left by t px. Each output frame equals an independent float64 crop of its
    input frame with the returned box (and flip); inside the frame it equals base cropped at X + t."""
    b, t, h, w, s = 6, 4, 30, 36, 20
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3, h, w + t), dtype=np.uint8)
    clip = np.stack([base[:, :, k:k + w] for k in range(t)])                       # (T, 3, H, W)
    rgb = torch.from_numpy(clip)[None].repeat(b, 1, 1, 1, 1)
    cfg = AugmentConfig(out_size=s, flip_p=0.5, **GEOMETRY_ONLY)
    v = augment_view(rgb, cfg, torch.Generator().manual_seed(1))
    out = unnormalise(v.frames)
    boxes, flips = v.boxes.numpy(), v.flips.numpy()
    assert flips.any() and not flips.all()
    for i in range(b):
        ys, xs = sample_coords(boxes[i], h, w, s, bool(flips[i]))
        inside = (xs >= 0) & (xs <= w - 1)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        for k in range(t):
            np.testing.assert_allclose(out[i, k], ref_crop(clip[k], boxes[i], s, bool(flips[i])), atol=2e-3)
            shifted = np.stack([map_coordinates(ch.astype(np.float64), [yy, xx + k], order=1, mode="nearest")
                                for ch in base])
            np.testing.assert_allclose(out[i, k][:, :, inside], shifted[:, :, inside], atol=2e-3)


def test_flip_flag_is_the_flipped_crop():
    rgb = torch.randint(0, 256, (5, 3, 3, 28, 34), dtype=torch.uint8)
    plain = augment_view(rgb, AugmentConfig(out_size=16, flip_p=0.0, **GEOMETRY_ONLY),
                         torch.Generator().manual_seed(7))
    flipped = augment_view(rgb, AugmentConfig(out_size=16, flip_p=1.0, **GEOMETRY_ONLY),
                           torch.Generator().manual_seed(7))
    assert not plain.flips.any() and flipped.flips.all()
    assert torch.equal(plain.boxes, flipped.boxes)
    torch.testing.assert_close(flipped.frames, plain.frames.flip(-1), atol=1e-5, rtol=0)


def test_crop_resize_matches_float64_bilinear_for_fractional_boxes():
    rng = np.random.default_rng(2)
    n, c, h, w = 6, 2, 17, 23
    x = rng.normal(size=(n, c, h, w))
    lo = rng.uniform(-0.1, 0.5, size=(n, 2))                   # boxes may poke past the frame
    hi = lo + rng.uniform(0.2, 0.6, size=(n, 2))
    boxes = np.concatenate([lo, hi], axis=1)                   # (x0, y0, x1, y1)
    flips = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    got = crop_resize(torch.from_numpy(x), torch.from_numpy(boxes), (9, 13), torch.from_numpy(flips))
    assert got.shape == (n, c, 9, 13) and got.dtype == torch.float64
    for i in range(n):
        x0, y0, x1, y1 = boxes[i]
        xs = w * (x0 + (np.arange(13) + 0.5) / 13 * (x1 - x0)) - 0.5
        ys = h * (y0 + (np.arange(9) + 0.5) / 9 * (y1 - y0)) - 0.5
        xs = xs[::-1] if flips[i] else xs
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        ref = np.stack([map_coordinates(ch, [yy, xx], order=1, mode="nearest") for ch in x[i]])
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-10)
    with pytest.raises(UserError):
        crop_resize(torch.zeros(2, 1, 4, 4), torch.zeros(3, 4), 2)


def test_full_box_is_identity_and_normalisation_exact():
    rgb = torch.randint(0, 256, (2, 3, 3, 20, 20), dtype=torch.uint8)
    cfg = AugmentConfig(out_size=20, crop_area=(1.0, 1.0), flip_p=0.0, **GEOMETRY_ONLY)
    v = augment_view(rgb, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(v.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    ref = (rgb.double().numpy() / 255.0 - MEAN[:, None, None]) / STD[:, None, None]      # (B, T, 3, H, W)
    np.testing.assert_allclose(v.frames.permute(0, 2, 1, 3, 4).numpy(), ref, atol=1e-5)


def test_colour_chain_matches_torchvision_per_frame():
    """Identity crop, then jitter (per-clip order and factors), grayscale, blur vs float64 formulas per frame
    (torchvision semantics; torchvision itself for hue and blur)."""
    b, t, s = 8, 3, 16
    cfg = AugmentConfig(out_size=s, jitter_p=0.7, gray_p=0.4, blur_p=0.6)
    p = sample_params(b, s, s, cfg, torch.Generator().manual_seed(11))
    p = dataclasses.replace(p, boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b), flips=torch.zeros(b, dtype=torch.bool))
    assert p.jitter.any() and p.gray.any() and p.blur.any() and not p.jitter.all()
    rgb = torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8)
    got = unnormalise(apply_params(rgb, p, cfg).frames) / 255.0
    k = blur_kernel_size(cfg)

    def gray(x):  # PIL / ITU-R 601 luma (torchvision's tensor path rounds R's weight to 0.2989)
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)

    def blend(x, y, f):
        return (f * x + (1 - f) * y).clamp(0, 1)

    ops = [lambda x, f: blend(x, torch.zeros_like(x), f),                          # brightness
           lambda x, f: blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f),    # contrast, per frame
           lambda x, f: blend(x, gray(x), f),                                      # saturation
           TF.adjust_hue]
    for i in range(b):
        x = rgb[i].double() / 255.0                                                # (T, 3, S, S)
        if p.jitter[i]:
            for op in p.order[i].tolist():
                x = ops[op](x, float(p.factors[i, op]))
        if p.gray[i]:
            x = gray(x)
        if p.blur[i]:
            sg = float(p.sigma[i])
            x = TF.gaussian_blur(x, [k, k], [sg, sg])
        np.testing.assert_allclose(got[i], x.numpy(), atol=2e-5, err_msg=f"clip {i}")


def test_jitter_is_constant_over_time_within_a_clip():
    """All T frames of each clip identical in, identical out; the same clip in other batch rows differs."""
    b, t = 6, 4
    frame = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    rgb = frame[None, None].repeat(b, t, 1, 1, 1)
    cfg = AugmentConfig(out_size=24, crop_area=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, gray_p=0.0, blur_p=1.0)
    v = augment_view(rgb, cfg, torch.Generator().manual_seed(5))
    f = v.frames                                                                    # (B, 3, T, S, S)
    assert torch.equal(f, f[:, :, :1].expand_as(f))
    per_clip = f[:, :, 0].flatten(1)
    dists = torch.cdist(per_clip, per_clip)
    assert (dists + torch.eye(b) * 1e9 > 1.0).all()                               # every pair of clips differs


def test_probabilities_and_ranges():
    n = 20000
    cfg = AugmentConfig()
    p = sample_params(n, 128, 176, cfg, torch.Generator().manual_seed(0))
    tol = 4.0 * 0.5 / np.sqrt(n)                                                   # 4 sigma at worst p
    for flag, prob in ((p.flips, cfg.flip_p), (p.jitter, cfg.jitter_p), (p.gray, cfg.gray_p), (p.blur, cfg.blur_p)):
        assert abs(flag.float().mean().item() - prob) < tol
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert ((p.factors >= lo) & (p.factors <= hi)).all()
    assert torch.allclose(p.factors.mean(0), torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=0.01)
    assert (p.sigma >= 0.1).all() and (p.sigma <= 2.0).all() and abs(p.sigma.mean().item() - 1.05) < 0.02
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))     # permutations
    first = torch.bincount(p.order[:, 0], minlength=4).float() / n
    assert torch.allclose(first, torch.full((4,), 0.25), atol=tol)


def test_crop_box_distribution_matches_torchvision():
    n, h, w = 4000, 128, 176
    ours = sample_crop_boxes(n, h, w, (0.2, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0)).double()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.2, 1.0], [0.75, 4 / 3])
                           for _ in range(n)], dtype=torch.float64)                # (i, j, h, w)
    tv = torch.stack([tv[:, 1] / w, tv[:, 0] / h, (tv[:, 1] + tv[:, 3]) / w, (tv[:, 0] + tv[:, 2]) / h], 1)

    def stats(bx: torch.Tensor) -> torch.Tensor:
        bw, bh = (bx[:, 2] - bx[:, 0]) * w, (bx[:, 3] - bx[:, 1]) * h
        feats = torch.stack([bw * bh / (h * w), torch.log(bw / bh), (bx[:, 0] + bx[:, 2]) / 2,
                             (bx[:, 1] + bx[:, 3]) / 2], 1)
        return torch.quantile(feats, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=0)

    assert torch.allclose(stats(ours), stats(tv), atol=0.04)


def test_crop_fallback_is_centred_and_ratio_clamped():
    # a square frame cannot hold area >= 0.9 at aspect >= 3: torchvision falls back to w = W, h = W / 3
    bx = sample_crop_boxes(4, 60, 60, (0.9, 1.0), (3.0, 4.0), torch.Generator().manual_seed(0))
    assert torch.allclose(bx, torch.tensor([[0.0, 20 / 60, 1.0, 40 / 60]] * 4))


def test_generator_determinism():
    rgb = torch.randint(0, 256, (4, 3, 3, 24, 30), dtype=torch.uint8)
    cfg = AugmentConfig(out_size=16)
    a = augment_view(rgb, cfg, torch.Generator().manual_seed(42))
    b = augment_view(rgb, cfg, torch.Generator().manual_seed(42))
    c = augment_view(rgb, cfg, torch.Generator().manual_seed(43))
    assert torch.equal(a.frames, b.frames) and torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
    assert not torch.equal(a.boxes, c.boxes)


def test_bad_input_is_a_user_error():
    cfg = AugmentConfig(out_size=8)
    with pytest.raises(UserError, match="uint8"):
        augment_view(torch.zeros(2, 3, 3, 16, 16), cfg)
    with pytest.raises(UserError):
        augment_view(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), cfg)
    p = sample_params(3, 16, 16, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="3 clips"):
        apply_params(torch.zeros(2, 3, 3, 16, 16, dtype=torch.uint8), p, cfg)
    assert isinstance(p, AugmentParams)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rgb = torch.randint(0, 256, (4, 8, 3, 128, 176), dtype=torch.uint8)
    cfg = AugmentConfig()
    cpu = augment_view(rgb, cfg, torch.Generator().manual_seed(9))
    gpu = augment_view(rgb.cuda(), cfg, torch.Generator().manual_seed(9))
    assert gpu.frames.is_cuda and gpu.boxes.is_cuda and gpu.flips.is_cuda
    torch.testing.assert_close(gpu.frames.cpu(), cpu.frames, atol=2e-3, rtol=0)
    assert torch.equal(gpu.boxes.cpu(), cpu.boxes) and torch.equal(gpu.flips.cpu(), cpu.flips)
