"""MSCL module: momentum schedule and EMA, FIFO queues, the 8 terms against float64 hand formulas,
loss weights, released-code departures, optimisation on a fixed batch, memory format / bf16, and shuffled
BN + queue gathering in a real 2-process gloo job."""

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_ranks
from mscl_stream import losses
from mscl_stream.config import Config
from mscl_stream.errors import UserError
from mscl_stream.models.mscl import LOSS_TERMS, MSCL, MSCLInputs, momentum_at, shuffled_forward

B, T, S = 4, 8, 16   # batch, frames, spatial size: the architecture works at 16x16 (layer4 is 1x1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from intra-op threads, and on a shared 2-core machine spinning
    # OpenMP workers make them 10-30x slower; restore the setting for other test modules.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def make_cfg(queue_size=16, feat_dim=128, compat="default", **weights):
    cfg = Config()
    cfg.model.queue_size, cfg.model.feat_dim, cfg.model.compat = queue_size, feat_dim, compat
    cfg.loss.weights.update(weights)
    return cfg


def make_inputs(seed=0, b=B, f=T // 2, s=S):
    g = torch.Generator().manual_seed(seed)
    rgb = [torch.randn(b, 3, T, s, s, generator=g) for _ in range(2)]
    flows = [torch.rand(b, 3, f, s, s, generator=g) for _ in range(4)]
    return MSCLInputs(*rgb, *flows)


def ref_infonce(q, k, queue, t=0.07):
    """Float64 InfoNCE: -log softmax of [q.k, q.queue_j] at the positive, averaged over the batch."""
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0.0
    for b in range(q.shape[0]):
        logits = torch.cat([(q[b] * k[b]).sum().view(1), queue @ q[b]]) / t
        total += torch.logsumexp(logits, 0) - logits[0]
    return total / q.shape[0]


def ref_lmcl(rgb, flow, rot, t=0.07):
    """Float64 LMCL (docs/method.md, section 5): RGB step i vs the 4 base + 4 rotated flow steps."""
    rgb, flow, rot = (F.normalize(x.double(), dim=1) for x in (rgb, flow, rot))
    total, n = 0.0, 0
    for b in range(rgb.shape[0]):
        cand = torch.cat([flow[b], rot[b]], dim=1)               # (C, 2T)
        for i in range(rgb.shape[2]):
            logits = rgb[b, :, i] @ cand / t
            total += torch.logsumexp(logits, 0) - logits[i]
            n += 1
    return total / n


def encode(model, inp, released=False):
    """Re-run the encoders by hand (train mode: same batch -> same BN statistics)."""
    with torch.no_grad():
        def proj(enc, head, x):
            return F.normalize(head(enc(x)[0]), dim=1)
        rot_in = inp.flow_k if released else inp.rot_q
        flow_key_in = inp.rot_q if released else inp.flow_k
        pooled, maps = model.rgb_encoder(inp.rgb_q)
        fq, rq = model.flow_encoder(inp.flow_q), model.flow_encoder(rot_in)
        return {
            "q_rgb": F.normalize(model.rgb_head(pooled), dim=1),
            "q_flow": F.normalize(model.flow_head(fq[0]), dim=1),
            "q_rot": F.normalize(model.flow_head(rq[0]), dim=1),
            "k_rgb": proj(model.rgb_encoder_k, model.rgb_head_k, inp.rgb_k),
            "k_flow": proj(model.flow_encoder_k, model.flow_head_k, flow_key_in),
            "k_rot": proj(model.flow_encoder_k, model.flow_head_k, inp.rot_k),
            "l_rgb": model.rgb_neck(maps).mean(dim=(3, 4)),
            "l_flow": fq[1].mean(dim=(3, 4)), "l_rot": rq[1].mean(dim=(3, 4)),
        }


def spread_queues(model, keys, seed=1):
    """Queues near the current keys, so every term is O(1) rather than ~0 at random init."""
    g = torch.Generator().manual_seed(seed)
    for name in ("rgb", "flow"):
        centre = keys[f"keys_{name}"].mean(0)
        rows = centre + 0.3 * torch.randn(model.rgb_queue.shape, generator=g)
        getattr(model, f"{name}_queue").copy_(F.normalize(rows, dim=1))


# ----------------------------------------------------------------------------- schedule and EMA


def test_momentum_schedule_against_hand_values():
    assert momentum_at(0, 1000, 0.994) == pytest.approx(0.994, abs=1e-12)
    assert momentum_at(500, 1000, 0.994) == pytest.approx(0.997, abs=1e-12)     # cos(pi/2) = 0
    assert momentum_at(250, 1000, 0.994) == pytest.approx(1 - 0.006 * (1 + 2 ** -0.5) / 2, abs=1e-12)
    assert momentum_at(1000, 1000, 0.994) == pytest.approx(1.0, abs=1e-12)
    assert momentum_at(5000, 1000, 0.994) == pytest.approx(1.0, abs=1e-12)      # clipped past the end
    assert momentum_at(750, 1000, 0.9) == pytest.approx(1 - 0.1 * (1 - 2 ** -0.5) / 2, abs=1e-12)
    with pytest.raises(ValueError):
        momentum_at(1, 0, 0.994)


def test_momentum_update_is_ema_of_parameters():
    torch.manual_seed(0)
    model = MSCL(make_cfg())
    pairs = [(model.rgb_encoder, model.rgb_encoder_k), (model.flow_encoder, model.flow_encoder_k),
             (model.rgb_head, model.rgb_head_k), (model.flow_head, model.flow_head_k)]
    with torch.no_grad():
        for q_mod, k_mod in pairs:   # start: keys equal queries (MoCo init); then perturb both apart
            for pq, pk in zip(q_mod.parameters(), k_mod.parameters()):
                assert torch.equal(pq, pk) and not pk.requires_grad
                pq.add_(torch.randn_like(pq))
                pk.copy_(torch.randn_like(pk))
    before = [[(pq.double().clone(), pk.double().clone()) for pq, pk in zip(a.parameters(), b.parameters())]
              for a, b in pairs]
    model.momentum_update(0.9)
    for (q_mod, k_mod), old in zip(pairs, before):
        for pk, (oq, ok) in zip(k_mod.parameters(), old):
            torch.testing.assert_close(pk.double(), 0.9 * ok + 0.1 * oq, rtol=1e-6, atol=1e-6)
    assert model.rgb_neck.lateral[0].weight.requires_grad


# ----------------------------------------------------------------------------- queues


def test_queue_init_fifo_wrap_and_state_dict():
    torch.manual_seed(0)
    model = MSCL(make_cfg(queue_size=16, feat_dim=8))
    for name in ("rgb", "flow"):
        q = getattr(model, f"{name}_queue")
        assert q.shape == (16, 8)
        torch.testing.assert_close(q.norm(dim=1), torch.ones(16))
    init_flow = model.flow_queue.clone()
    a, b, c = (F.normalize(torch.randn(6, 8), dim=1) for _ in range(3))
    model.enqueue(a, -a)
    assert model.rgb_queue_ptr.item() == 6
    model.enqueue(b, -b)
    model.enqueue(c, -c)                     # 18 rows into 16: wraps, c[4:] overwrite a[:2]
    q = model.rgb_queue
    torch.testing.assert_close(q[0:2], c[4:6])
    torch.testing.assert_close(q[2:6], a[2:6])
    torch.testing.assert_close(q[6:12], b)
    torch.testing.assert_close(q[12:16], c[0:4])
    torch.testing.assert_close(model.flow_queue[6:12], -b)
    assert model.rgb_queue_ptr.item() == 2 and model.flow_queue_ptr.item() == 2
    assert not torch.equal(model.flow_queue, init_flow)
    sd = model.state_dict()
    for key in ("rgb_queue", "flow_queue", "rgb_queue_ptr", "flow_queue_ptr"):
        assert key in sd
    fresh = MSCL(make_cfg(queue_size=16, feat_dim=8))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.rgb_queue, q) and fresh.rgb_queue_ptr.item() == 2
    big = F.normalize(torch.randn(20, 8), dim=1)   # more keys than rows: the last 16 stay, in order
    fresh.enqueue(big, big)
    torch.testing.assert_close(fresh.rgb_queue, torch.roll(big[4:], shifts=6, dims=0))
    assert fresh.rgb_queue_ptr.item() == 6


