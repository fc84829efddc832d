"""R3D-18 backbone (torchvision, random init) exposing the pooled feature and the layer2-4 maps.

MSCL's RGB encoder is torchvision's ``r3d_18`` without its classifier. The clip-level terms use the
512-d globally pooled feature; LMCL feeds the layer2/3/4 maps into the FPN + SEPC neck (neck.py).
For a B x 3 x 8 x 112 x 112 clip the maps are

    layer2: B x 128 x 4 x 28 x 28    layer3: B x 256 x 2 x 14 x 14    layer4: B x 512 x 1 x 7 x 7

The submodules keep torchvision's names (``stem``, ``layer1`` .. ``layer4``), so the backbone's
state dict loads into a torchvision ``r3d_18`` with only ``fc`` missing (see :func:`to_torchvision`),
which is what fine-tuning and retrieval start from.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import r3d_18
from torchvision.models.video.resnet import VideoResNet

FEATURE_DIM = 512
MAP_CHANNELS = (128, 256, 512)   # layer2, layer3, layer4


class R3DBackbone(nn.Module):
    """torchvision R3D-18 trunk, random init, returning the pooled feature and multi-level maps."""

    feature_dim = FEATURE_DIM
    map_channels = MAP_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        net = r3d_18(weights=None)   # explicit random init: pretraining starts from scratch
        self.stem = net.stem
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode a clip.

        Args:
            x: (B, 3, T, H, W) normalised RGB clip (any memory format).

        Returns:
            pooled: (B, 512) global average of the layer4 map.
            maps: [layer2 (B,128,T/2,H/4,W/4), layer3 (B,256,T/4,H/8,W/8), layer4 (B,512,T/8,H/16,W/16)]
                (sizes rounded up as the stride-2 3x3x3 convolutions do).
        """
        x = self.layer1(self.stem(x))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        pooled = c4.mean(dim=(2, 3, 4))
        return pooled, [c2, c3, c4]


def to_torchvision(backbone: R3DBackbone, num_classes: int = 400) -> VideoResNet:
    """A torchvision ``r3d_18`` carrying the backbone's weights and a freshly initialised ``fc``.

    Args:
        backbone: the trained trunk (e.g. ``MSCL.rgb_encoder``).
        num_classes: output size of the new linear head.

    Returns:
        A ``VideoResNet`` whose trunk equals ``backbone`` (copied, not shared).
    """
    net = r3d_18(weights=None, num_classes=num_classes)
    missing, unexpected = net.load_state_dict(backbone.state_dict(), strict=False)
    # Only the classifier may be absent: anything else means the trunks differ.
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"r3d_18 state mismatch: missing={missing} unexpected={unexpected}")
    return net.to(next(backbone.parameters()).device)
