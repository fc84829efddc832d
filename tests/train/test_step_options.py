"""Model-step options: the optimizer implementations, flow one batch ahead, compiled encoders.

Flow ahead on CPU runs the same code path without streams: the loss sequence and the checkpointed
loader position must equal the plain loop's exactly. The compile test uses dynamo with the
``aot_eager`` backend (graph capture, autograd, no inductor code generation: fast on CPU) and counts
graph breaks and recompiles over several steps with momentum updates and enqueues in between.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN
from mscl_stream.config import load_config
from mscl_stream.errors import UserError
from mscl_stream.train.checkpoint import load_checkpoint
from mscl_stream.train.guard import StepGuard
from mscl_stream.train.optim import build_optimizer
from mscl_stream.train.trainer import pretrain


def _sgd_reference(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, mom: float, wd: float) -> torch.Tensor:
    """SGD with momentum and weight decay, float64, written from the update rule."""
    p, buf = p0.double().clone(), None
    for g in grads:
        d = g.double() + wd * p
        buf = d if buf is None else mom * buf + d
        p = p - lr * buf
    return p


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "loop"])
def test_optimizer_implementations_follow_the_update_rule(impl):
    cfg = load_config(None, [f"optim.impl={impl}", "optim.momentum=0.9", "optim.weight_decay=0.01"])
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 7, generator=g)
    grads = [torch.randn(5, 7, generator=g) for _ in range(4)]
    p = torch.nn.Parameter(p0.clone())
    opt = build_optimizer(cfg, [p], lr=0.1)
    assert opt.impl == ("fused" if impl == "auto" else impl)     # this torch fuses SGD on CPU
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    assert (p.detach().double() - _sgd_reference(p0, grads, 0.1, 0.9, 0.01)).abs().max() < 1e-5


def test_optimizer_errors():
    with pytest.raises(UserError, match="not one of"):
        build_optimizer(_Cfg(impl="adamw"), [torch.nn.Parameter(torch.zeros(1))], 0.1)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(load_config(None, []), [], 0.1)


class _Cfg:
    def __init__(self, impl):
        self.optim = type("O", (), {"impl": impl, "momentum": 0.9, "weight_decay": 0.0})()


# --- flow ahead -------------------------------------------------------------------------------------

def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/loss"] for r in rows if "loss/loss" in r and not r.get("final")]


@pytest.mark.slow
def test_flow_ahead_equals_the_plain_loop_on_cpu(tiny_manifest, tmp_path):
    runs = {}
    for ahead in (False, True):
        out = tmp_path / f"ahead_{ahead}"
        cfg = load_config(None, [*TINY_TRAIN, f"data.manifest={tiny_manifest}", "data.split=", f"train.out_dir={out}",
                                 "train.max_steps=3", "train.ckpt_every=2", "train.keep_checkpoints=0",
                                 f"train.flow_ahead={str(ahead).lower()}"])
        pretrain(cfg)
        ckpts = {p.name: load_checkpoint(p) for p in sorted((out / "checkpoints").glob("*.pt"))}
        runs[ahead] = (_losses(out), ckpts)
    (plain, plain_ckpts), (ahead, ahead_ckpts) = runs[False], runs[True]
    assert len(plain) == 3 and plain == ahead                    # bit-identical loss sequence
    assert sorted(plain_ckpts) == sorted(ahead_ckpts) and len(plain_ckpts) >= 2
    for name in plain_ckpts:      # the loader position recorded is the trained batch's, not the one ahead
        assert ahead_ckpts[name]["ranks"][0]["loader"] == plain_ckpts[name]["ranks"][0]["loader"], name
        a, b = ahead_ckpts[name]["model"], plain_ckpts[name]["model"]
        assert all(torch.equal(a[k], b[k]) for k in b), name


# --- compiled encoders ------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_encoders_match_eager_without_recompiles():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    from mscl_stream.models.mscl import MSCL, MSCLInputs
    cfg = load_config(None, ["model.rgb_width=8", "model.neck_channels=16", "model.queue_size=16",
                             "model.feat_dim=16", "data.frames_per_clip=4"])
    g = torch.Generator().manual_seed(0)

    def inputs() -> MSCLInputs:
        v = lambda c, t: torch.randn(2, c, t, 32, 32, generator=g)            # noqa: E731
        return MSCLInputs(rgb_q=v(3, 4), rgb_k=v(3, 4), flow_q=v(3, 2), flow_k=v(3, 2), rot_q=v(3, 2), rot_k=v(3, 2))

    batches = [inputs() for _ in range(4)]
    torch.manual_seed(0)
    eager = MSCL(cfg)
    compiled = MSCL(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_encoders(backend="aot_eager", dynamic=False)   # traced at the first call, after StepGuard
    losses, frames_after = {}, []
    counters.clear()
    for name, model in (("eager", eager), ("compiled", compiled)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(cfg, params, 0.05)           # fused: the guard skips through found_inf
        guard = StepGuard(model, opt, torch.device("cpu"))  # BN statistics as views of one flat tensor
        losses[name] = []
        for step, x in enumerate(batches):                  # step 1 is non-finite: skipped on the device
            guard.before_forward()
            out = model(x)
            loss = out["loss"] * (float("nan") if step == 1 else 1.0)
            loss.backward()
            ok = guard.check(loss, torch.nn.utils.clip_grad_norm_(params, 40.0))
            guard.optimizer_step(opt, ok)
            opt.zero_grad(set_to_none=True)
            model.momentum_update(0.9, ok)
            model.enqueue(out["keys_rgb"], out["keys_flow"], ok)
            guard.after_step(ok)
            losses[name].append(float(out["loss"].detach()))
            if name == "compiled":
                frames_after.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert frames_after[0] > 0
    assert frames_after[-1] == frames_after[0], frames_after        # no recompiles after the first step
    for a, b in zip(losses["eager"], losses["compiled"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (losses["eager"], losses["compiled"])
    se, sc = eager.state_dict(), compiled.state_dict()
    assert sorted(se) == sorted(sc)                                  # checkpoints keep their names
    assert max((se[k].float() - sc[k].float()).abs().max().item() for k in se) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_ahead_on_a_side_stream_hands_out_the_plain_flows():
    """Three different batches through FlowFeed with and without the side stream: the same flows,
    while the main stream keeps allocating and writing (memory the side stream must not get back)."""
    from mscl_stream.flow import get_estimator
    from mscl_stream.train.flow_ahead import FlowFeed
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from model_step import flow_fn, make_batch

    torch.manual_seed(0)
    est = get_estimator("raft_small", weights="none", iters=4, precision="fp32", device="cuda", cuda_graph=True)
    batches = []
    for seed in range(3):
        b = make_batch(2, 8, 4, 128, 176, torch.device("cuda"))
        b.rgb_a.copy_(torch.randint(0, 256, b.rgb_a.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        batches.append(b)

    class Loader:
        def __iter__(self):
            return iter(batches)

        def state_dict(self):
            return {}

    got = {}
    for ahead in (False, True):
        feed = FlowFeed(est, Loader(), torch.device("cuda"), ahead=ahead, flow_fn=flow_fn)
        feed.start(iter(Loader()))
        got[ahead] = []
        for step in range(3):
            b = feed.next_batch()
            _, fa, fb = feed.flow(b, look_ahead=step < 2)
            junk = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(8)]   # main-stream traffic
            got[ahead].append((fa.clone(), fb.clone()))
            del junk
        torch.cuda.synchronize()
    for (pa, pb), (qa, qb) in zip(got[False], got[True]):
        assert torch.allclose(pa, qa, atol=1e-4) and torch.allclose(pb, qb, atol=1e-4)
    assert not torch.allclose(got[False][0][0], got[False][1][0])       # the batches differ
