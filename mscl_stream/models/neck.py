"""FPN + SEPC neck: R3D-18 layer2-4 maps -> one frame-level feature map for LMCL.

Structure (docs/method.md section 5, as in the authors' TPN/SEPC neck):

* FPN: 1x1x1 lateral convs to ``channels``; top-down pathway adds the nearest-upsampled coarser
  level to each finer lateral; a 1x3x3 output conv per level.
* SEPC (``num_blocks`` = 2): each block maps levels x_0..x_L to
  ``y_l = ReLU(conv_same(x_l) + conv_down(x_{l-1}) + up(conv_up(x_{l+1})))``
  with three 3x3x3 convs shared by all levels of the block (a pyramid convolution).

3D choices, so the shapes of R3D-18 work (8 x 112 x 112 input -> levels 4x28x28, 2x14x14, 1x7x7):
``conv_down`` has stride (2, 2, 2) and padding 1, which maps T, H, W to ceil(n / 2), exactly as the
stride-2 convolutions of R3D-18 do between its layers, so level l-1 lands on level l's size;
``up`` is trilinear interpolation (align_corners=False) to the target level's size (the authors'
choice; with a temporal size of 1 it repeats in time).

Only level 0 is consumed, so each block computes just the levels the next one needs: with 2 blocks
and 3 levels, block 1 computes levels 0-1 and block 2 only level 0. The last block therefore has no
``conv_down`` (level 0 has no finer level), and every parameter gets a gradient, which DDP without
``find_unused_parameters`` requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: tuple[int, int, int], stride: int = 1) -> nn.Conv3d:
    conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel))
    # Xavier-uniform with zero bias, as the authors' neck initialises every 3D conv.
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class SEPCBlock(nn.Module):
    """One pyramid-convolution block with weights shared across levels.

    Args:
        channels: channels of every level (in and out).
        with_down: whether the block has the stride-2 path from the finer level (not needed when
            only level 0 is computed).
    """

    def __init__(self, channels: int, with_down: bool = True) -> None:
        super().__init__()
        self.conv_same = _conv(channels, channels, (3, 3, 3))
        self.conv_up = _conv(channels, channels, (3, 3, 3))
        self.conv_down = _conv(channels, channels, (3, 3, 3), stride=2) if with_down else None

    def forward(self, xs: Sequence[torch.Tensor], num_out: int) -> list[torch.Tensor]:
        """Compute output levels 0..num_out-1.

        Args:
            xs: levels, finest first, each (B, C, T_l, H_l, W_l).
            num_out: how many output levels to compute (<= len(xs)).

        Returns:
            ``num_out`` maps with the sizes of ``xs[:num_out]``.
        """
        out = []
        for lvl in range(num_out):
            y = self.conv_same(xs[lvl])
            if lvl > 0:
                if self.conv_down is None:
                    raise ValueError("this SEPC block has no stride-2 path; it only computes level 0")
                y = y + self.conv_down(xs[lvl - 1])
            if lvl + 1 < len(xs):
                up = self.conv_up(xs[lvl + 1])
                y = y + F.interpolate(up, size=y.shape[2:], mode="trilinear", align_corners=False)
            out.append(F.relu(y))
        return out


class FPNSEPCNeck(nn.Module):
    """FPN followed by SEPC blocks; returns the finest level.

    Args:
        in_channels: channels of the input levels, finest first (R3D-18: 128, 256, 512).
        channels: channels of every neck level (128 in MSCL).
        num_blocks: number of SEPC blocks (2 in MSCL).
    """

    def __init__(self, in_channels: Sequence[int] = (128, 256, 512), channels: int = 128,
                 num_blocks: int = 2) -> None:
        super().__init__()
        self.num_levels = len(in_channels)
        self.channels = channels
        self.lateral = nn.ModuleList(_conv(c, channels, (1, 1, 1)) for c in in_channels)
        self.fpn_out = nn.ModuleList(_conv(channels, channels, (1, 3, 3)) for _ in in_channels)
        # Block i must produce levels 0..num_blocks-1-i; only blocks producing level >= 1 need conv_down.
        self.sepc = nn.ModuleList(
            SEPCBlock(channels, with_down=self._levels_out(i, num_blocks) > 1) for i in range(num_blocks))

    def _levels_out(self, block: int, num_blocks: int) -> int:
        return min(self.num_levels, num_blocks - block)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse the backbone levels.

        Args:
            feats: backbone maps, finest first, e.g. [(B,128,4,28,28), (B,256,2,14,14), (B,512,1,7,7)].

        Returns:
            (B, channels, T_0, H_0, W_0): the level-0 map (B x 128 x 4 x 28 x 28 for 8 x 112 x 112 clips).
        """
        if len(feats) != self.num_levels:
            raise ValueError(f"neck expects {self.num_levels} levels, got {len(feats)}")
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for lvl in range(self.num_levels - 2, -1, -1):   # top-down, coarsest first
            lat[lvl] = lat[lvl] + F.interpolate(lat[lvl + 1], size=lat[lvl].shape[2:], mode="nearest")
        xs = [conv(x) for conv, x in zip(self.fpn_out, lat)]
        for i, block in enumerate(self.sepc):
            xs = block(xs, self._levels_out(i, len(self.sepc)))
        return xs[0]
