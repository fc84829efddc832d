"""The MSCL model: query/momentum encoders for RGB and flow, two queues, and the 8 loss terms.

Encoders (docs/method.md sections 5-6): g = R3D-18 (+ FPN/SEPC neck for LMCL), h = quarter-width
frame-wise ResNet-18 for colour-wheel flow; projection MLPs Linear-ReLU-Linear (RGB 512-512-D, flow
C-C-D, outputs L2-normalised); momentum copies of both encoders and both projections (the neck is
only used by LMCL on the query view, so it has no momentum copy). One queue per modality
(``queue_size`` x D, L2-normalised random rows at start), each with its write pointer; all four are
buffers, so checkpoints carry them.

One training step, as the trainer drives it::

    out = model(inputs)                          # dict: active loss terms, "loss", "keys_rgb", "keys_flow"
    out["loss"].backward(); optimizer.step()
    model.momentum_update(momentum_at(samples_seen, total_samples, cfg.model.momentum))
    model.enqueue(out["keys_rgb"], out["keys_flow"])   # all-gathered across ranks inside

Key encoders and BN (``cfg.model.key_bn``): "shuffle" is MoCo's shuffled BN: the key batch is
all-gathered, permuted by a permutation drawn on rank 0, each rank encodes its shard of the permuted
batch, and the keys are gathered and un-permuted, so a key's BN statistics are not computed over the
same group of samples as its query's (which would let the pair match through BN statistics). In a
single process there is nothing to shuffle across and it is exactly the plain forward (a permutation within one batch does not change BN batch statistics). "sync" converts
the key encoders' BN to SyncBatchNorm (a no-op without a process group); "none" uses local BN.
All-gathers need the same batch size on every rank.

Released-code behaviour (``cfg.model.compat == "released"``, see docs/method.md, section
"model.compat: released"): departure 1 swaps two views: wherever the method uses the base flow key (flow_flow, rgb_flow,
the enqueued flow keys) the released code used the rotated flow of window A (``rot_q``), and wherever
it uses the rotated flow query (rot_rot, rot_rgb, LMCL's rotated negatives) it used the unrotated
flow of window B (``flow_k``). Departure 3: the rgb_flow term's negatives are the flow queue as it is
*after* this step's enqueue, so each positive key also sits among its negatives. Departure 2 (the flow
momentum encoder updated twice per step) is not reproduced; ``momentum_update(m * m)`` on the flow
branch would be its equivalent.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mscl_stream import losses
from mscl_stream.config import Config
from mscl_stream.errors import UserError
from mscl_stream.models.flownet import FlowNet
from mscl_stream.models.neck import FPNSEPCNeck
from mscl_stream.models.r3d import R3DBackbone
from mscl_stream.distributed import all_gather_cat, get_rank, get_world_size

LOSS_TERMS = ("rgb_rgb", "flow_flow", "rot_rot", "rgb_flow", "flow_rgb", "rgb_rot", "rot_rgb", "lmcl")
# Clip-level InfoNCE terms: name -> (query view, key view). The key's modality picks the queue:
# an RGB key uses the RGB queue; flow and rotated-flow keys (both from h_m) use the flow queue.
CLIP_TERMS = {
    "rgb_rgb": ("rgb", "rgb"), "flow_flow": ("flow", "flow"), "rot_rot": ("rot", "rot"),
    "rgb_flow": ("rgb", "flow"), "flow_rgb": ("flow", "rgb"),
    "rgb_rot": ("rgb", "rot"), "rot_rgb": ("rot", "rgb"),
}


@dataclass
class MSCLInputs:
    """The six views of one training batch (q = window A, k = window B).

    Attributes:
        rgb_q, rgb_k: (B, 3, T, H, W) augmented RGB clips, ImageNet-normalised floats.
        flow_q, flow_k: (B, 3, F, H, W) colour-wheel flow images in [0, 1]; F = T (all flow frames)
            or ceil(T / 2) (even frames only).
        rot_q, rot_k: (B, 3, F, H, W) colour-wheel images of the FRA-rotated flow of each window.
    """

    rgb_q: torch.Tensor
    rgb_k: torch.Tensor
    flow_q: torch.Tensor
    flow_k: torch.Tensor
    rot_q: torch.Tensor
    rot_k: torch.Tensor

    def to(self, *args, **kwargs) -> MSCLInputs:
        """Apply ``Tensor.to(*args, **kwargs)`` (device, dtype, memory_format) to every view."""
        return MSCLInputs(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})


def momentum_at(samples_seen: float, total_samples: float, base: float) -> float:
    """Cosine-ramped EMA momentum: m = 1 - (1 - base) * (1 + cos(pi * s / S)) / 2, s clipped to S.

    Args:
        samples_seen: s, clips consumed so far (global).
        total_samples: S, clips of the whole run (> 0).
        base: momentum at s = 0 (0.994 in MSCL); it reaches 1 at s = S.
    """
    if total_samples <= 0:
        raise ValueError(f"total_samples must be > 0, got {total_samples}")
    frac = min(max(samples_seen / total_samples, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * frac)) / 2.0


# ----------------------------------------------------------------------------- shuffled BN


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffled-BN forward: run ``fn`` on a random shard of the global batch, then un-shuffle.

    Args:
        fn: maps (b, ...) inputs to (b, D) outputs, row by row in order (its BN mixes rows).
        x: (b, ...) this rank's inputs; b must be equal on every rank.

    Returns:
        (b, D): ``fn``'s outputs for this rank's own rows, in their original order. In a single
        process this is ``fn(x)``.
    """
    rank, world = get_rank(), get_world_size()
    if world == 1:
        return fn(x)
    b = x.shape[0]
    x_all = all_gather_cat(x, same_size=True)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)   # every rank must use rank 0's permutation
    out = fn(x_all[perm[rank * b:(rank + 1) * b]])
    out_all = all_gather_cat(out, same_size=True)
    unperm = torch.argsort(perm)
    return out_all[unperm[rank * b:(rank + 1) * b]]


