"""TV-L1's per-pixel operations in torch, with the eager references of the fused Triton kernels.

Gray conversion, pyramid sizes, centred gradients, warping, the median filter and one primal-dual
iteration for a whole batch.

:mod:`mscl_stream.flow.tvl1` runs the coarse-to-fine solver with these; :mod:`mscl_stream.kernels.tvl1`
fuses the median and the iteration, and its tests compare against the references here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mscl_stream.flow.base import to_float255

# OpenCV's estimateV skips the linearised solution where |grad I1w|^2 <= FLT_EPSILON.
FLT_EPSILON = 1.1920928955078125e-07
MIN_SIDE = 16                       # OpenCV stops the pyramid before a side gets smaller than this
_GRAY = (0.299, 0.587, 0.114)


def rgb_to_gray(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8/float [0,255] RGB -> (N, 1, H, W) float32 gray on the 0-255 scale."""
    x = to_float255(frames)
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def pyramid_sizes(h: int, w: int, nscales: int, zoom: float) -> list[tuple[int, int]]:
    """Level sizes, finest first: each level is the previous one times ``zoom`` (rounded), and the
    pyramid stops before a level with a side under 16 px (OpenCV's rule)."""
    sizes = [(h, w)]
    for _ in range(1, nscales):
        ph, pw = sizes[-1]
        nh, nw = int(round(ph * zoom)), int(round(pw * zoom))
        if nh < MIN_SIDE or nw < MIN_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences with one-sided halves at the border (OpenCV's centeredGradient).

    Args:
        img: (N, 1, H, W), H, W >= 2.
    Returns:
        (dx, dy), each (N, 1, H, W).
    """
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    dx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    dy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return dx, dy


def warp(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``src`` at (x + u, y + v), bilinear, replicated border.

    Args:
        src: (N, C, H, W).  flow: (N, 2, H, W) pixels.
    Returns:
        (N, C, H, W).
    """
    n, _, h, w = src.shape
    ys = torch.arange(h, device=src.device, dtype=src.dtype).view(1, h, 1)
    xs = torch.arange(w, device=src.device, dtype=src.dtype).view(1, 1, w)
    # align_corners=True: -1 and +1 are the centres of the first and last pixel
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)


def median_filter_reference(u: torch.Tensor, k: int) -> torch.Tensor:
    """K x K median of every channel, replicated border (cv2.medianBlur on float images).

    Args:
        u: (N, C, H, W).  k: odd window size.
    Returns:
        (N, C, H, W).
    """
    r = k // 2
    n, c, h, w = u.shape
    patches = F.pad(u, (r, r, r, r), mode="replicate").unfold(2, k, 1).unfold(3, k, 1)
    return patches.reshape(n, c, h, w, k * k).median(dim=-1).values


def tvl1_inner_reference(u: torch.Tensor, p: torch.Tensor, warped: torch.Tensor, active: torch.Tensor,
                         *, l_t: float, theta: float, taut: float, eps2: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One primal-dual iteration for all pairs (torch reference of the fused kernel).

    Args:
        u: (N, 2, H, W) flow (u1, u2).
        p: (N, 4, H, W) dual field (p11, p12, p21, p22): p1. is the dual of u1's gradient (x, y).
        warped: (N, 3, H, W) (I1wx, I1wy, rho_c) of the current warp.
        active: (N,) bool; inactive pairs are returned unchanged.
        l_t: lambda * theta.  theta: tightness.  taut: tau / theta.
        eps2: epsilon^2 * H * W.
    Returns:
        (u, p, active, err): updated u and p, ``active & (err > eps2)``, and err (N,) = sum over
        pixels of |u_new - u|^2 (meaningful for pairs active on entry).
    """
    n, _, h, w = u.shape
    ix, iy, rc = warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
    grad = ix * ix + iy * iy
    rho = rc + ix * u[:, 0:1] + iy * u[:, 1:2]
    lg = l_t * grad
    big = grad > FLT_EPSILON
    fi = torch.where(big, -rho / torch.where(big, grad, torch.ones_like(grad)), torch.zeros_like(grad))
    c = torch.where(rho < -lg, l_t, torch.where(rho > lg, -l_t, fi))
    v = u + c * warped[:, 0:2]

    pp = p.view(n, 2, 2, h, w)
    px, py = pp[:, :, 0], pp[:, :, 1]
    div = (px - F.pad(px[..., :, :-1], (1, 0))) + (py - F.pad(py[..., :-1, :], (0, 0, 1, 0)))
    u_new = v + theta * div
    err = (u_new - u).square().sum(dim=(1, 2, 3))

    gx = F.pad(u_new[..., :, 1:] - u_new[..., :, :-1], (0, 1))
    gy = F.pad(u_new[..., 1:, :] - u_new[..., :-1, :], (0, 0, 0, 1))
    ng = 1.0 + taut * torch.sqrt(gx * gx + gy * gy)
    p_new = ((pp + taut * torch.stack((gx, gy), dim=2)) / ng.unsqueeze(2)).view(n, 4, h, w)

    a = active.view(n, 1, 1, 1)
    return torch.where(a, u_new, u), torch.where(a, p_new, p), active & (err > eps2), err

