"""Parity of the fused augmentation kernels (RGB view, flow views) with kornia and the torch references.

The kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported, and other tests may already have imported it here). References: the kornia/torch subset
path (``apply_uploaded(..., "torch")``, itself checked against torchvision in tests/test_augment.py),
the kernels' own masked torch reference, and ``motion.flow_views(backend="torch")``.
Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mscl_stream.kernels import augment_rgb as ar

pytestmark = pytest.mark.skipif(not ar.triton_available(), reason="triton does not import")

_SCRIPT = textwrap.dedent("""
    import json, math
    import numpy as np
    import torch
    from mscl_stream import augment as A, motion
    from mscl_stream.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
    from mscl_stream.data.batch import ClipBatch
    from mscl_stream.kernels.augment_rgb import augment_rgb, augment_rgb_reference
    from mscl_stream.kernels.flow_views import flow_views_fused
    from mscl_stream.train.inputs import make_inputs

    out = {}
    g = torch.Generator().manual_seed(3)
    b, t, h, w, s = 8, 2, 20, 26, 12
    cfg = AugmentConfig(out_size=s, jitter_p=0.8, gray_p=0.3, blur_p=0.6, blur_sigma=(0.5, 2.0))
    rgb = torch.randint(0, 256, (b, t, 3, h, w), generator=g, dtype=torch.uint8)
    rgb[0, :, :, :4] = 0                      # black pixels (hue of v = 0), grey pixels (s = 0)
    rgb[1, :, :, :4] = 128
    p = A.sample_params(b, h, w, cfg, g)
    p.order[2] = torch.tensor([3, 1, 0, 2])   # hue, then contrast (the mean is taken after the hue)
    p.jitter[2] = True
    p.flips[3] = True
    out["coverage"] = [bool(p.jitter.any()), bool(p.gray.any()), bool(p.blur.any()), bool((~p.blur).any())]
    (v,), _ = A.upload_views([p], None, torch.device("cpu"), subsets=True)
    k = A.blur_kernel_size(cfg)
    kornia_path = A.apply_uploaded(rgb, v, cfg, "torch").frames
    fused = augment_rgb(rgb, v.table, s, k)
    ref = augment_rgb_reference(rgb, v.table, s, k)
    out["rgb_vs_kornia"] = (fused - kornia_path).abs().max().item()
    out["ref_vs_kornia"] = (ref - kornia_path).abs().max().item()
    lay = augment_rgb(rgb, v.table, s, k, torch.bfloat16, torch.channels_last_3d)
    out["bf16_cl"] = [lay.is_contiguous(memory_format=torch.channels_last_3d), str(lay.dtype),
                      (lay.float() - kornia_path).abs().max().item()]

    flow = torch.randn(b, 2, 2, h, w, generator=g) * 3
    flow[0, 0] = 0.0                          # a still frame: white
    ang = torch.from_numpy(motion.fra_angles_from_uniforms(torch.rand(b, generator=g).numpy()))
    for compat in ("default", "released"):
        bt, rt = motion.flow_views(flow, v.table[:, :4], v.table[:, 4] > 0.5, ang, out_size=s, compat=compat,
                                   backend="torch")
        bf, rf = flow_views_fused(flow, v.table, ang, s, compat)
        lv = torch.cat([(bt - bf).abs().flatten(), (rt - rf).abs().flatten()]) * 255
        out["flow_" + compat] = [lv.max().item(), (lv > 0.5).float().mean().item()]

    # make_inputs end to end: both backends from the same generator state
    bb, tt, nf = 2, 4, 2
    c = Config(data=DataConfig(batch_size=bb, frames_per_clip=tt, frame_size=[24, 32]),
               augment=AugmentConfig(out_size=16, jitter_p=1.0, blur_p=0.5, gray_p=0.5),
               model=ModelConfig(queue_size=8), train=TrainConfig(device="cpu", amp="fp32"))
    u8 = lambda n: torch.randint(0, 256, (bb, n, 3, 24, 32), generator=g, dtype=torch.uint8)
    idx = torch.arange(tt).expand(bb, tt)
    batch = ClipBatch(rgb_a=u8(tt), rgb_b=u8(tt), partner_rgb_a=u8(nf), partner_rgb_b=u8(nf),
                      flow_steps=torch.tensor([0, 2]), frame_idx_a=idx, frame_idx_b=idx, partner_idx_a=idx[:, :nf],
                      partner_idx_b=idx[:, :nf], labels=torch.zeros(bb, dtype=torch.long), video_idx=torch.arange(bb))
    fa, fb = torch.randn(2, bb, nf, 2, 24, 32, generator=g) * 2
    res = {}
    for be in ("torch", "triton"):
        cb = Config(**{**c.__dict__, "augment": AugmentConfig(**{**c.augment.__dict__, "backend": be})})
        res[be] = make_inputs(batch, fa, fb, cb, torch.Generator().manual_seed(7))
    out["make_inputs"] = {k: (getattr(res["torch"], k) - getattr(res["triton"], k)).abs().max().item()
                          for k in ("rgb_q", "rgb_k", "flow_q", "flow_k", "rot_q", "rot_k")}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def parity() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rgb_kernel_matches_kornia_and_reference(parity):
    assert parity["coverage"] == [True, True, True, True]     # jitter, gray, blur and no-blur clips present
    assert parity["rgb_vs_kornia"] < 1e-4                     # normalised units (1/255 ~ 0.017)
    assert parity["ref_vs_kornia"] < 1e-4


