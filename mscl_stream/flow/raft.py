"""RAFT (torchvision raft_small / raft_large) as an in-batch flow estimator.

The network's modules come from torchvision; the inference loop is our own
(:mod:`mscl_stream.flow.raft_loop`: fp32 correlation pyramid, upsampling only after the last update).
This module holds the estimator around it: options, precision, the speed variants (Triton lookup,
compiled update block, channels_last, warm start; docs/performance.md), torch.compile and CUDA-graph
runners with their eager fallbacks, and the memory sizing of chunks.

Weights (:func:`mscl_stream.flow.raft_weights.load_raft_weights`): a local file (torchvision
state_dict or an original princeton-vl checkpoint, whose key names are remapped), a torchvision
weights enum name, or "none" (random init, with a warning).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Callable

import torch

from mscl_stream.errors import UserError
from mscl_stream.flow.base import (auto_chunk_size, check_pair, crop_padding, pad_to_multiple, reject_unknown_options,
                                   run_chunked)
from mscl_stream.flow.raft_loop import CORR_IMPLS, lean_raft_flow
from mscl_stream.flow.raft_weights import load_raft_weights
from mscl_stream.machine import resolve_device

log = logging.getLogger(__name__)

MIN_SIZE = 128          # the 4-level correlation pyramid needs feature maps >= 16 px (inputs / 8)
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def suggest_size(h: int, w: int) -> tuple[int, int]:
    """Smallest working size >= 128 px per side with the same aspect ratio, multiples of 8."""
    s = MIN_SIZE / min(h, w)
    return int(math.ceil(h * s / 8) * 8), int(math.ceil(w * s / 8) * 8)


def _triton_ok(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:   # missing or broken triton: the torch lookup
        return False
    return True


class _GraphCache:
    """CUDA-graph replay of ``fn(image1, image2)`` per input shape (a few shapes: chunk tails)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_graphs: int = 4):
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        key = (tuple(x1.shape), x1.dtype, x1.device)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(x1, x2)
        graph, s1, s2, out = self.graphs[key]
        s1.copy_(x1)
        s2.copy_(x2)
        graph.replay()
        return out.clone()   # the static output is overwritten by the next replay

    def _capture(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple:
        s1, s2 = x1.clone(), x2.clone()
        side = torch.cuda.Stream(device=x1.device)
        side.wait_stream(torch.cuda.current_stream(x1.device))
        with torch.cuda.stream(side):          # warm-up outside capture (cuDNN autotuning, allocator)
            for _ in range(2):
                self.fn(s1, s2)
        torch.cuda.current_stream(x1.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the streaming loader's thread keeps copying batches to the GPU meanwhile; in the
        # default (global) mode its CUDA calls would invalidate this capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(s1, s2)
        return graph, s1, s2, out


class RAFT:
    """RAFT flow estimator (see the module docstring and mscl_stream.flow.base for the protocol).

    Args:
        model: "small" or "large".
        weights: file path, torchvision enum name ("C_T_V2", "Raft_Large_Weights.C_T_SKHT_V2",
            "DEFAULT"), or "none" for a random init (a warning).
        iters: GRU updates (12 is RAFT's default; fewer are faster and less converged).
        precision: "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"; CPU always runs fp32.
        compile: torch.compile the inference loop (GPU only; falls back to eager with a warning).
        cuda_graph: capture the loop in CUDA graphs per input shape (GPU only; falls back likewise).
        corr: correlation lookup, "grid_sample" (torch) or "triton" (one kernel per update; GPU, or
            CPU under TRITON_INTERPRET=1; elsewhere grid_sample with a warning). Same result.
        compile_update: torch.compile only the update block (most of the loop's small kernels);
            combines with cuda_graph (the compiled kernels are captured in our graphs).
        channels_last: channels_last activations and weights for the convolutions.
        warm_start: chain length c > 1 turns on warm start: pairs i*c .. i*c+c-1 form a chain (the
            flow frames of one clip window, in order) and positions after the first start from the
            previous position's flow with ``warm_iters`` updates. 0 or 1 = off. The batch must be a
            multiple of c.
        warm_iters: updates of warm-started pairs (default iters // 2).
        chunk_size: pairs per forward (0 = from a memory budget).
        loop: "lean" (ours) or "torchvision" (the model's own forward; for comparisons).
        device: "auto", "cpu", "cuda", ...
    """

    OPTIONS = ("model", "weights", "iters", "precision", "compile", "cuda_graph", "chunk_size", "loop", "device",
               "corr", "compile_update", "channels_last", "warm_start", "warm_iters")

    def __init__(self, **options):
        reject_unknown_options("raft", options, self.OPTIONS)
        model = options.get("model", "small")
        if model not in ("small", "large"):
            raise UserError(f"RAFT model must be 'small' or 'large', got {model!r}")
        self.name = f"raft_{model}"
        self.device = resolve_device(options.get("device", "auto"))
        self.iters = int(options.get("iters", 12))
        if self.iters < 1:
            raise UserError(f"{self.name}: iters must be >= 1, got {self.iters}")
        self.chunk_size = int(options.get("chunk_size", 0))
        if self.chunk_size < 0:
            raise UserError(f"{self.name}: chunk_size must be >= 0, got {self.chunk_size}")
        self.loop = options.get("loop", "lean")
        if self.loop not in ("lean", "torchvision"):
            raise UserError(f"{self.name}: loop must be 'lean' or 'torchvision', got {self.loop!r}")
        self.precision = self._resolve_precision(options.get("precision", "auto"))
        on_gpu = self.device.type == "cuda"
        self.compile = bool(options.get("compile", False))
        self.cuda_graph = bool(options.get("cuda_graph", False))
        for flag in ("compile", "cuda_graph"):
            if getattr(self, flag) and not on_gpu:
                warnings.warn(f"{self.name}: {flag}=True needs a CUDA device; running eager on {self.device}",
                              stacklevel=2)
                setattr(self, flag, False)
        self.corr = self._resolve_corr(options.get("corr", "grid_sample"))
        self.compile_update = bool(options.get("compile_update", False))
        self.channels_last = bool(options.get("channels_last", False))
        self.warm_start = int(options.get("warm_start", 0))
        self.warm_iters = int(options.get("warm_iters", max(1, self.iters // 2)))
        if self.warm_start < 0 or self.warm_iters < 1:
            raise UserError(f"{self.name}: warm_start must be >= 0 and warm_iters >= 1, got "
                            f"{self.warm_start} / {self.warm_iters}")
        lean_only = [k for k in ("corr", "compile_update", "channels_last", "warm_start")
                     if getattr(self, k) not in ("grid_sample", False, 0, 1)]
        if self.loop != "lean" and lean_only:
            raise UserError(f"{self.name}: {', '.join(lean_only)} need loop=lean")

        from torchvision.models.optical_flow import raft_large, raft_small
        self.model = (raft_small if model == "small" else raft_large)(weights=None, progress=False)
        self.weights_source = load_raft_weights(self.model, model, options.get("weights", "none"))
        self.model.eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._update = self.model.update_block
        if self.compile_update:
            # dynamic=False: one graph per pair count (a batch and its chunk tail, warm-start chains)
            self._update = self._compiled_update(torch.compile(self.model.update_block, dynamic=False))
        self._fn = self._build_fn()

    def _resolve_corr(self, corr: str) -> str:
        if corr not in CORR_IMPLS:
            raise UserError(f"{self.name}: corr must be one of {', '.join(CORR_IMPLS)}, got {corr!r}")
        if corr == "triton" and not _triton_ok(self.device):
            warnings.warn(f"{self.name}: corr=triton needs a CUDA device with triton (or TRITON_INTERPRET=1 on "
                          f"CPU); using grid_sample on {self.device}", stacklevel=3)
            return "grid_sample"
        return corr

    def _compiled_update(self, compiled: Callable) -> Callable:
        """The compiled update block; on its first failure warn once and use the eager module."""
        state = {"ok": True}

        def run(*args):
            if state["ok"]:
                try:
                    return compiled(*args)
                except Exception as e:  # inductor/toolchain failures come in many types
                    state["ok"] = False
                    msg = f"{self.name}: compiling the update block failed ({type(e).__name__}); running eager"
                    warnings.warn(msg, stacklevel=2)
                    log.warning(msg)
            return self.model.update_block(*args)
        return run

    def _resolve_precision(self, precision: str) -> str:
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in _PRECISIONS:
            raise UserError(f"{self.name}: precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision != "fp32" and self.device.type != "cuda":
            warnings.warn(f"{self.name}: precision {precision} is GPU-only here; using fp32 on {self.device}",
                          stacklevel=3)
            return "fp32"
        return precision

    def _eager(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        amp_dtype = _PRECISIONS[self.precision]
        if self.loop == "torchvision":
            with torch.autocast(x1.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return self.model(x1, x2, num_flow_updates=self.iters)[-1].float()
        return lean_raft_flow(self.model, x1, x2, self.iters, amp_dtype, corr=self.corr, update_block=self._update,
                              channels_last=self.channels_last, chain=max(self.warm_start, 1),
                              warm_iters=self.warm_iters)

    def _build_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = self._eager
        if self.compile:
            # with graphs too, let inductor do the capture ("reduce-overhead") instead of our cache
            mode = "reduce-overhead" if self.cuda_graph else None
            compiled = torch.compile(self._eager, mode=mode, dynamic=False)
            fn = self._with_fallback(lambda a, b: compiled(a, b).clone(), "torch.compile")
        elif self.cuda_graph:
            fn = self._with_fallback(_GraphCache(self._eager), "CUDA graph capture")
        return fn

    def _with_fallback(self, fast: Callable, what: str) -> Callable:
        """Use ``fast``; on its first failure warn once and stay eager for good."""
        state = {"ok": True}

        def run(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
            if state["ok"]:
                try:
                    return fast(x1, x2)
                except Exception as e:  # compile/capture failures come in many types
                    state["ok"] = False
                    first = (str(e).splitlines() or [""])[0][:200]
                    msg = f"{self.name}: {what} failed ({type(e).__name__}: {first}); running eager"
                    warnings.warn(msg, stacklevel=2)
                    log.warning(msg)
                    torch.cuda.synchronize(self.device)
            return self._eager(x1, x2)
        return run

    def bytes_per_pair(self, h: int, w: int) -> float:
        """Rough peak working memory per pair: the fp32 correlation pyramid plus encoder activations
        (per-pixel terms fitted to peak memory; docs/performance.md)."""
        cells = math.ceil(h / 8) * math.ceil(w / 8)
        per_pixel = 320.0 if self.name == "raft_small" else 512.0
        return 4.0 * cells * cells * 4 / 3 + per_pixel * h * w

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8/float [0,255] x2 on ``device`` -> (N,2,H,W) float32 forward flow in pixels."""
        check_pair(frames_a, frames_b, self.name, device=self.device)
        n, _, h, w = frames_a.shape
        if min(h, w) < MIN_SIZE:
            sh, sw = suggest_size(h, w)
            raise UserError(f"{self.name} needs frames of at least {MIN_SIZE} px per side, got {h}x{w}; "
                            f"compute flow at e.g. {sh}x{sw} (data.frame_size) and crop afterwards")
        if n == 0:
            return torch.zeros(0, 2, h, w, device=self.device)
        chunk = self.chunk_size or auto_chunk_size(self.bytes_per_pair(h, w), self.device, n)
        c = self.warm_start
        if c > 1:              # chunks hold whole chains
            if n % c:
                raise UserError(f"{self.name}: warm_start={c} needs whole chains of {c} pairs, got {n} pairs "
                                "(set flow.options.warm_start to the flow frames per window)")
            chunk = max(c, chunk // c * c)
        with torch.inference_mode():
            flow = run_chunked(self._run, frames_a, frames_b, chunk)
        # a plain (non-inference) tensor, so later autograd code may save it for backward
        return flow.clone()

    def _run(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        x1, pads = pad_to_multiple(frames_a.float() / 127.5 - 1.0, 8)   # [0,255] -> [-1,1]
        x2, _ = pad_to_multiple(frames_b.float() / 127.5 - 1.0, 8)
        return crop_padding(self._fn(x1, x2), pads).float()

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights_source,
                "options": {"iters": self.iters, "precision": self.precision, "compile": self.compile,
                            "cuda_graph": self.cuda_graph, "chunk_size": self.chunk_size, "loop": self.loop,
                            "corr": self.corr, "compile_update": self.compile_update,
                            "channels_last": self.channels_last, "warm_start": self.warm_start,
                            "warm_iters": self.warm_iters if self.warm_start > 1 else None,
                            "device": str(self.device)}}
