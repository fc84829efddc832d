"""R3D-18 backbone and FPN/SEPC neck: shapes at the method's 8x112x112, odd sizes, hand references."""

import pytest
import torch
import torch.nn.functional as F

from mscl_stream.models import FPNSEPCNeck, R3DBackbone, SEPCBlock, to_torchvision


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from intra-op threads, and on a shared 2-core machine spinning
    # OpenMP workers make them 10-30x slower; restore the setting for other test modules.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return R3DBackbone().eval()


def test_shapes_at_112_and_neck_level0(backbone):
    torch.manual_seed(1)
    neck = FPNSEPCNeck().eval()
    with torch.no_grad():
        pooled, maps = backbone(torch.randn(1, 3, 8, 112, 112))
        level0 = neck(maps)
    assert pooled.shape == (1, 512)
    assert [tuple(m.shape) for m in maps] == [(1, 128, 4, 28, 28), (1, 256, 2, 14, 14), (1, 512, 1, 7, 7)]
    assert level0.shape == (1, 128, 4, 28, 28)
    assert (level0 >= 0).all()   # the SEPC output is a ReLU


def test_pooled_matches_torchvision_forward(backbone):
    # Reference: torchvision's own VideoResNet forward (its avgpool) with the classifier removed.
    net = to_torchvision(backbone, num_classes=10).eval()
    assert net.fc.out_features == 10
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 4, 24, 24)
    with torch.no_grad():
        ours, _ = backbone(x)
        ref = net(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_neck_odd_sizes_and_every_parameter_gets_gradient(backbone):
    # T=6, 20x20: layer2 3x5x5, layer3 2x3x3, layer4 1x2x2 -> the stride-2 and upsampling paths
    # must land on these rounded-up sizes.
    torch.manual_seed(2)
    neck = FPNSEPCNeck()
    with torch.no_grad():
        _, maps = backbone(torch.randn(2, 3, 6, 20, 20))
    assert [tuple(m.shape[2:]) for m in maps] == [(3, 5, 5), (2, 3, 3), (1, 2, 2)]
    maps = [m.clone().requires_grad_(True) for m in maps]
    out = neck(maps)
    assert out.shape == (2, 128, 3, 5, 5)
    out.square().mean().backward()
    # DDP without find_unused_parameters needs a gradient for every parameter.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())
    # Level 0 depends on all three backbone levels.
    assert all(m.grad.abs().sum() > 0 for m in maps)
    assert neck.sepc[-1].conv_down is None and neck.sepc[0].conv_down is not None


def test_sepc_level_against_float64_formula():
    torch.manual_seed(3)
    block = SEPCBlock(4).double()
    xs = [torch.randn(2, 4, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 2, 4, 4, dtype=torch.float64),
          torch.randn(2, 4, 1, 2, 2, dtype=torch.float64)]
    y0, y1 = block(xs, num_out=2)

    def conv(x, m, stride=1):
        return F.conv3d(x, m.weight, m.bias, stride=stride, padding=1)

    up = F.interpolate(conv(xs[2], block.conv_up), size=(2, 4, 4), mode="trilinear", align_corners=False)
    ref1 = torch.relu(conv(xs[1], block.conv_same) + conv(xs[0], block.conv_down, stride=2) + up)
    up0 = F.interpolate(conv(xs[1], block.conv_up), size=(4, 8, 8), mode="trilinear", align_corners=False)
    ref0 = torch.relu(conv(xs[0], block.conv_same) + up0)
    torch.testing.assert_close(y1, ref1)
    torch.testing.assert_close(y0, ref0)


def test_fpn_topdown_nearest_reference():
    # With the SEPC blocks removed, level 0 is out_conv0(lat0(c2) + nearest(lat1(c3) + nearest(lat2(c4)))).
    torch.manual_seed(4)
    neck = FPNSEPCNeck(in_channels=(3, 5, 7), channels=4, num_blocks=0).double()
    c = [torch.randn(1, 3, 4, 8, 8), torch.randn(1, 5, 2, 4, 4), torch.randn(1, 7, 1, 2, 2)]
    c = [t.double() for t in c]
    lat = [F.conv3d(t, m.weight, m.bias) for t, m in zip(c, neck.lateral)]
    p1 = lat[1] + lat[2].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    p0 = lat[0] + p1.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    ref = F.conv3d(p0, neck.fpn_out[0].weight, neck.fpn_out[0].bias, padding=(0, 1, 1))
    torch.testing.assert_close(neck(c), ref)


def test_width_64_is_torchvision_r3d18_with_same_init():
    # Width 64 must be torchvision's network itself: same keys, shapes and (same seed) same weights.
    from torchvision.models.video import r3d_18

    from mscl_stream.models.r3d import r3d18
    torch.manual_seed(5)
    ref = r3d_18(weights=None, num_classes=7).state_dict()
    torch.manual_seed(5)
    ours = r3d18(64, num_classes=7).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)


def test_narrow_width_keeps_the_r3d18_layout():
    # Every tensor of the narrow trunk is torchvision's r3d_18 tensor with each channel dimension
    # scaled by width/64 (kernel sizes, strides, block structure and names unchanged).
    from torchvision.models.video import r3d_18

    from mscl_stream.models.r3d import r3d18, width_of
    ref = r3d_18(weights=None).state_dict()
    net = r3d18(16, num_classes=5)
    ours = net.state_dict()
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        if k == "fc.weight":
            want = (5, 128)
        elif k == "fc.bias":
            want = (5,)
        elif v.dim() == 5:   # conv weight (out, in, kt, kh, kw): channels scale, the stem's 3 inputs stay
            want = (v.shape[0] // 4, v.shape[1] if v.shape[1] == 3 else v.shape[1] // 4, *v.shape[2:])
        elif v.dim() == 1:   # BN vectors
            want = (v.shape[0] // 4,)
        else:                # BN num_batches_tracked
            want = tuple(v.shape)
        assert tuple(ours[k].shape) == want, k
    assert width_of(ours) == 16
    bb = R3DBackbone(16).eval()
    assert bb.feature_dim == 128 and bb.map_channels == (32, 64, 128)
    with torch.no_grad():
        pooled, maps = bb(torch.randn(2, 3, 8, 32, 32))
    assert pooled.shape == (2, 128)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 8, 8), (2, 64, 2, 4, 4), (2, 128, 1, 2, 2)]
    # to_torchvision builds the same narrow network and carries the weights exactly
    tv = to_torchvision(bb, num_classes=3).eval()
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 4, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)[0], tv(x), rtol=1e-5, atol=1e-5)