def test_rgb_kernel_writes_model_dtype_and_layout(parity):
    is_cl, dtype, err = parity["bf16_cl"]
    assert is_cl and dtype == "torch.bfloat16"
    assert err < 0.02                                         # bf16 rounding of values within about +-2.6


def test_flow_kernel_matches_torch_views(parity):
    for compat in ("default", "released"):
        max_levels, frac = parity["flow_" + compat]
        assert max_levels <= 1.0 + 1e-3 and frac < 0.01, (compat, max_levels, frac)


def test_make_inputs_backends_agree(parity):
    diffs = parity["make_inputs"]
    assert max(diffs[k] for k in ("rgb_q", "rgb_k")) < 1e-4
    assert max(diffs[k] for k in ("flow_q", "flow_k", "rot_q", "rot_k")) <= 1 / 255 + 1e-6


_COMPILE = textwrap.dedent("""
    import math, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mscl_stream.kernels import augment_rgb as ar, flow_views as fv
    from mscl_stream.kernels.flow_encode import TAN_PI_8

    def comp(fn, sig, const):
        sig = {**sig, **{k: "constexpr" for k in const}}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))

    i32, f32 = "i32", "fp32"
    comp(ar._chain_kernel, dict(rgb_ptr="*u8", tab_ptr="*fp32", tab_stride=i32, mid_ptr="*fp32", T=i32, H=i32, W=i32,
                                S=i32),
         dict(C_BOX=0, C_FLIP=4, C_JIT=5, C_FAC=6, C_ORD=10, C_GRAY=14, GR=0.299, GG=0.587, GB=0.114,
              TWO_PI=2 * math.pi, BLOCK=1024))
    for vert, norm, out in ((False, False, "*fp32"), (True, True, "*bf16")):
        comp(ar._blur_kernel, dict(src_ptr="*fp32", tab_ptr="*fp32", tab_stride=i32, out_ptr=out, T=i32, S=i32,
                                   o_b=i32, o_c=i32, o_t=i32, o_h=i32, o_w=i32, m0=f32, m1=f32, m2=f32, s0=f32,
                                   s1=f32, s2=f32),
             dict(C_BLUR=15, C_SIGMA=16, K=13, VERTICAL=vert, NORMALISE=norm, BLOCK=1024))
    comp(fv._max_kernel, dict(flow_ptr="*fp32", inv_ptr="*fp32", HW=i32), dict(EPS=1e-5, BLOCK=1024))
    comp(fv._crop_encode_kernel, dict(flow_ptr="*fp32", inv_ptr="*fp32", tab_ptr="*fp32", tab_stride=i32,
                                      ang_ptr="*fp32", ang_stride=i32, wheel_ptr="*fp32", base_ptr="*bf16",
                                      rot_ptr="*bf16", NF=i32, H=i32, W=i32, S=i32, o_b=i32, o_c=i32, o_t=i32,
                                      o_h=i32, o_w=i32),
         dict(NEGATE_U=True, C_BOX=0, C_FLIP=4, PI=math.pi, TAN_PI_8=TAN_PI_8, NCOLS=55, BLOCK=1024))
    print("compiled")
""")


def test_kernels_compile_for_an_sm90_gpu():
    """The interpreter does not type-check like the compiler (e.g. one type per variable across a runtime
    if); compiling to PTX needs no GPU, so the CUDA path's kernels are checked here too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (no GPU here: compiled parity not run)")
def test_make_inputs_backends_agree_on_cuda():
    """The compiled kernels (CUDA) against the kornia/torch backend on the same device and draws."""
    import torch
    from mscl_stream.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
    from mscl_stream.data.batch import ClipBatch
    from mscl_stream.train.inputs import make_inputs
    g = torch.Generator().manual_seed(0)
    b, t, nf, h, w = 4, 8, 4, 128, 176
    u8 = lambda n: torch.randint(0, 256, (b, n, 3, h, w), generator=g, dtype=torch.uint8)  # noqa: E731
    idx = torch.arange(t).expand(b, t)
    batch = ClipBatch(rgb_a=u8(t), rgb_b=u8(t), partner_rgb_a=u8(nf), partner_rgb_b=u8(nf),
                      flow_steps=torch.arange(0, t, 2),
                      frame_idx_a=idx, frame_idx_b=idx, partner_idx_a=idx[:, :nf], partner_idx_b=idx[:, :nf],
                      labels=torch.zeros(b, dtype=torch.long), video_idx=torch.arange(b)).to("cuda")
    fa, fb = (torch.randn(2, b, nf, 2, h, w, generator=g) * 4).cuda()
    res = {}
    for be in ("torch", "triton"):
        cfg = Config(data=DataConfig(batch_size=b, frame_size=[h, w]), model=ModelConfig(queue_size=8),
                     augment=AugmentConfig(jitter_p=1.0, blur_p=0.5, gray_p=0.3, backend=be),
                     train=TrainConfig(device="cuda", amp="fp32"))
        res[be] = make_inputs(batch, fa, fb, cfg, torch.Generator().manual_seed(3))
    for k in ("rgb_q", "rgb_k"):
        torch.testing.assert_close(res["triton"].__dict__[k].float(), res["torch"].__dict__[k], atol=2e-3, rtol=0)
    for k in ("flow_q", "flow_k", "rot_q", "rot_k"):
        lv = (res["triton"].__dict__[k].float() - res["torch"].__dict__[k]).abs() * 255
        assert lv.max() <= 1.0 + 1e-3 and (lv > 0.5).float().mean() < 0.01, k
