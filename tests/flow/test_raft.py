"""RAFT estimator: lean loop vs torchvision, input scaling/padding, weight loading and error paths."""

from __future__ import annotations

import os
import re
import urllib.error
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import Raft_Small_Weights, raft_large, raft_small

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator

pytestmark = pytest.mark.filterwarnings("ignore:raft_.*RANDOM INITIALISATION")


def frames(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, h // 8 + 1, w // 8 + 1, generator=g), size=(h, w + 2),
                         mode="bilinear", align_corners=False)
    x = (base * 255).round().to(torch.uint8)
    return x[..., 2:].contiguous(), x[..., :-2].contiguous()


def tv_reference(model, a: torch.Tensor, b: torch.Tensor, iters: int) -> torch.Tensor:
    """torchvision's own forward on [-1, 1] inputs; last prediction."""
    with torch.no_grad():
        x1 = a.double().div(255).mul(2).sub(1).float()
        x2 = b.double().div(255).mul(2).sub(1).float()
        return model(x1, x2, num_flow_updates=iters)[-1]


@pytest.mark.parametrize("arch", ["small", "large"])
def test_lean_loop_equals_torchvision(arch):
    torch.manual_seed(0)
    n, iters = (2, 3) if arch == "small" else (1, 2)
    est = get_estimator(f"raft_{arch}", weights="none", iters=iters, device="cpu")
    a, b = frames(n, 128, 128)
    out = est(a, b)
    ref = tv_reference(est.model, a, b, iters)
    assert out.shape == ref.shape == (n, 2, 128, 128)
    assert ref.abs().max() > 0.1                     # a non-trivial field
    assert (out - ref).abs().max().item() < 1e-4
    if arch == "small":   # the model's own forward behind our wrapper agrees too
        tv = get_estimator("raft_small", weights="none", iters=iters, device="cpu", loop="torchvision")
        tv.model.load_state_dict(est.model.state_dict())
        assert (tv(a, b) - ref).abs().max().item() < 1e-4


def test_padding_to_multiple_of_8_and_crop_back():
    torch.manual_seed(0)
    est = get_estimator("raft_small", weights="none", iters=2, device="cpu")
    a, b = frames(1, 130, 141)
    out = est(a, b)
    assert out.shape == (1, 2, 130, 141)
    # reference: replicate-pad to 136x144 (split evenly, extra on the right/bottom), run, crop
    pad = (1, 2, 3, 3)      # left, right, top, bottom for +3 columns and +6 rows
    pa = F.pad(a.float(), pad, mode="replicate")
    pb = F.pad(b.float(), pad, mode="replicate")
    ref = tv_reference(est.model, pa, pb, 2)[..., 3:-3, 1:-2]
    assert (out - ref).abs().max().item() < 1e-4


def test_float_and_uint8_inputs_agree_and_chunking():
    torch.manual_seed(0)
    est = get_estimator("raft_small", weights="none", iters=2, device="cpu")
    a, b = frames(2, 128, 128, seed=2)
    full = est(a, b)
    assert (est(a.float(), b.float()) - full).abs().max() < 1e-5
    chunked = get_estimator("raft_small", weights="none", iters=2, chunk_size=1, device="cpu")
    chunked.model.load_state_dict(est.model.state_dict())
    assert (chunked(a, b) - full).abs().max() < 1e-4
    assert not full.is_inference() and full.dtype == torch.float32


def test_too_small_size_suggests_working_size():
    est = get_estimator("raft_small", weights="none", iters=1, device="cpu")
    a, b = frames(1, 112, 112)
    with pytest.raises(UserError, match="at least 128 px.*112x112.*128x128"):
        est(a, b)
    a, b = frames(1, 96, 128)
    with pytest.raises(UserError, match="128x176"):
        est(a, b)


def test_random_init_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        est = get_estimator("raft_small", weights="none")
    assert "random" in est.describe()["weights"]


def test_cpu_ignores_gpu_only_options_with_warnings():
    with pytest.warns(UserWarning, match="bf16 is GPU-only"):
        est = get_estimator("raft_small", weights="none", precision="bf16", device="cpu")
    assert est.precision == "fp32"
    with pytest.warns(UserWarning, match="compile=True needs a CUDA device"):
        est = get_estimator("raft_small", weights="none", compile=True, device="cpu")
    assert est.compile is False
    with pytest.raises(UserError, match="precision"):
        get_estimator("raft_small", weights="none", precision="int8")
    with pytest.raises(UserError, match="does not take option"):
        get_estimator("raft_small", weights="none", warps=3)