# ----------------------------------------------------------------------------- forward


def test_forward_backward_all_terms_against_hand_formulas():
    torch.manual_seed(0)
    model = MSCL(make_cfg())
    inp = make_inputs()
    spread_queues(model, model(inp))
    out = model(inp)
    assert set(out) == set(LOSS_TERMS) | {"loss", "keys_rgb", "keys_flow"}
    assert all(out[n].dim() == 0 and out[n].dtype == torch.float32 and torch.isfinite(out[n]) for n in LOSS_TERMS)
    assert not out["keys_rgb"].requires_grad and out["keys_rgb"].shape == (B, 128)

    e = encode(model, inp)
    rq, fq = model.rgb_queue, model.flow_queue
    expect = {
        "rgb_rgb": ref_infonce(e["q_rgb"], e["k_rgb"], rq),
        "flow_flow": ref_infonce(e["q_flow"], e["k_flow"], fq),
        "rot_rot": ref_infonce(e["q_rot"], e["k_rot"], fq),       # rotated keys use the FLOW queue
        "rgb_flow": ref_infonce(e["q_rgb"], e["k_flow"], fq),
        "flow_rgb": ref_infonce(e["q_flow"], e["k_rgb"], rq),
        "rgb_rot": ref_infonce(e["q_rgb"], e["k_rot"], fq),
        "rot_rgb": ref_infonce(e["q_rot"], e["k_rgb"], rq),
        "lmcl": ref_lmcl(e["l_rgb"], e["l_flow"], e["l_rot"]),
    }
    for name, ref in expect.items():
        assert out[name].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5), name
    # The queue choice matters at these values: with the RGB queue, rotated-key terms would differ.
    for name, qn, kn in (("rot_rot", "q_rot", "k_rot"), ("rgb_rot", "q_rgb", "k_rot")):
        wrong = ref_infonce(e[qn], e[kn], rq).item()
        assert abs(wrong - expect[name].item()) > 0.05 * abs(expect[name].item()), name
    # One term through the library function, called by hand.
    assert out["flow_rgb"].item() == pytest.approx(losses.infonce(e["q_flow"], e["k_rgb"], rq).item(), rel=1e-5)
    torch.testing.assert_close(out["keys_flow"], e["k_flow"], rtol=1e-5, atol=1e-6)
    assert out["loss"].item() == pytest.approx(sum(expect.values()).item(), rel=1e-4)

    out["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert model.uses_all_parameters


def test_zero_weights_skip_terms_and_weighted_sum():
    torch.manual_seed(0)
    model = MSCL(make_cfg(rgb_rot=0.0, rot_rot=0.0, lmcl=0.0, flow_flow=2.5))
    out = model(make_inputs())
    assert set(out) == {"rgb_rgb", "flow_flow", "rgb_flow", "flow_rgb", "rot_rgb", "loss", "keys_rgb", "keys_flow"}
    want = out["rgb_rgb"] + 2.5 * out["flow_flow"] + out["rgb_flow"] + out["flow_rgb"] + out["rot_rgb"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.rgb_neck.parameters())   # LMCL off: the neck never ran
    assert not model.uses_all_parameters
    with pytest.raises(UserError, match="unknown loss term"):
        MSCL(make_cfg(bogus=1.0))


def test_released_departures_views_and_queue_after_enqueue():
    torch.manual_seed(0)
    model = MSCL(make_cfg(compat="released"))
    inp = make_inputs(seed=3)
    spread_queues(model, model(inp))
    model.flow_queue_ptr.fill_(14)   # the snapshot must wrap: rows 14, 15, 0, 1 take this step's keys
    out = model(inp)
    e = encode(model, inp, released=True)
    after = model.flow_queue.clone()
    for i in range(B):
        after[(14 + i) % 16] = e["k_flow"][i]
    rq, fq = model.rgb_queue, model.flow_queue
    # Departure 1: the flow key is h_m(rotated flow A); the "rotated" query is h(unrotated flow B).
    assert out["flow_flow"].item() == pytest.approx(ref_infonce(e["q_flow"], e["k_flow"], fq).item(), rel=1e-4)
    assert out["rot_rgb"].item() == pytest.approx(ref_infonce(e["q_rot"], e["k_rgb"], rq).item(), rel=1e-4)
    assert out["lmcl"].item() == pytest.approx(ref_lmcl(e["l_rgb"], e["l_flow"], e["l_rot"]).item(), rel=1e-4)
    # Departure 3: RGB->flow negatives are the queue after this step's enqueue (positives among them).
    assert out["rgb_flow"].item() == pytest.approx(ref_infonce(e["q_rgb"], e["k_flow"], after).item(), rel=1e-4)
    assert abs(ref_infonce(e["q_rgb"], e["k_flow"], fq) - ref_infonce(e["q_rgb"], e["k_flow"], after)) > 1e-3
    assert model.flow_queue_ptr.item() == 14   # forward itself never writes the queue
    torch.testing.assert_close(out["keys_flow"], e["k_flow"], rtol=1e-5, atol=1e-6)


def test_sgd_decreases_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = MSCL(make_cfg())
    inp = make_inputs(seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    seen = []
    for _ in range(6):   # keys and queues fixed (no EMA, no enqueue): a stationary objective
        loss = model(inp)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert all(math.isfinite(v) for v in seen)
    assert seen[-1] < 0.5 * seen[0], seen


def test_channels_last_matches_and_bf16_autocast_runs():
    torch.manual_seed(0)
    model = MSCL(make_cfg())
    inp = make_inputs(seed=7, b=2)
    ref = model(inp)
    model_cl = model.to(memory_format=torch.channels_last_3d)
    assert model_cl.rgb_encoder.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    out = model_cl(inp.to(memory_format=torch.channels_last_3d))
    for n in LOSS_TERMS:
        assert out[n].item() == pytest.approx(ref[n].item(), rel=1e-3, abs=1e-4), n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model_cl(inp.to(memory_format=torch.channels_last_3d))
    assert all(out16[n].dtype == torch.float32 and torch.isfinite(out16[n]) for n in LOSS_TERMS)
    assert out16["keys_rgb"].dtype == torch.float32
    out16["loss"].backward()
    assert torch.isfinite(model_cl.rgb_encoder.stem[0].weight.grad).all()


def test_config_errors_and_input_frames():
    cfg = make_cfg()
    cfg.model.neck_channels = 100
    with pytest.raises(UserError, match="neck_channels"):
        MSCL(cfg)
    cfg = make_cfg(feat_dim=16)
    cfg.model.neck_channels = 32   # narrower neck and flow net (4/8/16/32 channels) still compose
    model = MSCL(cfg)
    out = model(make_inputs(b=2, f=T))   # all 8 flow frames per clip
    assert torch.isfinite(out["loss"]) and out["keys_flow"].shape == (2, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_full_size_bf16_channels_last():
    # The method's shapes (8 x 112 x 112, 65,536-row queues) on the device, as the trainer runs them.
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = MSCL(make_cfg(queue_size=65536)).to(dev)
    inp = make_inputs(seed=11, b=8, s=112).to(dev)
    ref = model(inp)
    model = model.to(memory_format=torch.channels_last_3d)
    inp_cl = inp.to(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(inp_cl)
    out["loss"].backward()
    for n in LOSS_TERMS:
        assert out[n].dtype == torch.float32 and torch.isfinite(out[n]), n
        assert out[n].item() == pytest.approx(ref[n].item(), rel=0.1, abs=0.05), n
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.enqueue(out["keys_rgb"], out["keys_flow"])
    assert model.rgb_queue_ptr.item() == 8
    torch.testing.assert_close(model.rgb_queue[:8], out["keys_rgb"])


def test_shuffled_forward_is_plain_forward_in_one_process():
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    torch.testing.assert_close(shuffled_forward(bn, x), F.batch_norm(x, None, None, training=True))


# ----------------------------------------------------------------------------- two processes

WORKER = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from mscl_stream.config import Config
    from mscl_stream.models.mscl import MSCL, shuffled_forward
    from mscl_stream import distributed as D
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo", device="cpu")
    r = info.rank
    # rank r holds rows 10r .. 10r+3; a non-affine BN makes each output depend on its shard
    x = (torch.arange(4.0) + 10 * r).view(4, 1) ** 1.5 * torch.tensor([[1.0, -0.5]])
    torch.manual_seed(123)   # every rank draws a permutation; rank 0's is broadcast
    seen = []
    def fn(z):
        seen.append(z.tolist())
        return F.batch_norm(z, None, None, training=True)
    y = shuffled_forward(fn, x)
    cfg = Config(); cfg.model.queue_size = 16; cfg.model.feat_dim = 2
    model = MSCL(cfg)
    model.enqueue(F.normalize(x, dim=1), -F.normalize(x, dim=1))
    out = {"x": x.tolist(), "y": y.tolist(), "seen": seen, "queue": model.rgb_queue[:8].tolist(),
           "ptr": model.rgb_queue_ptr.item()}
    D.cleanup()
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.slow
def test_two_process_shuffled_bn_and_gathered_enqueue(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    world = 2
    run_ranks(script, lambda r: [str(tmp_path / f"r{r}.json")], world, timeout=120)
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(world)]
    x_all = torch.tensor(res[0]["x"] + res[1]["x"], dtype=torch.float64)
    # Reference: rank 0's permutation (same seed), shards of 4, BN per shard, rows back in place.
    torch.manual_seed(123)
    perm = torch.randperm(8)
    y_ref = torch.empty_like(x_all)
    for r in range(world):
        rows = perm[4 * r:4 * r + 4]
        shard = x_all[rows]
        y_ref[rows] = (shard - shard.mean(0)) / torch.sqrt(shard.var(0, unbiased=False) + 1e-5)
        # each rank encoded exactly its shard of the permuted global batch
        assert torch.tensor(res[r]["seen"][0], dtype=torch.float64).allclose(shard)
    for r in range(world):
        torch.testing.assert_close(torch.tensor(res[r]["y"], dtype=torch.float64), y_ref[4 * r:4 * r + 4],
                                   rtol=1e-4, atol=1e-4)
    local0 = x_all[:4]
    assert not torch.allclose(y_ref[:4], (local0 - local0.mean(0)) / local0.std(0, unbiased=False))
    # Both ranks enqueued the keys of both ranks, rank order, and moved the pointer by 8.
    keys = F.normalize(x_all.float(), dim=1)
    for r in range(world):
        torch.testing.assert_close(torch.tensor(res[r]["queue"]), keys)
        assert res[r]["ptr"] == 8
