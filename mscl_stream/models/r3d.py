"""R3D-18 backbone (torchvision, random init) exposing the pooled feature and the layer2-4 maps.

MSCL's RGB encoder is torchvision's ``r3d_18`` without its classifier. The clip-level terms use the
512-d globally pooled feature; LMCL feeds the layer2/3/4 maps into the FPN + SEPC neck (neck.py).
For a B x 3 x 8 x 112 x 112 clip the maps are

    layer2: B x 128 x 4 x 28 x 28    layer3: B x 256 x 2 x 14 x 14    layer4: B x 512 x 1 x 7 x 7

The submodules keep torchvision's names (``stem``, ``layer1`` .. ``layer4``), so the backbone's
state dict loads into a torchvision ``r3d_18`` with only ``fc`` missing (see :func:`to_torchvision`),
which is what fine-tuning and retrieval start from.

``width`` (``model.rgb_width``) scales every stage of the same architecture: channels w, 2w, 4w, 8w
(stem w), pooled feature 8w. 64 is torchvision's ``r3d_18`` itself (the method); a narrower trunk keeps
the layout, block types, strides and initialisation and only makes CPU demos cheaper per step.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import r3d_18
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple, VideoResNet

from mscl_stream.errors import UserError

WIDTH = 64                        # torchvision's r3d_18
FEATURE_DIM = 512                 # at WIDTH
MAP_CHANNELS = (128, 256, 512)   # layer2, layer3, layer4 at WIDTH


def r3d18(width: int = WIDTH, num_classes: int = 400) -> VideoResNet:
    """torchvision's ``r3d_18`` (random init), optionally with every stage ``width / 64`` as wide.

    Args:
        width: stem / layer1 channels (layer2-4: 2w, 4w, 8w). 64 returns torchvision's network unchanged.
        num_classes: output size of ``fc`` (input 8w).

    Returns:
        A ``VideoResNet`` with torchvision's module names, blocks (BasicBlock, Conv3DSimple), strides and
        initialisation (kaiming-normal fan-out convs, unit BN, N(0, 0.01) linear).
    """
    if width < 1:
        raise UserError(f"model.rgb_width: {width} must be >= 1")
    net = r3d_18(weights=None, num_classes=num_classes)
    if width == WIDTH:
        return net
    net.inplanes = width
    net.stem = nn.Sequential(   # torchvision's BasicStem with w output channels
        nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width), nn.ReLU(inplace=True))
    for i, mult in enumerate((1, 2, 4, 8)):
        setattr(net, f"layer{i + 1}", net._make_layer(BasicBlock, Conv3DSimple, width * mult, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(8 * width, num_classes)
    for m in net.modules():   # VideoResNet's own initialisation
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return net


def width_of(state: dict[str, torch.Tensor]) -> int:
    """The ``width`` of an r3d_18 state dict (torchvision keys): the stem's output channels."""
    return int(state["stem.0.weight"].shape[0])


class R3DBackbone(nn.Module):
    """torchvision R3D-18 trunk, random init, returning the pooled feature and multi-level maps.

    Args:
        width: stage widths w, 2w, 4w, 8w (64 = torchvision's r3d_18; see :func:`r3d18`).

    Attributes:
        feature_dim: 8w (512 at 64). map_channels: (2w, 4w, 8w) of layer2-4.
    """

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        net = r3d18(width)   # explicit random init: pretraining starts from scratch
        self.width = width
        self.feature_dim = 8 * width
        self.map_channels = (2 * width, 4 * width, 8 * width)
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
            pooled: (B, 8w) global average of the layer4 map (512 at width 64).
            maps: [layer2 (B,2w,T/2,H/4,W/4), layer3 (B,4w,T/4,H/8,W/8), layer4 (B,8w,T/8,H/16,W/16)]
                (sizes rounded up as the stride-2 3x3x3 convolutions do).
        """
        x = self.layer1(self.stem(x))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        pooled = c4.mean(dim=(2, 3, 4))
        return pooled, [c2, c3, c4]


def to_torchvision(backbone: R3DBackbone, num_classes: int = 400) -> VideoResNet:
    """A torchvision ``r3d_18`` (of the backbone's width) carrying its weights and a fresh ``fc``.

    Args:
        backbone: the trained trunk (e.g. ``MSCL.rgb_encoder``).
        num_classes: output size of the new linear head.

    Returns:
        A ``VideoResNet`` whose trunk equals ``backbone`` (copied, not shared).
    """
    net = r3d18(backbone.width, num_classes=num_classes)
    missing, unexpected = net.load_state_dict(backbone.state_dict(), strict=False)
    # Only the classifier may be absent: anything else means the trunks differ.
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"r3d_18 state mismatch: missing={missing} unexpected={unexpected}")
    return net.to(next(backbone.parameters()).device)
