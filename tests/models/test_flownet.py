"""Flow network: 8x112x112 -> 128x4x7x7, even-frame selection equals a stride-2 stem, no time mixing."""

import pytest
import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError
from mscl_stream.models import FlowNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from intra-op threads, and on a shared 2-core machine spinning
    # OpenMP workers make them 10-30x slower; restore the setting for other test modules.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_shapes_at_112():
    torch.manual_seed(0)
    net = FlowNet(frames_per_clip=8)
    with torch.no_grad():
        pooled, fmap = net(torch.rand(2, 3, 8, 112, 112))
    assert pooled.shape == (2, 128) and fmap.shape == (2, 128, 4, 7, 7)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3, 4)))
    assert all(m.kernel_size[0] == 1 for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert FlowNet(8, width=4).out_channels == 32


def test_all_frames_equal_even_frames_and_stride2_stem():
    torch.manual_seed(1)
    net = FlowNet(frames_per_clip=8)   # train mode: BN batch statistics over the same frames
    x8 = torch.rand(3, 3, 8, 48, 48)
    p8, m8 = net(x8)
    p4, m4 = net(x8[:, :, ::2].clone())
    torch.testing.assert_close(p8, p4, rtol=0, atol=0)
    torch.testing.assert_close(m8, m4, rtol=0, atol=0)
    # The explicit frame selection equals the paper's stem: 1x7x7 conv with stride (2, 2, 2) on all 8.
    w = net.stem[0].weight
    ref = F.conv3d(x8.double(), w.double(), stride=(2, 2, 2), padding=(0, 3, 3))
    ours = net.stem[0](x8[:, :, ::2])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_frames_are_encoded_independently():
    torch.manual_seed(2)
    net = FlowNet(frames_per_clip=8).eval()   # eval: BN uses running stats, so no batch mixing
    x = torch.rand(2, 3, 4, 32, 32)
    y = x.clone()
    y[:, :, 2] = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, a = net(x)
        _, b = net(y)
    changed = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-3
    assert torch.all(changed[[0, 1, 3]] == 0)


def test_odd_clip_length_and_wrong_frame_count():
    net = FlowNet(frames_per_clip=5)
    assert net.num_steps == 3
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 32, 32))[1].shape[2] == 3
        assert net(torch.rand(1, 3, 3, 32, 32))[1].shape[2] == 3
    with pytest.raises(UserError, match="expected 5 .*or 3"):
        net(torch.rand(1, 3, 4, 32, 32))
