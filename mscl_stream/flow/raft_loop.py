"""The lean RAFT inference loop: fp32 correlation pyramid, its lookup, convex upsampling, warm start.

Runs torchvision's RAFT modules with our own loop: the correlation pyramid stays in fp32, it is
sampled with a lookup grid built once on the device (or the Triton lookup of
:mod:`mscl_stream.kernels.corr_lookup`), and the flow is upsampled only after the last update
(torchvision upsamples after every update; docs/performance.md). The result equals torchvision's last
prediction. The estimator around it (options, precision, compile, CUDA graphs, chunking) is
:class:`mscl_stream.flow.raft.RAFT`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def coords_grid(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(n, 2, h, w) float32 pixel coordinates, channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys])[None].expand(n, 2, h, w)


def corr_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """All-pairs correlation pyramid in fp32.

    Args:
        fmap1, fmap2: (n, c, h, w) feature maps.

    Returns:
        ``levels`` tensors of shape (n*h*w, 1, h / 2^l, w / 2^l): for each pixel of fmap1 its dot
        products with every pixel of fmap2 / sqrt(c), average-pooled per level.
    """
    n, c, h, w = fmap1.shape
    # bf16 dot products over 128-256 channels lose too much precision for the lookup: stay in fp32.
    with torch.autocast(fmap1.device.type, enabled=False):
        f1 = fmap1.float().flatten(2)
        f2 = fmap2.float().flatten(2)
        corr = torch.bmm(f1.transpose(1, 2), f2) / math.sqrt(c)
    vol = corr.reshape(n * h * w, 1, h, w)
    pyramid = [vol]
    for _ in range(levels - 1):
        vol = F.avg_pool2d(vol, 2, stride=2)
        pyramid.append(vol)
    return pyramid


def lookup_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """(1, 2r+1, 2r+1, 2) offsets; the x offset varies along the first window axis (the order the
    pretrained motion encoders expect)."""
    d = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dx, dy = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([dx, dy], dim=-1)[None]


def corr_lookup(pyramid: list[torch.Tensor], coords: torch.Tensor, offsets: torch.Tensor,
                channels_last: bool = False) -> torch.Tensor:
    """Bilinear lookup of a (2r+1)^2 window around ``coords`` at every pyramid level.

    Args:
        pyramid: from :func:`corr_pyramid`.
        coords: (n, 2, h, w) positions in fmap2 pixels (x, y).
        offsets: from :func:`lookup_offsets`.
        channels_last: return the features in channels_last memory (no transpose copy: the samples
            come out pixel-major).

    Returns:
        (n, levels * (2r+1)^2, h, w) correlation features.
    """
    n, _, h, w = coords.shape
    centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    feats = []
    for level, vol in enumerate(pyramid):
        hl, wl = vol.shape[-2:]
        pts = centre / (2 ** level) + offsets
        # absolute pixel -> [-1, 1] with align_corners=True (pixel centres at the ends); Python
        # scalars only: no host-to-device copies inside the loop (they break CUDA-graph capture)
        grid = torch.stack([pts[..., 0] * (2.0 / max(wl - 1, 1)), pts[..., 1] * (2.0 / max(hl - 1, 1))], -1) - 1.0
        feats.append(F.grid_sample(vol, grid, mode="bilinear", align_corners=True).view(n, h, w, -1))
    out = torch.cat(feats, dim=-1).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


CORR_IMPLS = ("grid_sample", "triton")


class _Lookup:
    """The correlation lookup of one forward: ``lookup(coords, rows)`` -> features of the pairs in
    ``rows`` (a slice of the batch; warm-start chains look up one chain position at a time)."""

    def __init__(self, pyramid: list[torch.Tensor], radius: int, impl: str, channels_last: bool, hw: int):
        self.radius, self.impl, self.channels_last, self.hw = radius, impl, channels_last, hw
        self.levels = len(pyramid)
        if impl == "triton":
            from mscl_stream.kernels import corr_lookup as kernel
            self.kernel = kernel
            self.flat = kernel.flat_pyramid(pyramid)
        else:
            self.pyramid = pyramid
            self.offsets = lookup_offsets(radius, pyramid[0].device)

    def __call__(self, coords: torch.Tensor, rows: slice) -> torch.Tensor:
        q = slice(rows.start * self.hw, rows.stop * self.hw)       # pixel rows of those pairs
        if self.impl == "triton":
            return self.kernel.corr_lookup(self.flat[q], coords, self.levels, self.radius, self.channels_last)
        return corr_lookup([v[q] for v in self.pyramid], coords, self.offsets, self.channels_last)


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """RAFT's learned upsampling: each fine pixel is a softmax-weighted mix of the 3x3 coarse
    neighbourhood of the coarse flow scaled by ``factor``.

    Args:
        flow: (n, 2, h, w) coarse flow; mask: (n, 9*factor^2, h, w) logits.

    Returns:
        (n, 2, h*factor, w*factor).
    """
    n, _, h, w = flow.shape
    weights = torch.softmax(mask.float().view(n, 1, 9, factor, factor, h, w), dim=2)
    patches = F.unfold(factor * flow, kernel_size=3, padding=1).view(n, 2, 9, 1, 1, h, w)
    up = (weights * patches).sum(dim=2)                     # (n, 2, factor, factor, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, h * factor, w * factor)


def lean_raft_flow(model: torch.nn.Module, image1: torch.Tensor, image2: torch.Tensor, iters: int,
                   amp_dtype: torch.dtype | None = None, corr: str = "grid_sample",
                   update_block: Callable | None = None, channels_last: bool = False,
                   chain: int = 1, warm_iters: int | None = None) -> torch.Tensor:
    """RAFT inference with torchvision's modules, upsampling once at the end.

    Args:
        model: a torchvision ``RAFT`` in eval mode.
        image1, image2: (n, 3, H, W) float in [-1, 1], H and W multiples of 8, >= 128.
        iters: number of GRU updates.
        amp_dtype: autocast dtype for the convolutional parts (None = fp32).
        corr: correlation lookup, "grid_sample" (torch) or "triton" (:mod:`mscl_stream.kernels.corr_lookup`).
        update_block: callable standing in for ``model.update_block`` (e.g. a compiled one).
        channels_last: run the convolutions on channels_last activations (the model's weights must
            be channels_last too).
        chain: warm start. Pairs come in chains of ``chain`` consecutive pairs along the batch (pair
            i*chain + k is position k of chain i, e.g. the flow frames of one clip window). Position 0
            runs ``iters`` updates from zero flow; position k > 0 starts from position k-1's flow and
            runs ``warm_iters`` updates. Encoders and the correlation pyramid still run on all pairs
            at once; the update loop runs chain position by position. n must be a multiple of chain.
        warm_iters: updates of the warm-started positions (default ``iters``).

    Returns:
        (n, 2, H, W) float32 flow in pixels (torchvision's last prediction when chain == 1).
    """
    n, _, h, w = image1.shape
    dev = image1.device
    if n % chain:
        raise ValueError(f"warm start: {n} pairs are not a whole number of chains of {chain}")
    m = n // chain
    if chain > 1:      # chain-position-major order: position k is the contiguous rows [k*m, (k+1)*m)
        image1, image2 = (x.view(m, chain, *x.shape[1:]).transpose(0, 1).reshape(x.shape) for x in (image1, image2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    image1, image2 = image1.contiguous(memory_format=fmt), image2.contiguous(memory_format=fmt)
    amp = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False)
    with amp:
        fmaps = model.feature_encoder(torch.cat([image1, image2], dim=0))
    fmap1, fmap2 = fmaps.chunk(2, dim=0)
    corr_block = model.corr_block
    h8, w8 = h // 8, w // 8
    lookup = _Lookup(corr_pyramid(fmap1, fmap2, corr_block.num_levels), corr_block.radius, corr, channels_last,
                     h8 * w8)
    update = update_block or model.update_block
    hidden_size = model.update_block.hidden_state_size
    with amp:
        ctx = model.context_encoder(image1)
        hidden, context = torch.split(ctx, [hidden_size, ctx.shape[1] - hidden_size], dim=1)
        hidden = torch.tanh(hidden)
        context = F.relu(context)
    coords0 = coords_grid(m, h8, w8, dev)
    flows, hiddens, prev = [], [], None
    for k in range(chain):
        rows = slice(k * m, (k + 1) * m)
        hid, cont = (hidden, context) if chain == 1 else (hidden[rows], context[rows])
        coords1 = coords0.clone() if prev is None else coords0 + prev
        for _ in range(iters if k == 0 else (warm_iters or iters)):
            feats = lookup(coords1, rows)
            with amp:
                hid, delta = update(hid, cont, feats, coords1 - coords0)
            coords1 = coords1 + delta.float()      # coordinates accumulate in fp32 whatever the autocast
        prev = coords1 - coords0
        flows.append(prev)
        hiddens.append(hid)
    flow = flows[0] if chain == 1 else torch.cat(flows)
    if model.mask_predictor is None:
        up = 8 * F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=True)
    else:
        with amp:
            mask = model.mask_predictor(hiddens[0] if chain == 1 else torch.cat(hiddens))
        up = convex_upsample(flow, mask)
    if chain > 1:      # back to the caller's pair order
        up = up.view(chain, m, *up.shape[1:]).transpose(0, 1).reshape(up.shape)
    return up.contiguous()