# --- speed variants (corr=triton is tested in tests/kernels/test_corr_lookup.py) ------------------

def test_channels_last_equals_torchvision():
    torch.manual_seed(0)
    est = get_estimator("raft_small", weights="none", iters=2, device="cpu", channels_last=True)
    a, b = frames(2, 128, 176, seed=5)
    out = est(a, b)
    assert est.model.feature_encoder.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (out - tv_reference(est.model, a, b, 2)).abs().max().item() < 1e-4


def tv_warm_reference(model, a, b, iters: int, init: torch.Tensor | None):
    """torchvision's own forward started from ``init`` (n, 2, h/8, w/8) coarse flow instead of zero
    (its second coords grid is shifted); returns the last prediction and the final coarse flow."""
    import torchvision.models.optical_flow.raft as tv
    calls, deltas = [], []
    real = tv.make_coords_grid

    def grid(*args, **kwargs):
        g = real(*args, **kwargs)
        calls.append(1)
        return g + init if (init is not None and len(calls) == 2) else g
    hook = model.update_block.register_forward_hook(lambda mod, inp, out: deltas.append(out[1]))
    tv.make_coords_grid = grid
    try:
        out = tv_reference(model, a, b, iters)
    finally:
        tv.make_coords_grid = real
        hook.remove()
    coarse = sum(deltas) + (init if init is not None else 0)
    return out, coarse


def test_warm_start_chains_match_torchvision_started_from_the_previous_flow():
    torch.manual_seed(0)
    est = get_estimator("raft_small", weights="none", iters=3, device="cpu", warm_start=2, warm_iters=2)
    a, b = frames(4, 128, 128, seed=6)      # two chains of two pairs: (0, 1), (2, 3)
    out = est(a, b)
    first, coarse = tv_warm_reference(est.model, a[0::2], b[0::2], 3, None)
    second, _ = tv_warm_reference(est.model, a[1::2], b[1::2], 2, coarse)
    assert coarse.abs().max() > 0.1
    assert (out[0::2] - first).abs().max().item() < 1e-4
    assert (out[1::2] - second).abs().max().item() < 1e-4
    # a chunked run keeps chains whole and gives the same answer
    chunked = get_estimator("raft_small", weights="none", iters=3, device="cpu", warm_start=2, warm_iters=2,
                            chunk_size=3)
    chunked.model.load_state_dict(est.model.state_dict())
    assert (chunked(a, b) - out).abs().max().item() < 1e-4


def test_variant_option_errors():
    with pytest.raises(UserError, match="corr must be one of"):
        get_estimator("raft_small", weights="none", corr="cuda_ext")
    with pytest.raises(UserError, match="need loop=lean"):
        get_estimator("raft_small", weights="none", loop="torchvision", warm_start=4)
    est = get_estimator("raft_small", weights="none", iters=1, device="cpu", warm_start=4)
    assert est.warm_iters == 1 and est.describe()["options"]["warm_start"] == 4
    a, b = frames(6, 128, 128)
    with pytest.raises(UserError, match="whole chains of 4 pairs, got 6"):
        est(a, b)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.warns(UserWarning, match="corr=triton needs a CUDA device"):
            est = get_estimator("raft_small", weights="none", corr="triton", device="cpu")
        assert est.corr == "grid_sample"


# --- weights ------------------------------------------------------------------------------------

def test_torchvision_state_dict_round_trip(tmp_path):
    torch.manual_seed(123)
    src = raft_small()
    path = tmp_path / "small.pth"
    torch.save(src.state_dict(), path)
    est = get_estimator("raft_small", weights=str(path), iters=2, device="cpu")
    for k, v in src.state_dict().items():
        assert torch.equal(est.model.state_dict()[k], v), k
    assert str(path.resolve()) in est.describe()["weights"]
    # also accepted wrapped as {"state_dict": ...}
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    est2 = get_estimator("raft_small", weights=str(tmp_path / "wrapped.pth"), iters=2)
    assert torch.equal(est2.model.feature_encoder.conv.weight, src.feature_encoder.conv.weight)


