"""Retrieval recall on hand-worked toy galleries; clip positions, normalisation and encoder loading."""


import numpy as np
import pytest
import torch
from torchvision.models.video import r3d_18

from mscl_stream.errors import UserError
from mscl_stream.eval import features as FE
from mscl_stream.eval.retrieval import retrieval_recall, top1_confusion

T = torch.tensor


def _ref_recall(q, ql, g, gl, k, centre=True):
    """Loop reference in float64: cosine similarity after optional per-set centring."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if centre:
        q, g = q - q.mean(0), g - g.mean(0)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    hits = 0
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: -float(q[i] @ g[j]))
        hits += any(gl[j] == ql[i] for j in order[:k])
    return hits / len(q)


def test_hand_worked_2d_gallery():
    # Gallery and queries both have mean 0, so centring leaves them alone.
    g = T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gl = T([0, 1, 2, 1])
    q = T([[2.0, 0.5], [-2.0, -0.5], [0.0, 0.0]])
    ql = T([1, 2, 7])
    # q0 ~ (0.97, 0.24): order g0 (label 0), g1 (1), g3 (1), g2 (2) -> first hit at rank 2
    # q1 ~ (-0.97, -0.24): order g2 (2) ... -> hit at rank 1
    # q2 = 0: label 7 is not in the gallery -> never a hit
    r = retrieval_recall(q, ql, g, gl, ks=(1, 2, 4, 50))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@4": pytest.approx(2 / 3),
                 "R@50": pytest.approx(2 / 3)}   # k = 50 > 4 gallery items is clipped to 4


def test_each_set_is_centred_by_its_own_mean():
    g = T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gl = T([0, 1, 2, 1])
    q = T([[2.0, 0.5], [-2.0, -0.5], [0.0, 0.0]])
    ql = T([1, 2, 7])
    base = retrieval_recall(q, ql, g, gl, ks=(1, 2))
    g_off, q_off = g + T([10.0, 10.0]), q + T([-5.0, 3.0])
    assert retrieval_recall(q_off, ql, g_off, gl, ks=(1, 2)) == base
    # Without centring a gallery offset alone changes the answer: g + (10, 10) puts the gallery at
    # angles 42.3, 47.7, 48.0, 42.0 deg; q0 (14 deg) is then nearest g3 (label 1, a hit) and q1 (194 deg)
    # nearest g2 (label 2, a hit): R@1 = 2/3 instead of 1/3. Centring removes the offset.
    assert _ref_recall(q, ql.tolist(), g_off, gl.tolist(), 1, centre=False) == pytest.approx(2 / 3)
    assert retrieval_recall(q, ql, g_off, gl, ks=(1,))["R@1"] == pytest.approx(1 / 3)


def test_3d_points_against_loop_reference():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(30, 3, generator=gen) + 2.0
    gl = torch.randint(0, 4, (30,), generator=gen)
    q = torch.randn(17, 3, generator=gen) - 1.0
    ql = torch.randint(0, 4, (17,), generator=gen)
    got = retrieval_recall(q, ql, g, gl, ks=(1, 5, 10, 20, 50), chunk=5)
    for k in (1, 5, 10, 20, 50):
        assert got[f"R@{k}"] == pytest.approx(_ref_recall(q, ql.tolist(), g, gl.tolist(), min(k, 30)))
    assert got["R@50"] == 1.0   # all 4 labels appear in the gallery of 30


def test_top1_confusion_hand_worked_and_against_loop_reference():
    # the hand-worked gallery above: q0 is nearest g0 (label 0), q1 nearest g2 (label 2)
    g = T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gl = T([0, 1, 2, 1])
    conf = top1_confusion(T([[2.0, 0.5], [-2.0, -0.5]]), T([1, 2]), g, gl, num_classes=3)
    assert conf.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 1]]

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 5, generator=gen)
    gl = torch.randint(0, 4, (40,), generator=gen)
    q = torch.randn(23, 5, generator=gen) + 0.3
    ql = torch.randint(0, 4, (23,), generator=gen)
    qn, gn = q.double() - q.double().mean(0), g.double() - g.double().mean(0)
    qn, gn = qn / qn.norm(dim=1, keepdim=True), gn / gn.norm(dim=1, keepdim=True)
    ref = [[0] * 4 for _ in range(4)]
    for i in range(23):
        sims = [float(qn[i] @ gn[j]) for j in range(40)]
        ref[int(ql[i])][int(gl[max(range(40), key=sims.__getitem__)])] += 1
    got = top1_confusion(q, ql, g, gl, num_classes=4, chunk=6)
    assert got.tolist() == ref
    assert got.trace().item() / 23 == pytest.approx(_ref_recall(q, ql.tolist(), g, gl.tolist(), 1))
    with pytest.raises(ValueError, match="labels"):
        top1_confusion(q, ql, g, gl, num_classes=3)


# ----------------------------------------------------------------------------- clips and features


def test_normalise_clip_centre_crop_and_imagenet():
    frames = torch.randint(0, 256, (2, 6, 8, 3), dtype=torch.uint8)
    out = FE.normalise_clip(frames, 4)
    assert out.shape == (3, 2, 4, 4)
    f = frames.numpy().astype(np.float64)[:, 1:5, 2:6] / 255.0        # rows (6-4)//2, cols (8-4)//2
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = ((f - mean) / std).transpose(3, 0, 1, 2)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def _fake_mscl_state(seed):
    torch.manual_seed(seed)
    trunk = r3d_18(weights=None)
    sd = {f"rgb_encoder.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    # the momentum encoder's keys share the name start "rgb_encoder" but must not be picked
    sd["rgb_encoder_k.stem.0.weight"] = torch.ones(64, 3, 3, 7, 7)
    sd["flow_encoder.stem.0.weight"] = torch.zeros(16, 3, 1, 7, 7)
    return trunk, {"model": sd, "step": 10}


def test_encoder_from_checkpoint(tmp_path):
    from mscl_stream.train.checkpoint import save_checkpoint

    trunk, state = _fake_mscl_state(1)
    ckpt = save_checkpoint(tmp_path / "last.pt", state)
    net, desc = FE.build_r3d(str(ckpt))
    assert desc == f"checkpoint:{ckpt}"
    for k, v in trunk.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(net.state_dict()[k], v), k
    x = torch.randn(1, 3, 2, 16, 16)
    trunk.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), trunk.eval()(x))
    assert net.eval()(x).shape == (1, 512)
    # DDP-style "module." prefixes are accepted; fc and the key encoder are left out
    w = torch.randn(64, 3, 3, 7, 7)
    small = {"model": {"module.rgb_encoder.stem.0.weight": w, "module.rgb_encoder.fc.weight": torch.ones(2),
                       "module.rgb_encoder_k.stem.0.weight": torch.zeros(1)}}
    sub = FE.encoder_state_from_checkpoint(str(save_checkpoint(tmp_path / "ddp.pt", small)))
    assert list(sub) == ["stem.0.weight"] and torch.equal(sub["stem.0.weight"], w)
    with pytest.raises(UserError, match=r"no encoder weights under prefix 'query\.'.*'module\.rgb_encoder\.'"):
        FE.build_r3d(str(tmp_path / "ddp.pt"), prefix="query.")
    # an incomplete trunk is an architecture mismatch, not a partial load
    with pytest.raises(UserError, match="missing keys"):
        FE.build_r3d(str(tmp_path / "ddp.pt"))


def test_random_init_baseline_is_seeded():
    a, da = FE.build_r3d(None, seed=3)
    b, _ = FE.build_r3d(None, seed=3)
    c, _ = FE.build_r3d(None, seed=4)
    assert da == "random-init(seed=3)"
    w = "layer1.0.conv1.0.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    head, _ = FE.build_r3d(None, num_classes=7)
    assert head(torch.randn(2, 3, 2, 16, 16)).shape == (2, 7)


def test_narrow_trunk_width_comes_from_the_checkpoint(tmp_path):
    # A pretrain checkpoint of a narrow trunk (model.rgb_width=16) loads as that width whatever width the
    # caller passes for the random baseline; the baseline itself follows the width argument.
    from mscl_stream.models.r3d import R3DBackbone
    from mscl_stream.train.checkpoint import save_checkpoint

    torch.manual_seed(2)
    bb = R3DBackbone(16).eval()
    ckpt = save_checkpoint(tmp_path / "narrow.pt", {"model": {f"rgb_encoder.{k}": v for k, v in bb.state_dict().items()}})
    net, _ = FE.build_r3d(str(ckpt), width=64)
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), bb(x)[0])
    rnd, desc = FE.build_r3d(None, seed=0, width=16)
    assert desc == "random-init(seed=0), width 16"
    assert rnd.eval()(x).shape == (2, 128)
    head, _ = FE.build_r3d(str(ckpt), num_classes=4)
    assert head.fc[1].in_features == 128
