"""OpenCV estimators (and TV-L1 where present): sign convention, parity with cv2 itself, plumbing."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator

cv2 = pytest.importorskip("cv2")

CLASSICAL = ["dis_ultrafast", "dis_fast", "dis_medium", "farneback"]
SIGN_NAMES = CLASSICAL + (["tvl1"] if importlib.util.find_spec("mscl_stream.flow.tvl1") else [])


def smooth_texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) float in [0, 255]: low-pass random texture (well textured at every scale DIS uses)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 2.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    return tex * 255.0


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def shifted_pair(shift: int = 3, h: int = 96, w: int = 128):
    """Frame b shows frame a's content moved ``shift`` px to the right: b[:, x] = a[:, x - shift]."""
    big = smooth_texture(h, w + shift)
    a = big[:, shift:shift + w]
    b = big[:, 0:w]
    return to_tensor(a).round(), to_tensor(b).round()


@pytest.mark.parametrize("name", SIGN_NAMES)
def test_sign_convention_right_shift(name):
    a, b = shifted_pair(3)
    est = get_estimator(name, device="cpu")
    flow = est(a, b)[0]
    inner = flow[:, 16:-16, 16:-16]          # away from borders where content enters/leaves
    u, v = inner[0].median().item(), inner[1].median().item()
    assert abs(u - 3.0) < 0.3, f"{name}: u={u}"
    assert abs(v) < 0.3, f"{name}: v={v}"


def test_vertical_shift_is_positive_v():
    big = smooth_texture(100, 128)
    a, b = to_tensor(big[2:98]).round(), to_tensor(big[0:96]).round()   # content moves down by 2
    flow = get_estimator("dis_medium")(a, b)[0, :, 16:-16, 16:-16]
    assert abs(flow[1].median().item() - 2.0) < 0.3 and abs(flow[0].median().item()) < 0.3


def _gray(frames: torch.Tensor) -> list[np.ndarray]:
    return [cv2.cvtColor(f.permute(1, 2, 0).numpy().astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in frames]


def test_grayscale_matches_cv2():
    from mscl_stream.flow.opencv import to_gray_u8
    rng = np.random.default_rng(3)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 3, 20, 24), dtype=np.uint8))
    ours = to_gray_u8(frames)
    ref = np.stack(_gray(frames))
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("name", CLASSICAL)
def test_matches_cv2_directly(name):
    """Same grayscale input -> exactly OpenCV's own result, transposed to (N, 2, H, W)."""
    a = torch.stack([to_tensor(smooth_texture(64, 80, seed=s))[0] for s in range(3)]).round()
    b = torch.roll(a, shifts=(1, 2), dims=(-2, -1))
    # give both paths identical gray images: frames whose three channels are equal
    a = a.mean(1, keepdim=True).round().expand(-1, 3, -1, -1).contiguous()
    b = b.mean(1, keepdim=True).round().expand(-1, 3, -1, -1).contiguous()
    ours = get_estimator(name, threads=2)(a, b)
    for i, (ga, gb) in enumerate(zip(_gray(a), _gray(b))):
        if name == "farneback":
            ref = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        else:
            preset = {"dis_ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "dis_fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                      "dis_medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[name]
            ref = cv2.DISOpticalFlow_create(preset).calc(ga, gb, None)
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_results_do_not_depend_on_batch_order_threads_or_chunks():
    a = torch.stack([to_tensor(smooth_texture(48, 64, seed=s))[0] for s in range(5)]).round().to(torch.uint8)
    b = torch.roll(a, shifts=2, dims=-1)
    one = get_estimator("dis_fast", threads=1)(a, b)
    many = get_estimator("dis_fast", threads=2, chunk_size=2)(a, b)
    assert torch.equal(one, many)
    # each pair's flow is independent of the other pairs in the batch (no state carried over)
    rev = get_estimator("dis_fast", threads=1)(a.flip(0), b.flip(0)).flip(0)
    assert torch.equal(one, rev)
    # float input with integer values equals the uint8 path
    assert torch.equal(get_estimator("dis_fast", threads=1)(a.float(), b.float()), one)


def test_bad_options_and_empty_batch():
    with pytest.raises(UserError, match="does not take option"):
        get_estimator("farneback", iters=3)
    est = get_estimator("farneback")
    out = est(torch.zeros(0, 3, 8, 8), torch.zeros(0, 3, 8, 8))
    assert out.shape == (0, 2, 8, 8)


def test_missing_cv2_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)      # makes `import cv2` raise ImportError
    with pytest.raises(UserError, match="opencv-python-headless"):
        get_estimator("dis_fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_output_on_input_device():
    a, b = shifted_pair(3)
    flow = get_estimator("dis_medium")(a.cuda(), b.cuda())
    assert flow.device.type == "cuda"
    assert abs(flow[0, 0, 16:-16, 16:-16].median().item() - 3.0) < 0.3


def test_each_preset_is_its_own():
    """The DIS names reach different presets: on the same known-motion pairs their flows differ (so the
    parity test above would catch a name mapped to another preset)."""
    a, b = shifted_pair(3)
    flows = {n: get_estimator(n, threads=1)(a, b) for n in ("dis_ultrafast", "dis_fast", "dis_medium")}
    assert not torch.equal(flows["dis_ultrafast"], flows["dis_fast"])
    assert not torch.equal(flows["dis_fast"], flows["dis_medium"])
