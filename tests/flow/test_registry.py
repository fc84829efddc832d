"""Registry, protocol checks and the shared helpers of mscl_stream.flow.base."""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mscl_stream.flow as flow_pkg
from mscl_stream.config import FlowConfig
from mscl_stream.errors import UserError
from mscl_stream.flow import available_estimators, estimator_from_config, get_estimator, register_estimator
from mscl_stream.flow.base import (auto_chunk_size, check_pair, crop_padding, pad_to_multiple, run_chunked,
                                   validate_estimator)

BUILTINS = {"raft_small", "raft_large", "tvl1", "dis_ultrafast", "dis_fast", "dis_medium", "farneback", "dali_of"}


class ConstantFlow:
    """A trivially correct estimator for registry round trips: flow = (u, v) everywhere."""

    def __init__(self, u: float = 1.0, v: float = -2.0, device: str = "cpu"):
        self.name, self.device, self.u, self.v = "constant", torch.device(device), u, v

    def __call__(self, a, b):
        out = torch.empty(a.shape[0], 2, *a.shape[-2:], device=a.device)
        out[:, 0], out[:, 1] = self.u, self.v
        return out

    def describe(self):
        return {"name": self.name, "options": {"u": self.u, "v": self.v}, "weights": None}


def test_available_lists_all_builtins():
    assert BUILTINS <= set(available_estimators())
    assert available_estimators() == sorted(available_estimators())


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError, match="unknown flow estimator 'nope'.*dis_fast.*raft_small"):
        get_estimator("nope")


def test_register_round_trip(monkeypatch):
    monkeypatch.setattr(flow_pkg, "_REGISTERED", {})
    register_estimator("const", ConstantFlow)
    assert "const" in available_estimators()
    est = get_estimator("const", u=3.0, v=0.5)
    a = torch.zeros(2, 3, 16, 20, dtype=torch.uint8)
    out = est(a, a)
    assert out.shape == (2, 2, 16, 20)
    assert torch.all(out[:, 0] == 3.0) and torch.all(out[:, 1] == 0.5)
    # a string factory is imported lazily
    register_estimator("const2", f"{__name__}:ConstantFlow")
    assert get_estimator("const2", u=-1.0)(a, a)[0, 0, 0, 0].item() == -1.0
    with pytest.raises(UserError):
        register_estimator("bad:name", ConstantFlow)
    with pytest.raises(UserError):
        register_estimator("x", 42)