# ----------------------------------------------------------------------------- the model


def _mlp(dim_in: int, dim_hidden: int, dim_out: int, bn: bool = False) -> nn.Sequential:
    """Projection head Linear-ReLU-Linear (MoCo v2, the method); ``bn`` adds BatchNorm after the hidden
    layer (SimCLR / MoCo v3 style), which centres the features of a freshly initialised encoder."""
    hidden = [nn.Linear(dim_in, dim_hidden)] + ([nn.BatchNorm1d(dim_hidden)] if bn else [])
    return nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(dim_hidden, dim_out))


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class MSCL(nn.Module):
    """MSCL pretraining model (see module docstring).

    Args:
        cfg: run configuration; uses ``data.frames_per_clip``, ``model.*`` and ``loss.*``.

    Attributes:
        rgb_encoder, rgb_neck, flow_encoder, rgb_head, flow_head: the query (trained) modules;
            ``rgb_encoder`` is the R3D-18 that downstream evaluation uses.
        rgb_encoder_k, flow_encoder_k, rgb_head_k, flow_head_k: momentum copies (no gradient).
        rgb_queue, flow_queue: (queue_size, feat_dim) buffers; rgb_queue_ptr, flow_queue_ptr: (1,) long.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m, lc = cfg.model, cfg.loss
        unknown = set(lc.weights) - set(LOSS_TERMS)
        if unknown:
            raise UserError(f"loss.weights.{sorted(unknown)[0]}: unknown loss term (known: {', '.join(LOSS_TERMS)})")
        if m.neck_channels < 8 or m.neck_channels % 8:
            raise UserError(f"model.neck_channels: {m.neck_channels} must be a positive multiple of 8 "
                            "(the flow network's last stage has 8x its stem width and must match for LMCL)")
        self.weights = {name: float(lc.weights.get(name, 0.0)) for name in LOSS_TERMS}
        self.temperature = float(lc.temperature)
        self.compat = m.compat
        self.key_bn = m.key_bn

        self.rgb_encoder = R3DBackbone(m.rgb_width)
        self.rgb_neck = FPNSEPCNeck(self.rgb_encoder.map_channels, m.neck_channels)
        self.flow_encoder = FlowNet(cfg.data.frames_per_clip, width=m.neck_channels // 8)
        c_rgb, c_flow = self.rgb_encoder.feature_dim, self.flow_encoder.out_channels
        self.rgb_head = _mlp(c_rgb, c_rgb, m.feat_dim, bn=m.head_bn)
        self.flow_head = _mlp(c_flow, c_flow, m.feat_dim, bn=m.head_bn)

        # Momentum encoders start as exact copies of the query ones (MoCo).
        self.rgb_encoder_k = _freeze(copy.deepcopy(self.rgb_encoder))
        self.flow_encoder_k = _freeze(copy.deepcopy(self.flow_encoder))
        self.rgb_head_k = _freeze(copy.deepcopy(self.rgb_head))
        self.flow_head_k = _freeze(copy.deepcopy(self.flow_head))
        if m.key_bn == "sync":
            self.rgb_encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.rgb_encoder_k)
            self.flow_encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.flow_encoder_k)

        for name in ("rgb", "flow"):
            self.register_buffer(f"{name}_queue", F.normalize(torch.randn(m.queue_size, m.feat_dim), dim=1))
            self.register_buffer(f"{name}_queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ pairs and bookkeeping

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.rgb_encoder, self.rgb_encoder_k), (self.flow_encoder, self.flow_encoder_k),
                (self.rgb_head, self.rgb_head_k), (self.flow_head, self.flow_head_k)]

    @property
    def uses_all_parameters(self) -> bool:
        """False when some loss weight is 0, so DDP needs ``find_unused_parameters=True``."""
        return all(w > 0 for w in self.weights.values())

    def compile_encoders(self, **compile_kwargs) -> list[str]:
        """``torch.compile`` the encoders, the neck and the projection heads in place (query and momentum
        copies; ``nn.Module.compile``: parameter names and checkpoints do not change).

        What stays eager, on purpose: the loss terms, the queue snapshots and ring writes, the
        momentum update and the shuffled-BN gathers. The compiled graphs see parameters, buffers and
        inputs only, so an in-place EMA of the key encoders' parameters, BatchNorm statistics and the
        queues changing every step cause no recompiles (tests/train/test_step_options.py counts them).
        Returns the compiled modules' names.
        """
        names = ["rgb_encoder", "rgb_neck", "flow_encoder", "rgb_head", "flow_head",
                 "rgb_encoder_k", "flow_encoder_k", "rgb_head_k", "flow_head_k"]
        for name in names:
            getattr(self, name).compile(**compile_kwargs)
        return names

    @torch.no_grad()
    def momentum_update(self, m: float, ok: torch.Tensor | None = None) -> None:
        """EMA of the key encoders and projections: p_k <- m * p_k + (1 - m) * p_q (parameters only;
        BN running statistics of the key encoders come from their own forward passes, as in MoCo).

        ``ok``: optional 0-dim bool tensor on the model's device; where False the key encoders are left
        as they are (the trainer's non-finite-step guard), decided on the device without a host read.
        """
        for q_mod, k_mod in self._pairs():
            q_params, k_params = list(q_mod.parameters()), list(k_mod.parameters())
            if ok is None:
                torch._foreach_lerp_(k_params, q_params, 1.0 - m)
            else:   # p_k += w * (p_q - p_k) with w = (1 - m) * ok, a device tensor (lerp takes only a number)
                d = torch._foreach_sub(q_params, k_params)
                torch._foreach_mul_(d, ok.to(k_params[0].dtype) * (1.0 - m))
                torch._foreach_add_(k_params, d)

    @torch.no_grad()
    def enqueue(self, rgb_keys: torch.Tensor, flow_keys: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Write this step's keys (all-gathered across ranks) into the FIFO queues.

        Args:
            rgb_keys: (b, D) RGB keys of this rank (``out["keys_rgb"]``).
            flow_keys: (b, D) base flow keys of this rank (``out["keys_flow"]``).
            ok: optional 0-dim bool device tensor, equal on all ranks; where False nothing is written
                and the pointers stay (a non-finite step's keys never reach the queues).
        """
        for name, keys in (("rgb", rgb_keys), ("flow", flow_keys)):
            queue, ptr = getattr(self, f"{name}_queue"), getattr(self, f"{name}_queue_ptr")
            _ring_write(queue, ptr, all_gather_cat(keys.detach(), same_size=True), ok)

    # ------------------------------------------------------------------ encoders

    def _key(self, encoder: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        def fn(z: torch.Tensor) -> torch.Tensor:
            return F.normalize(head(encoder(z)[0]).float(), dim=1)

        with torch.no_grad():
            if self.key_bn == "shuffle":
                return shuffled_forward(fn, x)
            return fn(x)

    # ------------------------------------------------------------------ forward

    def forward(self, inp: MSCLInputs) -> dict[str, torch.Tensor]:
        """Compute the weighted MSCL objective for one batch.

        Args:
            inp: the six views (see :class:`MSCLInputs`).

        Returns:
            dict with one float32 scalar per active term (weight > 0; terms with weight 0 are not
            computed and absent), ``"loss"`` (the weighted sum), and ``"keys_rgb"`` / ``"keys_flow"``
            ((B, D) float32, no gradient) to pass to :meth:`enqueue` after the optimiser step.
        """
        w = self.weights
        active = [n for n in LOSS_TERMS if w[n] > 0]
        if not active:
            raise UserError("loss.weights: at least one term must be > 0")
        released = self.compat == "released"
        # Departure 1 (released): the flow key is rotated flow A, the "rotated" query is unrotated flow B.
        flow_key_view, rot_query_view = (inp.rot_q, inp.flow_k) if released else (inp.flow_k, inp.rot_q)

        queries_needed = {CLIP_TERMS[n][0] for n in active if n in CLIP_TERMS}
        if "lmcl" in active:
            queries_needed |= {"rgb", "flow", "rot"}
        q, local = {}, {}
        if "rgb" in queries_needed:
            pooled, maps = self.rgb_encoder(inp.rgb_q)
            q["rgb"] = F.normalize(self.rgb_head(pooled).float(), dim=1)
            if "lmcl" in active:
                local["rgb"] = self.rgb_neck(maps).mean(dim=(3, 4))            # (B, C, T/2)
        for view, x in (("flow", inp.flow_q), ("rot", rot_query_view)):
            if view in queries_needed:
                pooled, fmap = self.flow_encoder(x)
                q[view] = F.normalize(self.flow_head(pooled).float(), dim=1)
                local[view] = fmap.mean(dim=(3, 4))                            # (B, C, T/2)

        # Keys: RGB and base flow always (they feed the queues); rotated keys only when a term uses them.
        k = {"rgb": self._key(self.rgb_encoder_k, self.rgb_head_k, inp.rgb_k),
             "flow": self._key(self.flow_encoder_k, self.flow_head_k, flow_key_view)}
        if any(CLIP_TERMS[n][1] == "rot" for n in active if n in CLIP_TERMS):
            k["rot"] = self._key(self.flow_encoder_k, self.flow_head_k, inp.rot_k)

        # Snapshots: enqueue() writes the buffers in place after backward; autograd must keep these.
        queues = {"rgb": self.rgb_queue.detach().clone(), "flow": self.flow_queue.detach().clone()}
        if released and "rgb_flow" in active:   # departure 3: negatives = flow queue after this step's enqueue
            after = queues["flow"].clone()
            _ring_write(after, self.flow_queue_ptr.clone(), all_gather_cat(k["flow"], same_size=True))
            queues["flow_after"] = after

        out: dict[str, torch.Tensor] = {}
        for name in active:   # the loss functions compute in float32 with autocast off
            if name == "lmcl":
                out[name] = losses.lmcl(local["rgb"], local["flow"], local["rot"], temperature=self.temperature)
                continue
            qv, kv = CLIP_TERMS[name]
            queue = queues["rgb" if kv == "rgb" else "flow"]
            if name == "rgb_flow" and "flow_after" in queues:
                queue = queues["flow_after"]
            out[name] = losses.infonce(q[qv], k[kv], queue, temperature=self.temperature)
        out["loss"] = sum(w[n] * out[n] for n in active)
        out["keys_rgb"] = k["rgb"]
        out["keys_flow"] = k["flow"]
        return out


@torch.no_grad()
def _ring_write(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, ok: torch.Tensor | None = None) -> None:
    """FIFO write of ``keys`` (n, D) into ``queue`` (K, D) at ``ptr`` (1,), wrapping; advances ``ptr``.

    Indices are computed on the queue's device, so no host synchronisation happens. If n > K only
    the last K keys are kept (the older ones would be overwritten within the same write anyway).
    """
    size, n = queue.shape[0], keys.shape[0]
    idx = (ptr + torch.arange(n, device=queue.device)) % size
    if n > size:
        idx, keys = idx[-size:], keys[-size:]
    keys = keys.to(queue.dtype)
    if ok is not None:   # skipped step: rewrite the slots with what they hold, do not advance
        keys = torch.where(ok, keys, queue.index_select(0, idx))
        n = ok.to(ptr.dtype) * n
    queue.index_copy_(0, idx, keys)
    ptr.add_(n).remainder_(size)
