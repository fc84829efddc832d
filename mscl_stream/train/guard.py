"""Non-finite-step guard: a bad step changes nothing, decided on the device, read by the host later.

A step is *bad* when its loss or its gradient norm is not finite (on any rank). A bad step must leave
the model as it was: parameters, optimizer state, momentum encoders, MoCo queues and BatchNorm running
statistics. Reading a flag on the host every step would stall a GPU pipeline, so everything is decided
on the device from one 0-dim bool tensor ``ok``:

* the optimizer update is skipped through the optimizer's ``found_inf`` input where it has one (fused
  SGD/Adam: ``_step_supports_amp_scaling``); any other optimizer gets a blocking ``ok.item()`` before
  its step (correct, slower: the one host read this module otherwise avoids);
* momentum update and enqueue take ``ok`` (``MSCL.momentum_update`` / ``MSCL.enqueue``);
* BatchNorm running statistics and counters (which the forward pass already changed) are restored from
  a copy taken before the forward: they live as views of two flat tensors (float, int64), so the copy
  and the restore are a couple of kernels.

The host learns about bad steps a step or so late: ``ok`` is copied into pinned memory without
blocking and read once that copy has completed (:meth:`StepGuard.publish` polls, it does not wait), to
count streaks; :meth:`StepGuard.flush` waits for all (before a checkpoint, at the end).
"""

from __future__ import annotations

import torch
from torch import nn

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _flatten_bn_stats(model: nn.Module) -> list[torch.Tensor]:
    """Re-point the BatchNorm running statistics of ``model`` to views of a few flat tensors.

    One flat tensor per (dtype, device): the float statistics and the int64 step counters. In-place
    updates (BatchNorm forward, ``load_state_dict``) keep writing into them; call after the model
    reached its device. Returns the flat tensors.
    """
    groups: dict[tuple, list] = {}
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if name in _BN_STATS and buf is not None:
                groups.setdefault((buf.dtype, buf.device), []).append((mod, name, buf))
    flats = []
    for slots in groups.values():
        flat = torch.cat([buf.detach().reshape(-1) for _, _, buf in slots])
        at = 0
        for mod, name, buf in slots:
            n = buf.numel()
            mod._buffers[name] = flat[at:at + n].view_as(buf)
            at += n
        flats.append(flat)
    return flats


def supports_found_inf(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step()`` honours ``opt.found_inf`` (fused implementations in torch)."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


def _init_momentum_buffers(opt: torch.optim.Optimizer) -> None:
    """Create SGD momentum buffers as zeros up front.

    Fused SGD allocates them with ``torch.empty`` at its first step and treats that step specially; a
    first step skipped through ``found_inf`` would leave uninitialised memory in them. With zero buffers
    and no dampening the first real step computes the same ``buf = grad`` as torch's first step.
    """
    if not isinstance(opt, torch.optim.SGD):
        return
    for group in opt.param_groups:
        if group.get("momentum", 0) and not group.get("dampening", 0):
            for p in group["params"]:
                st = opt.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class StepGuard:
    """Device-side finite check of each step, and a host view of the verdicts that never waits.

    Usage per step::

        guard.before_forward()
        ... forward, backward, unscale, grad_norm = clip_grad_norm_(...)
        ok = guard.check(loss, grad_norm)        # 0-dim bool on the device (all-reduced in DDP)
        guard.optimizer_step(opt, ok)            # skipped on the device when not ok
        model.momentum_update(m, ok); model.enqueue(k_rgb, k_flow, ok)
        guard.after_step(ok)                     # BN statistics restored when not ok
        for step_no, good in guard.publish(ok, step_no): ...   # earlier steps' results (host)
    """

    MAX_PENDING = 4     # flags in flight before publish() waits for the oldest

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer | None, device: torch.device,
                 world_size: int = 1) -> None:
        self.device = torch.device(device)
        self.world_size = world_size
        self._flats = _flatten_bn_stats(model)
        self._shadows = [torch.empty_like(f) for f in self._flats]
        pin = self.device.type == "cuda"
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self._pin = pin
        if opt is not None and supports_found_inf(opt):
            _init_momentum_buffers(opt)

    def before_forward(self) -> None:
        for flat, shadow in zip(self._flats, self._shadows):
            shadow.copy_(flat)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
        """0-dim bool device tensor: loss and gradient norm finite (on every rank)."""
        ok = torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            ok = ok & torch.isfinite(grad_norm.detach().float())
        if self.world_size > 1:
            flag = ok.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag.bool()
        return ok.reshape(())

    def optimizer_step(self, opt: torch.optim.Optimizer, ok: torch.Tensor, scaler=None) -> None:
        """``opt.step()`` that changes nothing when ``ok`` is False (no host read for fused optimizers)."""
        if scaler is not None:       # GradScaler skips inf/NaN gradients itself (its own found_inf)
            scaler.step(opt)
            scaler.update()
        elif supports_found_inf(opt):
            opt.found_inf = (~ok).to(torch.float32)
            opt.step()
        elif bool(ok):               # fallback: a host read, before the step
            opt.step()

    def after_step(self, ok: torch.Tensor) -> None:
        for flat, shadow in zip(self._flats, self._shadows):
            flat.copy_(torch.where(ok, flat, shadow))

    def publish(self, ok: torch.Tensor, step: int) -> list[tuple[int, bool]]:
        """Queue this step's flag for the host; return ``(step, ok)`` of the steps whose flag has arrived.

        On CUDA the flag is copied into pinned memory without blocking; it is read once its copy has
        completed (``Event.query``, which never waits), usually at the next step. Only when more than
        ``MAX_PENDING`` flags are outstanding does this wait for the oldest. On CPU the flag is read at once.
        """
        if self._pin:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending.append((step, host, ev))
        else:
            self._pending.append((step, ok, None))
        done = []
        while self._pending:
            s, t, ev = self._pending[0]
            if ev is not None and not ev.query():
                if len(self._pending) <= self.MAX_PENDING:
                    break
                ev.synchronize()          # bound the lag (and the host memory) when the device is far behind
            done.append((s, bool(t)))
            self._pending.pop(0)
        return done

    def flush(self) -> list[tuple[int, bool]]:
        """Every flag still pending (blocks on the device; end of run, before a checkpoint)."""
        out = []
        for s, t, ev in self._pending:
            if ev is not None:
                ev.synchronize()
            out.append((s, bool(t)))
        self._pending = []
        return out
