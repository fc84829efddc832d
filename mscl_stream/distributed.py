"""Distributed helpers: one process per GPU under torchrun; a plain single process without it.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every worker;
:func:`init_distributed` reads them and joins the process group (NCCL for CUDA devices, gloo for CPU).
Without these variables everything here degrades to the single-process identity, so the trainer and
the evaluation code call the same functions either way. Multi-node is plain ``torchrun --nnodes``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this node = index of this process's GPU.
        device: the device this process computes on (``cuda:<local_rank>`` or ``cpu``).
        is_main: rank 0: the one that logs, prints and writes checkpoints.
        backend: "nccl", "gloo", or None for a single process without a process group.
        owns_group: this call of :func:`init_distributed` created the process group, so its caller leaves it
            (:func:`release`); False where the group was already joined by an outer caller that ends it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str | None
    owns_group: bool = False


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={device}: CUDA is not available on this machine (use cpu or auto)")
        # Under torchrun each process owns the GPU of its local rank; an explicit index only makes sense
        # for a single process.
        index = local_rank if device == "cuda" else torch.device(device).index
        if index >= torch.cuda.device_count():
            raise UserError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPUs visible)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device != "cpu":
        raise UserError(f"train.device={device!r}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one, else run single-process.

    Args:
        backend: "auto" (NCCL on CUDA, gloo on CPU), "nccl" or "gloo".
        device: "auto", "cpu", "cuda" (the local rank's GPU) or "cuda:N" (single process only).

    Returns:
        DistInfo of this process. Calling it again after a successful init returns the same info, except
        ``owns_group`` (True only for the call that created the group).

    Raises:
        UserError: partial torchrun environment, NCCL asked for on CPU, a missing GPU.
    """
    present = [k for k in _ENV if k in os.environ]
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world <= 1 and not dist.is_initialized():
        dev = _pick_device(device, _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True, backend=None)
    missing = [k for k in _ENV if k not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set (launch with torchrun; "
                        f"found {', '.join(present)})")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.startswith("cuda:"):
        raise UserError(f"train.device={device}: under torchrun use 'cuda' or 'auto' (each rank takes "
                        "the GPU of its LOCAL_RANK)")
    dev = _pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if backend not in ("nccl", "gloo"):
        raise UserError(f"dist.backend={backend!r}: use auto, nccl or gloo")
    created = not dist.is_initialized()
    if created:
        # device_id binds NCCL's communicator to this rank's GPU (eager init, correct barrier device).
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
        if rank == 0:
            log.info("distributed: %d processes, backend %s, master %s:%s", world, backend,
                     os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0,
                    backend=backend, owns_group=created)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if _active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined (safe to call always, also twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release(info: DistInfo) -> None:
    """Leave the process group if ``info``'s :func:`init_distributed` call created it; else keep it for the
    caller that did (a command running several fine-tunes in one group), so the ranks never re-join."""
    if info.owns_group:
        cleanup()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order (identity in a single process).

    Args:
        x: (N_r, ...) tensor on this rank's device (CUDA for NCCL, CPU for gloo). N_r may differ between
            ranks; the trailing shape and dtype must agree.
        same_size: promise that every rank has the same N_r (MoCo keys): skips the size exchange.

    Returns:
        (sum of N_r, ...) tensor; no gradient flows through it (use it for keys and features).
    """
    if not _active():
        return x
    x = x.contiguous()
    world = dist.get_world_size()
    if same_size:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    top = max(sizes_i)
    # all_gather needs equal shapes: pad to the largest share, then cut each part back.
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)


def all_gather_objects(obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order (``[obj]`` in a single process).

    For small per-rank state such as sampler positions or :func:`checkpoint.rng_state` dicts.
    """
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (e.g. the checkpoint path chosen by ``--resume auto``)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; ``x`` itself in a single process). For logged metrics."""
    if not _active():
        return x
    y = x.detach().clone().float()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()