# The inverse of the princeton-vl -> torchvision mapping, written from the original repository's
# module names (core/extractor.py, core/update.py): torchvision name -> original names.
def to_princeton(tv_state: dict, arch: str) -> dict:
    n_convs = 3 if arch == "small" else 2
    out = {}
    for key, value in tv_state.items():
        names = []
        enc, _, rest = key.partition(".")
        if enc in ("feature_encoder", "context_encoder"):
            net = {"feature_encoder": "fnet", "context_encoder": "cnet"}[enc]
            parts = rest.split(".")
            if parts[0] == "convnormrelu":                      # stem: conv1 + norm1
                names.append(f"{net}.{'conv1' if parts[1] == '0' else 'norm1'}." + ".".join(parts[2:]))
            elif parts[0] == "conv":                            # output 1x1 conv
                names.append(f"{net}.conv2." + ".".join(parts[1:]))
            else:                                               # layerL.B....
                blk = f"{net}.{parts[0]}.{parts[1]}"
                if parts[2].startswith("convnormrelu"):
                    i = parts[2][-1]
                    kind = "conv" if parts[3] == "0" else "norm"
                    names.append(f"{blk}.{kind}{i}." + ".".join(parts[4:]))
                else:                                           # downsample.0 / downsample.1
                    names.append(f"{blk}.downsample.{parts[3]}." + ".".join(parts[4:]))
                    if parts[3] == "1":                         # the same norm module, registered twice
                        names.append(f"{blk}.norm{n_convs + 1}." + ".".join(parts[4:]))
        elif key.startswith("update_block.motion_encoder."):
            sub = key.split(".")[2]
            table = {"convcorr1": "convc1", "convcorr2": "convc2", "convflow1": "convf1",
                     "convflow2": "convf2", "conv": "conv"}
            names.append(f"update_block.encoder.{table[sub]}." + key.split(".")[-1])
        elif key.startswith("update_block.recurrent_block."):
            gru, conv, param = key.split(".")[2:]
            suffix = gru[-1] if arch == "large" else ""
            names.append(f"update_block.gru.{conv}{suffix}.{param}")
        elif key.startswith("update_block.flow_head."):
            names.append(key)
        elif key.startswith("mask_predictor."):
            idx = "0" if key.startswith("mask_predictor.convrelu") else "2"
            names.append(f"update_block.mask.{idx}." + key.split(".")[-1])
        else:
            raise AssertionError(f"unmapped torchvision key {key}")
        for name in names:
            out["module." + name] = value.clone()
    return out


KNOWN_ORIGINAL = {   # names and shapes as the original RAFT code defines its layers
    "large": {"module.fnet.conv2.weight": (256, 128, 1, 1), "module.update_block.mask.2.weight": (576, 256, 1, 1),
              "module.update_block.gru.convq2.weight": (128, 384, 5, 1),
              "module.cnet.layer2.0.norm3.running_mean": (96,),
              "module.update_block.encoder.convc1.weight": (256, 324, 1, 1)},
    "small": {"module.fnet.conv2.weight": (128, 96, 1, 1), "module.update_block.gru.convz.weight": (96, 242, 3, 3),
              "module.cnet.layer3.0.conv3.weight": (96, 24, 1, 1),
              "module.update_block.encoder.convc1.weight": (96, 196, 1, 1)},
}


@pytest.mark.parametrize("arch", ["small", "large"])
def test_princeton_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(7)
    src = (raft_small if arch == "small" else raft_large)()
    if arch == "large":    # non-trivial batch-norm statistics, so the norm3/downsample.1 mapping matters
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = to_princeton(src.state_dict(), arch)
    for k, shape in KNOWN_ORIGINAL[arch].items():
        assert tuple(ckpt[k].shape) == shape, k
    path = tmp_path / f"raft-{arch}.pth"
    torch.save(ckpt, path)
    est = get_estimator(f"raft_{arch}", weights=str(path), iters=2, device="cpu")
    own = est.model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(own[k], v), k
    assert "princeton-vl" in est.describe()["weights"]
    if arch == "small":
        a, b = frames(1, 128, 128, seed=4)
        assert (est(a, b) - tv_reference(src.eval(), a, b, 2)).abs().max() < 1e-4


