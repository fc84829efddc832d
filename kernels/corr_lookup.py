"""Triton kernel for RAFT's correlation lookup: every pyramid level and window offset in one launch.

RAFT's lookup samples a (2r+1)^2 window around each pixel's current match at every level of the
correlation pyramid. With ``grid_sample`` that is, per update, one grid build, one sampling kernel
and one reshape per level plus the concatenation and the transpose to channels-first (about 20
launches and several full-size temporaries). This kernel reads the pyramid and the coordinates and
writes the (n, levels*(2r+1)^2, h, w) features directly, one launch per update.

Layout contract:
    pyramid: (Q, S) float32, Q = n*h*w query pixels (row-major over n, y, x), S = sum over levels l
        of (h >> l) * (w >> l): level l of query q is the (h >> l, w >> l) map at columns
        [off_l, off_l + (h >> l)*(w >> l)) (:func:`flat_pyramid` builds it from the level list).
    coords: (n, 2, h, w) float32 positions in level-0 pixels (channel 0 = x, 1 = y).
    out: (n, levels*(2r+1)^2, h, w) float32, contiguous or channels_last (written in place of the
        transpose a channels_last update block would need); channel l*(2r+1)^2 + a*(2r+1) + b holds level l at
        offset (dx, dy) = (a - r, b - r) (the x offset varies along the first window axis, the order
        the pretrained motion encoders expect).
Sampling is bilinear with zeros outside the map, the same as ``grid_sample(align_corners=True,
padding_mode="zeros")`` on pixel positions scaled to [-1, 1]. The torch reference is
:func:`mscl_stream.flow.raft_loop.corr_lookup`; tests/kernels/test_corr_lookup.py checks parity under
``TRITON_INTERPRET=1``. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _corr_lookup_kernel(pyr_ptr, coords_ptr, out_ptr, Q, H, W, S, sN, sC, sP,
                        LEVELS: tl.constexpr, R: tl.constexpr, KKP: tl.constexpr, BLOCK_Q: tl.constexpr):
    K: tl.constexpr = 2 * R + 1
    KK: tl.constexpr = K * K
    pid = tl.program_id(0)
    q = pid.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)     # query pixels
    qmask = q < Q
    hw = H * W
    n = q // hw
    p = q % hw
    cx = tl.load(coords_ptr + n * 2 * hw + p, mask=qmask, other=0.0)
    cy = tl.load(coords_ptr + n * 2 * hw + hw + p, mask=qmask, other=0.0)
    o = tl.arange(0, KKP)
    omask = o < KK
    dx = (o // K - R).to(tl.float32)
    dy = (o % K - R).to(tl.float32)
    m2 = qmask[:, None] & omask[None, :]
    row = pyr_ptr + q[:, None] * S                                          # (BLOCK_Q, 1) pointers
    out_base = out_ptr + n[:, None] * sN + p[:, None] * sP
    off = 0
    scale = 1.0
    hl = H
    wl = W
    for level in tl.static_range(LEVELS):
        px = cx[:, None] * scale + dx[None, :]
        py = cy[:, None] * scale + dy[None, :]
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        fx = px - x0f
        fy = py - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        vx0 = (x0 >= 0) & (x0 < wl)
        vx1 = (x1 >= 0) & (x1 < wl)
        vy0 = (y0 >= 0) & (y0 < hl)
        vy1 = (y1 >= 0) & (y1 < hl)
        base = row + off
        v00 = tl.load(base + y0 * wl + x0, mask=m2 & vy0 & vx0, other=0.0)
        v01 = tl.load(base + y0 * wl + x1, mask=m2 & vy0 & vx1, other=0.0)
        v10 = tl.load(base + y1 * wl + x0, mask=m2 & vy1 & vx0, other=0.0)
        v11 = tl.load(base + y1 * wl + x1, mask=m2 & vy1 & vx1, other=0.0)
        val = (v00 * (1.0 - fx) + v01 * fx) * (1.0 - fy) + (v10 * (1.0 - fx) + v11 * fx) * fy
        tl.store(out_base + (level * KK + o[None, :]) * sC, val, mask=m2)
        off += hl * wl
        scale = scale * 0.5
        hl = hl // 2
        wl = wl // 2


def flat_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Level list from :func:`mscl_stream.flow.raft_loop.corr_pyramid` ((Q, 1, h >> l, w >> l) each) ->
    the kernel's (Q, S) float32 layout (one copy, made once per forward)."""
    return torch.cat([v.flatten(1) for v in pyramid], dim=1).float().contiguous()


def corr_lookup(flat: torch.Tensor, coords: torch.Tensor, levels: int, radius: int,
                channels_last: bool = False, block_q: int = 32) -> torch.Tensor:
    """The lookup (see the module docstring for shapes); ``flat`` from :func:`flat_pyramid`."""
    n, _, h, w = coords.shape
    q = n * h * w
    expected = sum((h >> l) * (w >> l) for l in range(levels))
    if flat.shape != (q, expected) or min(h >> (levels - 1), w >> (levels - 1)) < 1:
        raise ValueError(f"pyramid {tuple(flat.shape)} does not match coords {tuple(coords.shape)} "
                         f"with {levels} levels (expected ({q}, {expected}))")
    kk = (2 * radius + 1) ** 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, levels * kk, h, w, device=coords.device, dtype=torch.float32, memory_format=fmt)
    coords = coords.float().contiguous()
    s_n, s_c, _, s_p = out.stride()     # pixel p = y*w + x sits at p * stride(x) in both layouts
    grid = (triton.cdiv(q, block_q),)
    _corr_lookup_kernel[grid](flat, coords, out, q, h, w, flat.shape[1], s_n, s_c, s_p, LEVELS=levels, R=radius,
                              KKP=triton.next_power_of_2(kk), BLOCK_Q=block_q)
    return out
