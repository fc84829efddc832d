"""`flow_check`: decodes pairs, runs estimators, writes PNGs + JSON, EPE against a reference."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator
from mscl_stream.commands.flow_check import flow_check

pytest.importorskip("cv2")

H, W = 64, 96


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from mscl_stream.data.synthetic import moving_texture_frames, write_video
    frames = moving_texture_frames(24, H, W, (1.0, 0.5), seed=3)
    return write_video(tmp_path_factory.mktemp("fc") / "clip", frames, "vp9")


def read_png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def decode_all(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_flow_check_outputs_and_epe(video, tmp_path, capsys):
    out = tmp_path / "out"
    s = flow_check(video, estimator="farneback", reference="dis_medium", out_dir=out, pairs=3, gap=4,
                   size=(H, W), device="cpu")
    # pairs spread evenly over [0, 24 - 1 - 4]
    assert s["pairs"] == [[0, 4], [10, 14], [19, 23]]
    assert s["frames"] == 24
    # the frames written are the requested raw frames (decoded here independently with PyAV; the
    # loader's colour conversion may differ by a few levels)
    allf = torch.from_numpy(decode_all(video)).permute(0, 3, 1, 2)
    strips = [read_png(out / f"pair{i}_frames.png") for i in range(3)]
    a = torch.stack([st[:, :, :W] for st in strips])
    b = torch.stack([st[:, :, W:] for st in strips])
    assert strips[0].shape == (3, H, 2 * W)
    for got, want in zip(list(a) + list(b), [0, 10, 19, 4, 14, 23]):
        diffs = [(got.float() - allf[j].float()).abs().mean().item() for j in range(24)]
        assert int(np.argmin(diffs)) == want and diffs[want] < 8
    # recompute the EPE and magnitudes from those frames in float64
    f1 = get_estimator("farneback")(a, b).double()
    f2 = get_estimator("dis_medium")(a, b).double()
    epe = torch.sqrt(((f1 - f2) ** 2).sum(1)).mean(dim=(1, 2))
    np.testing.assert_allclose(s["epe_vs_reference"]["per_pair"], epe.numpy(), rtol=1e-4, atol=1e-5)
    assert s["epe_vs_reference"]["mean"] == pytest.approx(float(epe.mean()), rel=1e-4)
    mags = torch.sqrt((f1 ** 2).sum(1)).mean(dim=(1, 2))
    np.testing.assert_allclose(s["estimators"]["farneback"]["mean_magnitude"], mags.numpy(), rtol=1e-4)

    on_disk = json.loads((out / "flow_check.json").read_text())
    assert on_disk["epe_vs_reference"]["mean"] == pytest.approx(s["epe_vs_reference"]["mean"])
    for i in range(3):
        for name in ("farneback", "dis_medium"):
            assert read_png(out / f"pair{i}_{name}.png").shape == (3, H, W)
    printed = capsys.readouterr().out
    assert "mean EPE vs dis_medium" in printed and "farneback" in printed


def test_flow_check_zero_motion_is_white(tmp_path):
    """A static video: zero flow, which the colour wheel shows as white."""
    from mscl_stream.data.synthetic import write_video
    rng = np.random.default_rng(0)
    still = np.repeat((rng.random((1, H, W, 3)) * 255).astype(np.uint8), 12, axis=0)
    path = write_video(tmp_path / "still", still, "mjpeg")
    s = flow_check(path, estimator="farneback", out_dir=tmp_path / "o", pairs=2, gap=3, size=(H, W))
    assert max(s["estimators"]["farneback"]["max_magnitude"]) < 0.5
    img = read_png(tmp_path / "o" / "pair0_farneback.png").float()
    assert img.mean() > 200


def test_flow_check_errors(video, tmp_path):
    with pytest.raises(UserError, match="video not found"):
        flow_check(tmp_path / "nope.mp4", estimator="farneback", out_dir=tmp_path)
    with pytest.raises(UserError, match="needs more than gap"):
        flow_check(video, estimator="farneback", out_dir=tmp_path, gap=40)
    with pytest.raises(UserError, match="unknown flow estimator"):
        flow_check(video, estimator="nope", out_dir=tmp_path, size=(H, W))
    with pytest.raises(UserError, match="does not take option.*weights"):
        flow_check(video, estimator="farneback", weights="w.pth", out_dir=tmp_path, size=(H, W))
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot (open|decode)"):
        flow_check(tmp_path / "bad.mp4", estimator="farneback", out_dir=tmp_path)


@pytest.mark.filterwarnings("ignore:raft_small.*RANDOM")
def test_flow_check_raft_too_small_size(video, tmp_path):
    with pytest.raises(UserError, match="at least 128 px"):
        flow_check(video, estimator="raft_small", out_dir=tmp_path, pairs=1, size=(H, W))