def test_weight_error_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_estimator("raft_small", weights=str(tmp_path / "missing.pth"))
    sd = raft_small().state_dict()
    bad = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save(bad, tmp_path / "wrong_keys.pth")
    with pytest.raises(UserError, match="do not match raft_small: 1 missing"):
        get_estimator("raft_small", weights=str(tmp_path / "wrong_keys.pth"))
    torch.save(raft_large().state_dict(), tmp_path / "large.pth")
    with pytest.raises(UserError, match="raft_large checkpoint"):
        get_estimator("raft_small", weights=str(tmp_path / "large.pth"))
    # same key names, other shapes: an architecture mismatch
    shaped = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "feature_encoder.conv.weight" else v)
              for k, v in sd.items()}
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(UserError, match="feature_encoder.conv.weight has shape"):
        get_estimator("raft_small", weights=str(tmp_path / "shaped.pth"))
    torch.save({"a": 1}, tmp_path / "notsd.pth")
    with pytest.raises(UserError, match="state_dict"):
        get_estimator("raft_small", weights=str(tmp_path / "notsd.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot load RAFT weights"):
        get_estimator("raft_small", weights=str(tmp_path / "garbage.pth"))
    torch.save({"module.foo.bar": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="unrecognised key"):
        get_estimator("raft_small", weights=str(tmp_path / "odd.pth"))


def test_enum_names(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="unknown RAFT weights"):
        get_estimator("raft_small", weights="C_T_V9")
    with pytest.raises(UserError, match="has no member"):
        get_estimator("raft_small", weights="Raft_Small_Weights.C_T_V9")
    with pytest.raises(UserError, match="not raft_small"):
        get_estimator("raft_small", weights="Raft_Large_Weights.C_T_SKHT_V2")

    # offline: the download fails -> one line saying where to place the file
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(Raft_Small_Weights, "get_state_dict", offline)
    expected = os.path.basename(Raft_Small_Weights.C_T_V2.url)
    with pytest.raises(UserError, match=re.escape(expected) + ".*" + re.escape(str(tmp_path))):
        get_estimator("raft_small", weights="C_T_V2")

    # a file of the enum's download name in $TORCH_HOME/hub/checkpoints is used without a download
    torch.manual_seed(9)
    src = raft_small()
    (tmp_path / "checkpoints").mkdir()
    torch.save(src.state_dict(), tmp_path / "checkpoints" / expected)
    for spec in ("C_T_V2", "Raft_Small_Weights.C_T_V2", "DEFAULT"):
        est = get_estimator("raft_small", weights=spec, iters=1)
        assert torch.equal(est.model.feature_encoder.conv.weight, src.feature_encoder.conv.weight)
        assert est.describe()["weights"].startswith("torchvision:Raft_Small_Weights.C_T_V2")


# --- GPU ----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
def test_gpu_precisions_and_graphs_match_fp32(monkeypatch):
    # strict fp32 on the GPU for the comparison with the CPU: cuDNN convolutions default to TF32
    # (measured: 3.8e-3 px max difference at 128x176 on an H200 with TF32 on)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    ref_est = get_estimator("raft_small", weights="none", iters=4, precision="fp32", device="cuda")
    sd = ref_est.model.state_dict()
    a, b = (t.cuda() for t in frames(4, 128, 176, seed=1))
    ref = ref_est(a, b)
    cpu = tv_reference(ref_est.model, a, b, 4)
    assert (ref - cpu).abs().max() < 1e-3
    for opts, tol in (({"cuda_graph": True, "precision": "fp32"}, 1e-4),
                      ({"precision": "bf16"}, None)):
        est = get_estimator("raft_small", weights="none", iters=4, device="cuda", **opts)
        est.model.load_state_dict(sd)
        out = est(a, b)
        out2 = est(a, b)                      # a replay (graphs) gives the same answer
        assert out.shape == ref.shape and out.device.type == "cuda" and out.dtype == torch.float32
        assert torch.allclose(out, out2, atol=1e-5)
        err = (out - ref).abs().mean().item()
        if tol is not None:
            assert (out - ref).abs().max().item() < tol
        else:                                 # bf16: close on average relative to the field's size
            assert err < 0.05 * ref.abs().mean().item() + 1e-3


@gpu
def test_gpu_speed_variants_match_fp32(monkeypatch):
    """The speed options (Triton lookup, compiled update block, channels_last, in CUDA graphs) give
    the eager fp32 answer on the GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    ref_est = get_estimator("raft_small", weights="none", iters=4, precision="fp32", device="cuda")
    a, b = (t.cuda() for t in frames(8, 128, 176, seed=1))
    ref = ref_est(a, b)
    for opts in ({"corr": "triton"}, {"corr": "triton", "cuda_graph": True}, {"channels_last": True},
                 {"compile_update": True, "corr": "triton", "cuda_graph": True}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = get_estimator("raft_small", weights="none", iters=4, precision="fp32", device="cuda", **opts)
            est.model.load_state_dict(ref_est.model.state_dict())
            out = est(a, b)
            out2 = est(a, b)
        fallbacks = [str(w.message) for w in caught if "failed" in str(w.message) or "needs" in str(w.message)]
        assert not fallbacks, fallbacks         # no fallback to eager (failed compile or capture)
        assert est.corr == opts.get("corr", "grid_sample")
        assert (out - ref).abs().max().item() < 1e-3, opts
        assert torch.allclose(out, out2, atol=1e-5), opts
