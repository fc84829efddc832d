"""Flow encoder: a quarter-width 2D ResNet-18 applied frame by frame, built from 3D layers.

Every kernel is 1 x k x k, so no information mixes across time inside the network; each flow frame
(a colour-wheel image, B x 3 x F x 112 x 112 in [0, 1]) is encoded on its own.

Configuration that yields B x 128 x 4 x 7 x 7 from B x 3 x 8 x 112 x 112 (docs/method.md section 6;
it matches the authors' ``r2d_18``):

* stem: conv 1x7x7, 3 -> w channels, stride (2, 2, 2), padding (0, 3, 3), BN, ReLU, and **no**
  max-pool: 8 x 112 x 112 -> 4 x 56 x 56. (With the usual 2D max-pool the output would be 4 x 4.)
* four stages of two BasicBlocks with 1x3x3 convs, widths w, 2w, 4w, 8w, spatial strides 1, 2, 2, 2
  (1x1x1 projection shortcuts where the shape changes): 56 -> 56 -> 28 -> 14 -> 7.
* w = 16 (a quarter of ResNet-18's 64), so the last stage has 128 channels, the LMCL feature size.

Temporal stride of the stem: a 1 x k x k kernel with temporal stride 2 reads frames 0, 2, 4, ... and
nothing else, which is exactly ``x[:, :, ::2]`` followed by the same conv with temporal stride 1.
The network does that selection explicitly, so it accepts either all T flow frames of a clip
(``flow_frames: all``) or only the even ones (``flow_frames: even``, ceil(T/2) frames computed
upstream), and both give identical outputs for the same even frames.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv3DNoTemporal

from mscl_stream.errors import UserError


def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes, kernel_size=1, stride=(1, stride, stride), bias=False),
            nn.BatchNorm3d(planes))
    return nn.Sequential(
        BasicBlock(inplanes, planes, Conv3DNoTemporal, stride, downsample),
        BasicBlock(planes, planes, Conv3DNoTemporal))


class FlowNet(nn.Module):
    """Frame-wise ResNet-18 (quarter width by default) for colour-wheel flow images.

    Args:
        frames_per_clip: T, the number of RGB frames of a clip (8). Inputs may carry T flow frames
            (all) or ceil(T / 2) (even ones only).
        width: stem / first-stage channels; the output has ``8 * width`` channels (16 -> 128).
    """

    def __init__(self, frames_per_clip: int = 8, width: int = 16) -> None:
        super().__init__()
        if frames_per_clip < 2:
            raise UserError(f"data.frames_per_clip: {frames_per_clip} is too short for the flow network (>= 2)")
        self.frames_per_clip = frames_per_clip
        self.out_channels = 8 * width
        # Temporal stride 1 here: the stride-2 frame selection happens in forward (see module doc).
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True))
        self.layer1 = _stage(width, width, 1)
        self.layer2 = _stage(width, 2 * width, 2)
        self.layer3 = _stage(2 * width, 4 * width, 2)
        self.layer4 = _stage(4 * width, 8 * width, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_steps(self) -> int:
        """Temporal length of the output: ceil(T / 2) (4 for T = 8)."""
        return (self.frames_per_clip + 1) // 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode flow frames.

        Args:
            x: (B, 3, F, H, W) colour-wheel images in [0, 1], F = T (all frames) or ceil(T / 2)
                (even frames only).

        Returns:
            pooled: (B, 8w) global average over time and space.
            fmap: (B, 8w, ceil(T/2), H/16, W/16) last-stage map (B x 128 x 4 x 7 x 7 at 112).
        """
        f = x.shape[2]
        if f == self.frames_per_clip:
            x = x[:, :, ::2]
        elif f != self.num_steps:
            raise UserError(f"flow clip has {f} frames; expected {self.frames_per_clip} (all) or "
                            f"{self.num_steps} (even) for data.frames_per_clip={self.frames_per_clip}")
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4)), x
