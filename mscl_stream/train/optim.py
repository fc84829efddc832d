"""The pretraining optimizer: SGD with momentum, in torch's fused, foreach or per-parameter form.

``optim.impl`` picks the implementation (the update is the same; the fused kernels differ from the
others by float rounding only):

* ``fused``: one kernel for all parameters (``torch.optim.SGD(..., fused=True)``, CUDA and CPU in
  this torch). It also honours ``opt.found_inf``, which the trainer's non-finite guard uses to skip a
  bad step on the device without a host read (mscl_stream.train.guard).
* ``foreach``: a few multi-tensor kernels per step (torch's default on CUDA).
* ``loop``: one update per parameter (the reference).
* ``auto``: fused where this torch supports it on the device, else foreach.
"""

from __future__ import annotations

import logging

import torch

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

IMPLS = ("auto", "fused", "foreach", "loop")


def fused_supported(device: torch.device) -> bool:
    """Whether fused SGD runs on ``device`` in this torch (a one-parameter probe)."""
    p = torch.nn.Parameter(torch.zeros(1, device=device))
    try:
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizer(cfg, params: list[torch.nn.Parameter], lr: float) -> torch.optim.SGD:
    """SGD over ``params`` with ``cfg.optim`` momentum / weight decay and the ``cfg.optim.impl`` kernels.

    Args:
        cfg: the run configuration (``optim.momentum``, ``optim.weight_decay``, ``optim.impl``).
        params: the trainable parameters, all on one device.
        lr: the initial learning rate (the trainer sets it every step from its schedule).
    """
    impl = getattr(cfg.optim, "impl", "auto")
    if impl not in IMPLS:
        raise UserError(f"optim.impl: {impl!r} is not one of {list(IMPLS)}")
    if not params:
        raise UserError("no trainable parameters")
    device = params[0].device
    if impl == "auto":
        impl = "fused" if fused_supported(device) else "foreach"
    elif impl == "fused" and not fused_supported(device):
        raise UserError(f"optim.impl: fused SGD is not supported on {device} by torch {torch.__version__}; "
                        "use auto or foreach")
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, **kind)
    opt.impl = impl          # what ran, for logs and benchmarks
    log.debug("optimizer: SGD (%s) over %d tensors", impl, len(params))
    return opt
