"""Parity of the Triton correlation lookup with grid_sample and with a float64 bilinear reference.

The kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` in a fresh subprocess (the interpreter
must be chosen before triton is first imported); it prints its measurements as JSON and the
assertions are made here. A CUDA test checks the compiled kernel on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = r"""
import json, warnings, torch
warnings.simplefilter("ignore")
from mscl_stream.flow.raft_loop import corr_pyramid, corr_lookup, lookup_offsets
from mscl_stream.kernels import corr_lookup as K

def bilinear64(pyramid, coords, radius):
    # independent reference: explicit 4-corner bilinear sampling in float64, zeros outside the map
    n, _, h, w = coords.shape
    k = 2 * radius + 1
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    dx = d.repeat_interleave(k)            # window index a*k + b -> (dx, dy) = (d[a], d[b])
    dy = d.repeat(k)
    cx = coords[:, 0].double().reshape(-1, 1)
    cy = coords[:, 1].double().reshape(-1, 1)
    out = []
    for level, vol in enumerate(pyramid):
        v = vol[:, 0].double()                              # (Q, hl, wl)
        hl, wl = v.shape[-2:]
        px, py = cx / 2 ** level + dx, cy / 2 ** level + dy  # (Q, k*k)
        x0, y0 = px.floor(), py.floor()
        acc = torch.zeros_like(px)
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                ok = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
                idx = (yi.clamp(0, hl - 1) * wl + xi.clamp(0, wl - 1)).long()
                acc += torch.where(ok, wx * wy * v.flatten(1).gather(1, idx), torch.zeros_like(acc))
        out.append(acc)
    return torch.cat(out, 1).view(n, h, w, -1).permute(0, 3, 1, 2)

res = {}
g = torch.Generator().manual_seed(0)
for n, c, h, w, radius in ((2, 8, 16, 22, 3), (1, 5, 17, 19, 4)):      # odd sizes: floor pooling, masks
    f1, f2 = torch.randn(n, c, h, w, generator=g), torch.randn(n, c, h, w, generator=g)
    pyr = corr_pyramid(f1, f2, 4)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = torch.stack([xs, ys])[None] + 4 * torch.randn(n, 2, h, w, generator=g)
    coords[0, :, 0, :3] = torch.tensor([[-9.0, w + 8.0, 0.0], [3.0, 2.0, h - 1.0]])  # far outside, on the edge
    ref_gs = corr_lookup(pyr, coords, lookup_offsets(radius, coords.device))
    ref64 = bilinear64(pyr, coords, radius)
    out = K.corr_lookup(K.flat_pyramid(pyr), coords, 4, radius)
    out_cl = K.corr_lookup(K.flat_pyramid(pyr), coords, 4, radius, channels_last=True)
    level0 = (2 * radius + 1) ** 2         # pixel (0, 0)'s level-0 window lies entirely outside the map
    res[f"{h}x{w}_r{radius}"] = dict(
        shape=list(out.shape), ref_shape=list(ref_gs.shape), vs_grid_sample=float((out - ref_gs).abs().max()),
        vs_float64=float((out.double() - ref64).abs().max()),
        gs_vs_float64=float((ref_gs.double() - ref64).abs().max()),
        scale=float(ref64.abs().max()), zeros_outside=float(out[0, :level0, 0, 0].abs().max()),
        cl_equal=bool(torch.equal(out_cl, out)),
        cl_layout=bool(out_cl.is_contiguous(memory_format=torch.channels_last)))
try:
    K.corr_lookup(K.flat_pyramid(pyr)[:, :-1], coords, 4, 3)
    res["bad_shape"] = "accepted"
except ValueError as e:
    res["bad_shape"] = str(e)

# the RAFT estimator with corr=triton (and channels_last) against the grid_sample loop, same weights
import sys
sys.path.insert(0, "tests/flow")
from test_raft import frames
from mscl_stream.flow import get_estimator
torch.manual_seed(0)
base = get_estimator("raft_small", weights="none", iters=3, device="cpu")
a, b = frames(2, 128, 176, seed=3)
ref = base(a, b)
for label, opts in (("triton", {"corr": "triton"}), ("triton_cl", {"corr": "triton", "channels_last": True})):
    est = get_estimator("raft_small", weights="none", iters=3, device="cpu", **opts)
    est.model.load_state_dict(base.model.state_dict())
    res[label] = dict(corr=est.corr, max_diff=float((est(a, b) - ref).abs().max()), mean_abs=float(ref.abs().mean()))
print("RESULT" + json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", ["16x22_r3", "17x19_r4"])
def test_kernel_matches_grid_sample_and_float64(interpreted, case):
    r = interpreted[case]
    assert r["shape"] == r["ref_shape"]
    assert r["scale"] > 1.0                              # non-trivial correlations
    assert r["vs_float64"] < 1e-5 * r["scale"], r
    assert r["vs_grid_sample"] < 1e-5 * r["scale"], r
    assert r["gs_vs_float64"] < 1e-5 * r["scale"], r     # the torch reference itself is right
    assert r["zeros_outside"] == 0.0                     # a level-0 window entirely outside the map reads zeros
    assert r["cl_equal"] and r["cl_layout"]


def test_kernel_rejects_mismatched_pyramid(interpreted):
    assert "does not match" in interpreted["bad_shape"]


def test_raft_with_triton_lookup_matches_grid_sample(interpreted):
    for label in ("triton", "triton_cl"):
        r = interpreted[label]
        assert r["corr"] == "triton"
        assert r["mean_abs"] > 0.1 and r["max_diff"] < 1e-4, (label, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_matches_grid_sample_on_gpu():
    from mscl_stream.flow.raft_loop import corr_lookup, corr_pyramid, lookup_offsets
    from mscl_stream.kernels import corr_lookup as K
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 8, 96, 16, 22
    f1, f2 = (torch.randn(n, c, h, w, generator=g).cuda() for _ in range(2))
    pyr = corr_pyramid(f1, f2, 4)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = (torch.stack([xs, ys]).float()[None] + 4 * torch.randn(n, 2, h, w, generator=g)).cuda()
    for radius in (3, 4):
        ref = corr_lookup(pyr, coords, lookup_offsets(radius, coords.device))
        out = K.corr_lookup(K.flat_pyramid(pyr), coords, 4, radius)
        assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
