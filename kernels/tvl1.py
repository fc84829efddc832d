"""Triton kernels for the TV-L1 inner iteration and the masked median filter, batched over pairs.

One inner iteration of the Zach-Pock-Bischof scheme (OpenCV's DualTVL1) for every pair of a batch is
two launches over an (tiles, N) grid:

1. ``_primal_kernel``: thresholding step (v), divergence of the dual field p, u = v + theta * div p,
   and per-tile partial sums of |u_new - u|^2 (the stopping criterion).
2. ``_dual_kernel``: the pair's error from the partial sums (-> converged flag), forward gradients
   of u_new, and the dual update p = (p + tau/theta grad u) / (1 + tau/theta |grad u|).

Two launches, because the dual update needs u_new at the right and lower neighbours, which other
programs write in launch 1. Both update their arrays in place; nothing else is allocated, so the
fixed-count loop can be captured in a CUDA graph.

Per-pair stopping (OpenCV semantics, per pair): ``act[n]`` (int32, 1 = iterating) and
``conv[n]`` (int32, 1 = converged in the last iteration). Launch 1 folds ``act &= !conv``; every
program of a pair computes the same value, and the flag only ever goes 1 -> 0, so the concurrent
stores are benign. A pair that is not active is skipped entirely (no loads, no stores), so a pair's
result does not depend on the other pairs of the batch.

The torch reference of one iteration is :func:`mscl_stream.flow.tvl1_ops.tvl1_inner_reference`, of the
median :func:`mscl_stream.flow.tvl1_ops.median_filter_reference`; tests/kernels/test_tvl1_kernel.py
checks parity under ``TRITON_INTERPRET=1``. This module imports triton at import time: import it only
where triton is wanted (the estimator does so lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# OpenCV's estimateV skips the linearised solution where |grad I1w|^2 <= FLT_EPSILON.
FLT_EPSILON = 1.1920928955078125e-07
_FLT_EPS = tl.constexpr(FLT_EPSILON)     # kernels may only read constexpr globals


@triton.jit
def _primal_kernel(u_ptr, p_ptr, wd_ptr, act_ptr, conv_ptr, part_ptr, H, W, T,
                   l_t, theta, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    hw = H * W
    act = tl.load(act_ptr + n) * (1 - tl.load(conv_ptr + n))
    tl.store(act_ptr + n, act, mask=t == 0)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    m = (offs < hw) & (act != 0)
    x = offs % W
    y = offs // W
    ub = u_ptr + n * 2 * hw
    pb = p_ptr + n * 4 * hw
    wb = wd_ptr + n * 3 * hw

    u1 = tl.load(ub + offs, mask=m, other=0.0)
    u2 = tl.load(ub + hw + offs, mask=m, other=0.0)
    ix = tl.load(wb + offs, mask=m, other=0.0)
    iy = tl.load(wb + hw + offs, mask=m, other=0.0)
    rc = tl.load(wb + 2 * hw + offs, mask=m, other=0.0)

    # thresholding step TH (three cases of the point-wise minimisation in v)
    grad = ix * ix + iy * iy
    rho = rc + ix * u1 + iy * u2
    lg = l_t * grad
    big = grad > _FLT_EPS
    fi = tl.where(big, -rho / tl.where(big, grad, 1.0), 0.0)
    c = tl.where(rho < -lg, l_t, tl.where(rho > lg, -l_t, fi))
    v1 = u1 + c * ix
    v2 = u2 + c * iy

    # backward-difference divergence; p outside the image (x = -1, y = -1) is zero
    ml = m & (x > 0)
    mu = m & (y > 0)
    p11 = tl.load(pb + offs, mask=m, other=0.0)
    p11l = tl.load(pb + offs - 1, mask=ml, other=0.0)
    p12 = tl.load(pb + hw + offs, mask=m, other=0.0)
    p12u = tl.load(pb + hw + offs - W, mask=mu, other=0.0)
    p21 = tl.load(pb + 2 * hw + offs, mask=m, other=0.0)
    p21l = tl.load(pb + 2 * hw + offs - 1, mask=ml, other=0.0)
    p22 = tl.load(pb + 3 * hw + offs, mask=m, other=0.0)
    p22u = tl.load(pb + 3 * hw + offs - W, mask=mu, other=0.0)
    div1 = (p11 - p11l) + (p12 - p12u)
    div2 = (p21 - p21l) + (p22 - p22u)

    n1 = v1 + theta * div1
    n2 = v2 + theta * div2
    tl.store(ub + offs, n1, mask=m)
    tl.store(ub + hw + offs, n2, mask=m)
    d1 = n1 - u1
    d2 = n2 - u2
    e = tl.where(m, d1 * d1 + d2 * d2, 0.0)
    tl.store(part_ptr + n * T + t, tl.sum(e, axis=0), mask=act != 0)


@triton.jit
def _dual_kernel(u_ptr, p_ptr, act_ptr, conv_ptr, part_ptr, H, W, T,
                 taut, eps2, BLOCK: tl.constexpr, TBLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    hw = H * W
    act = tl.load(act_ptr + n)   # already folded with conv by _primal_kernel of this iteration
    tt = tl.arange(0, TBLOCK)
    err = tl.sum(tl.load(part_ptr + n * T + tt, mask=tt < T, other=0.0), axis=0)
    # OpenCV finishes the iteration that met the criterion (dual update included), then stops.
    tl.store(conv_ptr + n, (err <= eps2).to(tl.int32), mask=(t == 0) & (act != 0))

    offs = t * BLOCK + tl.arange(0, BLOCK)
    m = (offs < hw) & (act != 0)
    x = offs % W
    y = offs // W
    ub = u_ptr + n * 2 * hw
    pb = p_ptr + n * 4 * hw
    hasr = x < W - 1
    hasd = y < H - 1
    mr = m & hasr
    md = m & hasd

    # forward differences, zero on the last column / row
    u1 = tl.load(ub + offs, mask=m, other=0.0)
    u1x = tl.where(hasr, tl.load(ub + offs + 1, mask=mr, other=0.0) - u1, 0.0)
    u1y = tl.where(hasd, tl.load(ub + offs + W, mask=md, other=0.0) - u1, 0.0)
    u2 = tl.load(ub + hw + offs, mask=m, other=0.0)
    u2x = tl.where(hasr, tl.load(ub + hw + offs + 1, mask=mr, other=0.0) - u2, 0.0)
    u2y = tl.where(hasd, tl.load(ub + hw + offs + W, mask=md, other=0.0) - u2, 0.0)

    ng1 = 1.0 + taut * tl.sqrt(u1x * u1x + u1y * u1y)
    ng2 = 1.0 + taut * tl.sqrt(u2x * u2x + u2y * u2y)
    p11 = tl.load(pb + offs, mask=m, other=0.0)
    p12 = tl.load(pb + hw + offs, mask=m, other=0.0)
    p21 = tl.load(pb + 2 * hw + offs, mask=m, other=0.0)
    p22 = tl.load(pb + 3 * hw + offs, mask=m, other=0.0)
    tl.store(pb + offs, (p11 + taut * u1x) / ng1, mask=m)
    tl.store(pb + hw + offs, (p12 + taut * u1y) / ng1, mask=m)
    tl.store(pb + 2 * hw + offs, (p21 + taut * u2x) / ng2, mask=m)
    tl.store(pb + 3 * hw + offs, (p22 + taut * u2y) / ng2, mask=m)


# Median selection networks: Batcher's odd-even merge sort on 16 / 32 wires, the wires past 9 / 25
# holding +inf resolved away, and every compare-exchange that cannot reach the middle output pruned
# (one-sided ones keep only the min or the max). Generated once and checked on random inputs with
# ties; tests/kernels/test_tvl1_kernel.py compares the kernel with torch.median. Pure element-wise
# min/max in registers: no sorting, no cross-lane reductions.
@triton.jit
def _median9(v0, v1, v2, v3, v4, v5, v6, v7, v8):
    v0, v1 = tl.minimum(v0, v1), tl.maximum(v0, v1)
    v2, v3 = tl.minimum(v2, v3), tl.maximum(v2, v3)
    v0, v2 = tl.minimum(v0, v2), tl.maximum(v0, v2)
    v1, v3 = tl.minimum(v1, v3), tl.maximum(v1, v3)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v4, v5 = tl.minimum(v4, v5), tl.maximum(v4, v5)
    v6, v7 = tl.minimum(v6, v7), tl.maximum(v6, v7)
    v4, v6 = tl.minimum(v4, v6), tl.maximum(v4, v6)
    v5, v7 = tl.minimum(v5, v7), tl.maximum(v5, v7)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v0, v4 = tl.minimum(v0, v4), tl.maximum(v0, v4)
    v2, v6 = tl.minimum(v2, v6), tl.maximum(v2, v6)
    v2, v4 = tl.minimum(v2, v4), tl.maximum(v2, v4)
    v1, v5 = tl.minimum(v1, v5), tl.maximum(v1, v5)
    v3 = tl.minimum(v3, v7)
    v3, v5 = tl.minimum(v3, v5), tl.maximum(v3, v5)
    v2 = tl.maximum(v1, v2)
    v3, v4 = tl.minimum(v3, v4), tl.maximum(v3, v4)
    v5 = tl.minimum(v5, v6)
    v8 = tl.maximum(v0, v8)
    v4 = tl.minimum(v4, v8)
    v4 = tl.maximum(v2, v4)
    v3 = tl.minimum(v3, v5)
    v4 = tl.maximum(v3, v4)
    return v4

@triton.jit
def _median25(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23, v24):
    v0, v1 = tl.minimum(v0, v1), tl.maximum(v0, v1)
    v2, v3 = tl.minimum(v2, v3), tl.maximum(v2, v3)
    v0, v2 = tl.minimum(v0, v2), tl.maximum(v0, v2)
    v1, v3 = tl.minimum(v1, v3), tl.maximum(v1, v3)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v4, v5 = tl.minimum(v4, v5), tl.maximum(v4, v5)
    v6, v7 = tl.minimum(v6, v7), tl.maximum(v6, v7)
    v4, v6 = tl.minimum(v4, v6), tl.maximum(v4, v6)
    v5, v7 = tl.minimum(v5, v7), tl.maximum(v5, v7)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v0, v4 = tl.minimum(v0, v4), tl.maximum(v0, v4)
    v2, v6 = tl.minimum(v2, v6), tl.maximum(v2, v6)
    v2, v4 = tl.minimum(v2, v4), tl.maximum(v2, v4)
    v1, v5 = tl.minimum(v1, v5), tl.maximum(v1, v5)
    v3, v7 = tl.minimum(v3, v7), tl.maximum(v3, v7)
    v3, v5 = tl.minimum(v3, v5), tl.maximum(v3, v5)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v3, v4 = tl.minimum(v3, v4), tl.maximum(v3, v4)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v8, v9 = tl.minimum(v8, v9), tl.maximum(v8, v9)
    v10, v11 = tl.minimum(v10, v11), tl.maximum(v10, v11)
    v8, v10 = tl.minimum(v8, v10), tl.maximum(v8, v10)
    v9, v11 = tl.minimum(v9, v11), tl.maximum(v9, v11)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v12, v13 = tl.minimum(v12, v13), tl.maximum(v12, v13)
    v14, v15 = tl.minimum(v14, v15), tl.maximum(v14, v15)
    v12, v14 = tl.minimum(v12, v14), tl.maximum(v12, v14)
    v13, v15 = tl.minimum(v13, v15), tl.maximum(v13, v15)
    v13, v14 = tl.minimum(v13, v14), tl.maximum(v13, v14)
    v8, v12 = tl.minimum(v8, v12), tl.maximum(v8, v12)
    v10, v14 = tl.minimum(v10, v14), tl.maximum(v10, v14)
    v10, v12 = tl.minimum(v10, v12), tl.maximum(v10, v12)
    v9, v13 = tl.minimum(v9, v13), tl.maximum(v9, v13)
    v11, v15 = tl.minimum(v11, v15), tl.maximum(v11, v15)
    v11, v13 = tl.minimum(v11, v13), tl.maximum(v11, v13)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v11, v12 = tl.minimum(v11, v12), tl.maximum(v11, v12)
    v13, v14 = tl.minimum(v13, v14), tl.maximum(v13, v14)
    v0, v8 = tl.minimum(v0, v8), tl.maximum(v0, v8)
    v4, v12 = tl.minimum(v4, v12), tl.maximum(v4, v12)
    v4, v8 = tl.minimum(v4, v8), tl.maximum(v4, v8)
    v2, v10 = tl.minimum(v2, v10), tl.maximum(v2, v10)
    v6, v14 = tl.minimum(v6, v14), tl.maximum(v6, v14)
    v6, v10 = tl.minimum(v6, v10), tl.maximum(v6, v10)
    v2, v4 = tl.minimum(v2, v4), tl.maximum(v2, v4)
    v6, v8 = tl.minimum(v6, v8), tl.maximum(v6, v8)
    v10, v12 = tl.minimum(v10, v12), tl.maximum(v10, v12)
    v1, v9 = tl.minimum(v1, v9), tl.maximum(v1, v9)
    v5, v13 = tl.minimum(v5, v13), tl.maximum(v5, v13)
    v5, v9 = tl.minimum(v5, v9), tl.maximum(v5, v9)
    v3, v11 = tl.minimum(v3, v11), tl.maximum(v3, v11)
    v7 = tl.minimum(v7, v15)
    v7, v11 = tl.minimum(v7, v11), tl.maximum(v7, v11)
    v3, v5 = tl.minimum(v3, v5), tl.maximum(v3, v5)
    v7, v9 = tl.minimum(v7, v9), tl.maximum(v7, v9)
    v11, v13 = tl.minimum(v11, v13), tl.maximum(v11, v13)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v3, v4 = tl.minimum(v3, v4), tl.maximum(v3, v4)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v7, v8 = tl.minimum(v7, v8), tl.maximum(v7, v8)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v11, v12 = tl.minimum(v11, v12), tl.maximum(v11, v12)
    v13 = tl.minimum(v13, v14)
    v16, v17 = tl.minimum(v16, v17), tl.maximum(v16, v17)
    v18, v19 = tl.minimum(v18, v19), tl.maximum(v18, v19)
    v16, v18 = tl.minimum(v16, v18), tl.maximum(v16, v18)
    v17, v19 = tl.minimum(v17, v19), tl.maximum(v17, v19)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v20, v21 = tl.minimum(v20, v21), tl.maximum(v20, v21)
    v22, v23 = tl.minimum(v22, v23), tl.maximum(v22, v23)
    v20, v22 = tl.minimum(v20, v22), tl.maximum(v20, v22)
    v21, v23 = tl.minimum(v21, v23), tl.maximum(v21, v23)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v16, v20 = tl.minimum(v16, v20), tl.maximum(v16, v20)
    v18, v22 = tl.minimum(v18, v22), tl.maximum(v18, v22)
    v18, v20 = tl.minimum(v18, v20), tl.maximum(v18, v20)
    v17, v21 = tl.minimum(v17, v21), tl.maximum(v17, v21)
    v19, v23 = tl.minimum(v19, v23), tl.maximum(v19, v23)
    v19, v21 = tl.minimum(v19, v21), tl.maximum(v19, v21)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v19, v20 = tl.minimum(v19, v20), tl.maximum(v19, v20)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v16, v24 = tl.minimum(v16, v24), tl.maximum(v16, v24)
    v20, v24 = tl.minimum(v20, v24), tl.maximum(v20, v24)
    v18, v20 = tl.minimum(v18, v20), tl.maximum(v18, v20)
    v22, v24 = tl.minimum(v22, v24), tl.maximum(v22, v24)
    v19, v21 = tl.minimum(v19, v21), tl.maximum(v19, v21)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v19, v20 = tl.minimum(v19, v20), tl.maximum(v19, v20)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v23, v24 = tl.minimum(v23, v24), tl.maximum(v23, v24)
    v16 = tl.maximum(v0, v16)
    v8 = tl.minimum(v8, v24)
    v16 = tl.maximum(v8, v16)
    v20 = tl.maximum(v4, v20)
    v12 = tl.minimum(v12, v20)
    v12 = tl.minimum(v12, v16)
    v18 = tl.maximum(v2, v18)
    v10 = tl.minimum(v10, v18)
    v6 = tl.minimum(v6, v22)
    v10 = tl.maximum(v6, v10)
    v12 = tl.maximum(v10, v12)
    v17 = tl.maximum(v1, v17)
    v17 = tl.maximum(v9, v17)
    v21 = tl.maximum(v5, v21)
    v13 = tl.minimum(v13, v21)
    v13 = tl.minimum(v13, v17)
    v19 = tl.maximum(v3, v19)
    v11 = tl.minimum(v11, v19)
    v7 = tl.minimum(v7, v23)
    v11 = tl.maximum(v7, v11)
    v11 = tl.minimum(v11, v13)
    v12 = tl.maximum(v11, v12)
    return v12


@triton.jit
def _median_kernel(src_ptr, dst_ptr, act_ptr, conv_ptr, C, H, W, K: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK pixels of one channel of one pair; K x K window with replicated border
    t = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    n = nc // C
    hw = H * W
    act = tl.load(act_ptr + n) * (1 - tl.load(conv_ptr + n))
    offs = t * BLOCK + tl.arange(0, BLOCK)
    m = offs < hw
    x = offs % W
    y = offs // W
    base = nc * hw
    if K == 3:
        r0 = base + tl.minimum(tl.maximum(y - 1, 0), H - 1) * W
        r1 = base + tl.minimum(tl.maximum(y + 0, 0), H - 1) * W
        r2 = base + tl.minimum(tl.maximum(y + 1, 0), H - 1) * W
        c0 = tl.minimum(tl.maximum(x - 1, 0), W - 1)
        c1 = tl.minimum(tl.maximum(x + 0, 0), W - 1)
        c2 = tl.minimum(tl.maximum(x + 1, 0), W - 1)
        med = _median9(
            tl.load(src_ptr + r0 + c0, mask=m, other=0.0), tl.load(src_ptr + r0 + c1, mask=m, other=0.0),
            tl.load(src_ptr + r0 + c2, mask=m, other=0.0), tl.load(src_ptr + r1 + c0, mask=m, other=0.0),
            tl.load(src_ptr + r1 + c1, mask=m, other=0.0), tl.load(src_ptr + r1 + c2, mask=m, other=0.0),
            tl.load(src_ptr + r2 + c0, mask=m, other=0.0), tl.load(src_ptr + r2 + c1, mask=m, other=0.0),
            tl.load(src_ptr + r2 + c2, mask=m, other=0.0))
    else:
        r0 = base + tl.minimum(tl.maximum(y - 2, 0), H - 1) * W
        r1 = base + tl.minimum(tl.maximum(y - 1, 0), H - 1) * W
        r2 = base + tl.minimum(tl.maximum(y + 0, 0), H - 1) * W
        r3 = base + tl.minimum(tl.maximum(y + 1, 0), H - 1) * W
        r4 = base + tl.minimum(tl.maximum(y + 2, 0), H - 1) * W
        c0 = tl.minimum(tl.maximum(x - 2, 0), W - 1)
        c1 = tl.minimum(tl.maximum(x - 1, 0), W - 1)
        c2 = tl.minimum(tl.maximum(x + 0, 0), W - 1)
        c3 = tl.minimum(tl.maximum(x + 1, 0), W - 1)
        c4 = tl.minimum(tl.maximum(x + 2, 0), W - 1)
        med = _median25(
            tl.load(src_ptr + r0 + c0, mask=m, other=0.0), tl.load(src_ptr + r0 + c1, mask=m, other=0.0),
            tl.load(src_ptr + r0 + c2, mask=m, other=0.0), tl.load(src_ptr + r0 + c3, mask=m, other=0.0),
            tl.load(src_ptr + r0 + c4, mask=m, other=0.0), tl.load(src_ptr + r1 + c0, mask=m, other=0.0),
            tl.load(src_ptr + r1 + c1, mask=m, other=0.0), tl.load(src_ptr + r1 + c2, mask=m, other=0.0),
            tl.load(src_ptr + r1 + c3, mask=m, other=0.0), tl.load(src_ptr + r1 + c4, mask=m, other=0.0),
            tl.load(src_ptr + r2 + c0, mask=m, other=0.0), tl.load(src_ptr + r2 + c1, mask=m, other=0.0),
            tl.load(src_ptr + r2 + c2, mask=m, other=0.0), tl.load(src_ptr + r2 + c3, mask=m, other=0.0),
            tl.load(src_ptr + r2 + c4, mask=m, other=0.0), tl.load(src_ptr + r3 + c0, mask=m, other=0.0),
            tl.load(src_ptr + r3 + c1, mask=m, other=0.0), tl.load(src_ptr + r3 + c2, mask=m, other=0.0),
            tl.load(src_ptr + r3 + c3, mask=m, other=0.0), tl.load(src_ptr + r3 + c4, mask=m, other=0.0),
            tl.load(src_ptr + r4 + c0, mask=m, other=0.0), tl.load(src_ptr + r4 + c1, mask=m, other=0.0),
            tl.load(src_ptr + r4 + c2, mask=m, other=0.0), tl.load(src_ptr + r4 + c3, mask=m, other=0.0),
            tl.load(src_ptr + r4 + c4, mask=m, other=0.0))
    centre = tl.load(src_ptr + base + offs, mask=m, other=0.0)
    tl.store(dst_ptr + base + offs, tl.where(act != 0, med, centre), mask=m)


def _block(hw: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(hw)))


def tiles_per_pair(h: int, w: int) -> int:
    """Number of tiles (programs per pair) the iteration kernels use at this size."""
    return triton.cdiv(h * w, _block(h * w))


def tvl1_step(u: torch.Tensor, p: torch.Tensor, warped: torch.Tensor, act: torch.Tensor,
              conv: torch.Tensor, partials: torch.Tensor, *, l_t: float, theta: float, taut: float,
              eps2: float) -> None:
    """One TV-L1 inner iteration for all active pairs, in place (two launches).

    Args:
        u: (N, 2, H, W) float32 flow (u1, u2), contiguous; updated.
        p: (N, 4, H, W) float32 dual field (p11, p12, p21, p22), contiguous; updated.
        warped: (N, 3, H, W) float32 (I1wx, I1wy, rho_c) of the current warp.
        act: (N,) int32, 1 while a pair iterates; folded with ``conv`` here.
        conv: (N,) int32, set to 1 when a pair's squared update sum falls to ``eps2``.
        partials: (N, tiles_per_pair(H, W)) float32 scratch.
        l_t: lambda * theta. theta: tightness. taut: tau / theta.
        eps2: epsilon^2 * H * W (OpenCV's scaled epsilon).
    """
    n, _, h, w = u.shape
    block = _block(h * w)
    t = triton.cdiv(h * w, block)
    nw = 8 if block >= 1024 else 4
    _primal_kernel[(t, n)](u, p, warped, act, conv, partials, h, w, t, float(l_t), float(theta),
                           BLOCK=block, num_warps=nw)
    _dual_kernel[(t, n)](u, p, act, conv, partials, h, w, t, float(taut), float(eps2),
                         BLOCK=block, TBLOCK=max(2, triton.next_power_of_2(t)), num_warps=nw)


def median_filter_(u: torch.Tensor, scratch: torch.Tensor, act: torch.Tensor, conv: torch.Tensor,
                   k: int) -> None:
    """K x K median (replicated border) of every channel of the active pairs, in place.

    Args:
        u: (N, C, H, W) float32, contiguous; pairs with ``act & !conv`` are filtered.
        scratch: tensor like ``u`` (output of the launch, copied back into ``u``).
        act, conv: (N,) int32 flags as in :func:`tvl1_step`.
        k: window size, 3 or 5 (as cv2.medianBlur on float images).
    """
    if k not in (3, 5):
        raise ValueError(f"median window must be 3 or 5, got {k}")
    n, c, h, w = u.shape
    block = 256
    grid = (triton.cdiv(h * w, block), n * c)
    _median_kernel[grid](u, scratch, act, conv, c, h, w, K=k, BLOCK=block, num_warps=4)
    u.copy_(scratch)
