"""`mscl-stream export`: a pretrain checkpoint's query RGB encoder as a torchvision r3d_18 state dict.

The exported file is loaded into torchvision's own ``r3d_18()`` (strict) and its pooled features on a
random clip are compared in float64 with those of the encoder as the project's evaluation builds it from
the same checkpoint, and with the trunk the checkpoint was made from.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.video import r3d_18

from mscl_stream.cli import main
from mscl_stream.config import load_config
from mscl_stream.eval.features import build_r3d
from mscl_stream.models.mscl import MSCL
from mscl_stream.models.r3d import R3DBackbone
from mscl_stream.train.checkpoint import save_checkpoint

from conftest import TINY_TRAIN


def _perturbed(backbone: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and weights, so that a key mixed up or left at its init shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in backbone.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return backbone


@pytest.fixture(scope="module")
def full_width_checkpoint(tmp_path_factory):
    """A pretrain-shaped checkpoint at torchvision's width: a query encoder, a different momentum copy,
    another module's weights and the bookkeeping a run writes (no training: the layout is what matters)."""
    torch.manual_seed(1)
    query = _perturbed(R3DBackbone(64), seed=2)
    key = _perturbed(copy.deepcopy(query), seed=3)
    model = {f"rgb_encoder.{k}": v for k, v in query.state_dict().items()}
    model |= {f"rgb_encoder_k.{k}": v for k, v in key.state_dict().items()}
    model["rgb_head.0.weight"] = torch.randn(4, 512)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"model": model, "optimizer": {}, "step": 7, "epoch": 0, "run_id": "x",
                           "config": {"model": {"rgb_width": 64}}})
    return path, query.eval()


def test_real_model_keeps_the_encoder_keys_export_reads():
    # the fixture's key layout is the model's own: MSCL's query encoder is "rgb_encoder." + R3DBackbone keys
    model = MSCL(load_config(None, TINY_TRAIN)).state_dict()
    own = {k[len("rgb_encoder."):] for k in model if k.startswith("rgb_encoder.")}
    assert own == set(R3DBackbone(8).state_dict())


def test_export_loads_strictly_into_torchvision_with_the_same_features(full_width_checkpoint, tmp_path, capsys):
    ckpt, query = full_width_checkpoint
    out = tmp_path / "sub" / "r3d18.pt"
    assert main(["export", str(ckpt), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert not [p for p in out.parent.iterdir() if p.name != out.name]      # no temporary file left
    state = torch.load(out, weights_only=True)
    tv = r3d_18()
    tv.load_state_dict(state, strict=True)
    assert tuple(state["fc.weight"].shape) == (400, 512)
    assert torch.equal(state["fc.bias"], torch.zeros(400))                 # torchvision's fresh head
    tv.fc = nn.Identity()
    ours, _ = build_r3d(str(ckpt))
    clip = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        got = tv.double().eval()(clip)
        want = ours.double().eval()(clip)
        trunk, _ = query.double()(clip)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, trunk, rtol=0, atol=1e-12)
    # the query encoder, not the momentum copy
    assert not torch.equal(state["stem.0.weight"], torch.load(ckpt, weights_only=True)["model"]
                           ["rgb_encoder_k.stem.0.weight"])


def test_export_is_reproducible(full_width_checkpoint, tmp_path):
    ckpt, _ = full_width_checkpoint
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["export", str(ckpt), "-o", str(a)]) == 0
    assert main(["export", str(ckpt), "-o", str(b)]) == 0
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_export_refuses_bad_input_in_one_line(full_width_checkpoint, tmp_path, capsys):
    ckpt, _ = full_width_checkpoint
    out = str(tmp_path / "out.pt")
    assert "no such checkpoint" in _error(capsys, ["export", str(tmp_path / "nope.pt"), "-o", out])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip file at all")
    assert "not a readable checkpoint" in _error(capsys, ["export", str(garbage), "-o", out])
    # an exported file is an r3d_18 state dict, not a pretraining checkpoint
    assert main(["export", str(ckpt), "-o", out]) == 0
    assert "already" in _error(capsys, ["export", out, "-o", str(tmp_path / "again.pt")])
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"model": {"backbone.conv.weight": torch.zeros(1)}})
    assert "no rgb_encoder.* weights" in _error(capsys, ["export", str(other), "-o", out])
    assert "is a folder" in _error(capsys, ["export", str(ckpt), "-o", str(tmp_path)])
    assert not (tmp_path / "again.pt").exists()


def test_export_refuses_a_narrow_encoder(tmp_path, capsys):
    model = MSCL(load_config(None, TINY_TRAIN)).state_dict()           # model.rgb_width=8
    ckpt = tmp_path / "narrow.pt"
    save_checkpoint(ckpt, {"model": model, "step": 1})
    out = tmp_path / "r3d18.pt"
    err = _error(capsys, ["export", str(ckpt), "-o", str(out)])
    assert "8 channels wide" in err and "width 64" in err
    assert not out.exists()