@pytest.fixture
def byo_module(tmp_path, monkeypatch):
    """A user module on sys.path with good and broken factories."""
    (tmp_path / "my_flow_mod.py").write_text(textwrap.dedent("""
        import torch

        class Good:
            name = "good"
            device = torch.device("cpu")
            def __init__(self, scale=1.0):
                self.scale = scale
            def __call__(self, a, b):
                return torch.full((a.shape[0], 2, *a.shape[-2:]), self.scale)
            def describe(self):
                return {"name": "good", "options": {"scale": self.scale}, "weights": None}

        class WrongShape(Good):
            def __call__(self, a, b):
                return torch.zeros(a.shape[0], 3, *a.shape[-2:])

        class WrongDtype(Good):
            def __call__(self, a, b):
                return torch.zeros(a.shape[0], 2, *a.shape[-2:], dtype=torch.float64)

        class NoDescribe:
            name = "x"
            device = "cpu"
            def __call__(self, a, b):
                return torch.zeros(a.shape[0], 2, *a.shape[-2:])

        class Crashes(Good):
            def __call__(self, a, b):
                raise RuntimeError("boom")

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_flow_mod"


def test_module_factory_builds_and_validates(byo_module):
    est = get_estimator(f"{byo_module}:Good", scale=2.0)
    assert est.describe()["options"] == {"scale": 2.0}


@pytest.mark.parametrize("attr, message", [
    ("WrongShape", "must return a \\(N,2,H,W\\) float32"),
    ("WrongDtype", "float64"),
    ("NoDescribe", "no attribute 'describe'"),
    ("Crashes", "RuntimeError: boom"),
    ("NOT_CALLABLE", "not callable"),
    ("Missing", "has no attribute 'Missing'"),
])
def test_bad_module_factories(byo_module, attr, message):
    with pytest.raises(UserError, match=message):
        get_estimator(f"{byo_module}:{attr}")


def test_bad_factory_option_and_missing_module(byo_module):
    with pytest.raises(UserError, match="bad options"):
        get_estimator(f"{byo_module}:Good", nonsense=1)
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        get_estimator("no_such_module_xyz:make")
    with pytest.raises(UserError, match="package.module:factory"):
        get_estimator(":make")


def test_builtin_fixed_option_clash():
    with pytest.raises(UserError, match="fixes option"):
        get_estimator("dis_fast", method="farneback")


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="needs OpenCV")
def test_estimator_from_config_passes_only_explicit_knobs():
    est = estimator_from_config(FlowConfig(estimator="dis_fast"), device="cpu")
    assert est.name == "dis_fast"
    with pytest.raises(UserError, match="does not take option.*weights"):
        estimator_from_config(FlowConfig(estimator="dis_fast", weights="some.pth"), device="cpu")


def _cpu_estimators() -> list[str]:
    names = []
    for n in sorted(BUILTINS):
        if n == "dali_of":
            continue                              # GPU hardware only
        if n == "tvl1" and importlib.util.find_spec("mscl_stream.flow.tvl1") is None:
            continue
        if n in ("dis_ultrafast", "dis_fast", "dis_medium", "farneback") and importlib.util.find_spec("cv2") is None:
            continue
        names.append(n)
    return names


# tiny settings keep this fast: the accuracy of each estimator is tested elsewhere
_FAST = {"raft_small": {"weights": "none", "iters": 2}, "raft_large": {"weights": "none", "iters": 1},
         "tvl1": {"nscales": 2, "warps": 2}}
_CASES = [(n, d) for n in _cpu_estimators() for d in (torch.uint8, torch.float32)
          if not (n == "raft_large" and d == torch.float32)]


@pytest.mark.parametrize("name, dtype", _CASES)
def test_protocol_on_cpu(name, dtype):
    opts = {"device": "cpu", **_FAST.get(name, {})}
    with pytest.warns(UserWarning) if name.startswith("raft") else _nullctx():
        est = get_estimator(name, **opts)
    h, w = (128, 136) if name.startswith("raft") else (48, 60)   # RAFT's minimum is 128 px
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(2, 3, h, w, generator=g) * 255).to(dtype)
    b = torch.roll(a, shifts=1, dims=-1)
    out = est(a, b)
    assert out.shape == (2, 2, h, w) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    d = est.describe()
    assert d["name"] == est.name == name and "options" in d and "weights" in d
    if not name.startswith("raft"):
        validate_estimator(est, name)   # the check used for user estimators accepts built-ins


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dali_of_needs_gpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the GPU checks")
    with pytest.raises(UserError, match="dali_of needs an NVIDIA GPU"):
        get_estimator("dali_of")


# --- base helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w", [(13, 17), (16, 24), (121, 130)])
def test_pad_to_multiple_replicates_and_crops_back(h, w):
    x = torch.rand(2, 3, h, w, dtype=torch.float64)
    padded, pads = pad_to_multiple(x, 8)
    ph, pw = (-h) % 8, (-w) % 8
    assert padded.shape == (2, 3, h + ph, w + pw)
    top, left = ph // 2, pw // 2
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (top, ph - top), (left, pw - left)), mode="edge")
    np.testing.assert_array_equal(padded.numpy(), ref)
    assert torch.equal(crop_padding(padded, pads), x)


def test_check_pair_errors():
    ok = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    check_pair(ok, ok)
    with pytest.raises(UserError, match="shape \\(N, 3, H, W\\)"):
        check_pair(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match="uint8 or floating"):
        check_pair(ok.int(), ok.int())
    with pytest.raises(UserError, match="differ in shape"):
        check_pair(ok, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(UserError, match="\\[0, 255\\]"):
        check_pair(ok.float() + 300, ok.float())
    with pytest.raises(UserError, match="\\[0, 255\\]"):
        check_pair(ok.float() - 1, ok.float())
    nan = ok.float()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError):
        check_pair(nan, ok.float())
    with pytest.raises(UserError, match="must be a torch.Tensor"):
        check_pair(np.zeros((1, 3, 8, 8)), ok)


def test_run_chunked_matches_unchunked_and_sizes():
    a = torch.rand(7, 3, 4, 5)
    b = torch.rand(7, 3, 4, 5)
    seen = []

    def fn(x, y):
        seen.append(x.shape[0])
        return (x - y)[:, :2] * 2

    full = (a - b)[:, :2] * 2
    assert torch.equal(run_chunked(fn, a, b, 3), full)
    assert seen == [3, 3, 1]
    assert auto_chunk_size(1e12, torch.device("cpu"), 10) == 1
    assert auto_chunk_size(1.0, torch.device("cpu"), 10) == 10
    assert auto_chunk_size(2 ** 28, torch.device("cpu"), 100, cpu_budget=2 ** 30) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_of_translation_or_clear_error():
    """Hardware flow of a (3 right, 1 down) shift; a GPU without the engine gives a UserError."""
    if importlib.util.find_spec("nvidia.dali") is None:
        pytest.skip("nvidia-dali not installed")
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(2, 3, 24, 32, generator=g), size=(136, 184), mode="bicubic",
                         align_corners=False).clamp(0, 1) * 255
    a = base[..., 4:132, 4:180].round().to(torch.uint8).cuda()
    b = base[..., 3:131, 1:177].round().to(torch.uint8).cuda()   # content moves by (+3, +1)
    try:
        est = get_estimator("dali_of")
        flow = est(a.contiguous(), b.contiguous())
    except UserError as e:
        pytest.skip(f"optical-flow hardware not usable here: {e}")
    assert flow.shape == (2, 2, 128, 176) and flow.dtype == torch.float32 and flow.is_cuda
    inner = flow[..., 16:-16, 16:-16]
    assert abs(inner[:, 0].median().item() - 3.0) < 0.5 and abs(inner[:, 1].median().item() - 1.0) < 0.5
