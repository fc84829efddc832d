"""Batched TV-L1 optical flow (Zach, Pock & Bischof 2007; the scheme of OpenCV's DualTVL1) in torch.

    est = TVL1(device="cuda")            # OpenCV's defaults
    flow = est(frames_a, frames_b)       # (N,3,H,W) uint8/float [0,255] -> (N,2,H,W) float32 pixels

All pairs of a batch go through the same coarse-to-fine schedule together: a pyramid of ``nscales``
levels (factor ``zoom``, bilinear, stopping before a side falls under 16 px); at each level ``warps``
times: warp I1 and its centred gradients by the current flow (bilinear, replicated border), linearise
(rho_c), then up to ``outer_iterations`` x (median filter of the flow, up to ``inner_iterations``
primal-dual iterations). The dual field p starts at zero on each level and persists across warps.
Intensities stay on the 0-255 scale (lambda 0.15 is meant for it); RGB is converted to gray with the
BT.601 weights (0.299, 0.587, 0.114).

Stopping rule (OpenCV's, applied per pair): within one warp, a pair stops iterating -- and skips the
remaining median filters of that warp -- after the iteration whose squared flow update summed over
the pixels is <= epsilon^2 * H * W (mean squared update <= epsilon^2), or after
outer_iterations * inner_iterations iterations. A stopped pair is frozen while the others go on, so
a pair's flow does not depend on the rest of its batch. The host asks "has every pair stopped?" only
every ``check_every`` iterations (every iteration on CPU, every 10 on CUDA: that question costs a
device synchronisation); frozen pairs do not change, so the result does not depend on
``check_every``, only the wasted work does.

The inner iteration runs either as eager torch (:func:`mscl_stream.flow.tvl1_ops.tvl1_inner_reference`,
many small ops per iteration) or as two fused Triton launches per iteration over the whole batch
(:mod:`mscl_stream.kernels.tvl1`, also a fused masked median). ``use_kernel="auto"`` picks Triton on
CUDA when it imports, torch otherwise. This module holds the parameters, the two inner-loop backends,
the coarse-to-fine solver and the estimator; the per-pixel operations are in
:mod:`mscl_stream.flow.tvl1_ops`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError
from mscl_stream.flow.base import auto_chunk_size, check_pair, run_chunked
from mscl_stream.flow.tvl1_ops import (centered_gradient, median_filter_reference, pyramid_sizes, rgb_to_gray,
                                       tvl1_inner_reference, warp)
from mscl_stream.machine import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TVL1Params:
    """Solver parameters (OpenCV DualTVL1 names and defaults; intensities 0-255)."""

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    zoom: float = 0.8
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    median_filter: int = 5

    def validate(self) -> None:
        """Raise a one-line UserError for an impossible parameter."""
        for key in ("tau", "lambda_", "theta"):
            if not getattr(self, key) > 0:
                raise UserError(f"tvl1: {key} must be > 0, got {getattr(self, key)}")
        if self.tau > 0.25 + 1e-12:
            raise UserError(f"tvl1: tau must be <= 0.25 for the dual scheme to converge, got {self.tau}")
        if not 0.0 < self.zoom < 1.0:
            raise UserError(f"tvl1: zoom must be in (0, 1), got {self.zoom}")
        if not self.epsilon >= 0:
            raise UserError(f"tvl1: epsilon must be >= 0, got {self.epsilon}")
        for key in ("nscales", "warps", "inner_iterations", "outer_iterations"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"tvl1: {key} must be an integer >= 1, got {v!r}")
        k = self.median_filter
        # cv2.medianBlur takes only 3 and 5 for float images; so do we
        if not isinstance(k, int) or isinstance(k, bool) or k not in (0, 1, 3, 5):
            raise UserError(f"tvl1: median_filter must be 0/1 (off), 3 or 5, got {k!r}")


# ----------------------------------------------------------------------------- inner-loop backends

class _TorchLevel:
    """State of one pyramid level for the eager torch backend (functional updates)."""

    def __init__(self, u: torch.Tensor, prm: TVL1Params):
        n, _, h, w = u.shape
        self.u = u
        self.p = u.new_zeros(n, 4, h, w)
        self.prm = prm
        self.kw = dict(l_t=prm.lambda_ * prm.theta, theta=prm.theta, taut=prm.tau / prm.theta,
                       eps2=prm.epsilon ** 2 * h * w)
        self.warped = None
        self.active = torch.ones(n, dtype=torch.bool, device=u.device)

    def begin_warp(self, warped: torch.Tensor) -> None:
        self.warped = warped
        self.active.fill_(True)

    def median(self) -> None:
        med = median_filter_reference(self.u, self.prm.median_filter)
        self.u = torch.where(self.active.view(-1, 1, 1, 1), med, self.u)

    def iterate(self, k: int) -> None:
        for _ in range(k):
            self.u, self.p, self.active, _ = tvl1_inner_reference(self.u, self.p, self.warped,
                                                                   self.active, **self.kw)

    def any_active(self) -> bool:
        return bool(self.active.any())


class _TritonLevel(_TorchLevel):
    """State of one pyramid level for the fused Triton backend (in-place updates, static buffers).

    With ``cuda_graph``, a run of k iterations (2k launches) is captured once per level and k, then
    replayed: the buffers never move, so one capture serves every warp of the level. The first run of
    each length goes eagerly (it also compiles the kernels); a failed capture falls back to launches.
    """

    def __init__(self, u: torch.Tensor, prm: TVL1Params, cuda_graph: bool = False):
        from mscl_stream.kernels import tvl1 as K

        super().__init__(u.contiguous(), prm)
        n, _, h, w = u.shape
        self.K = K
        self.act = torch.ones(n, dtype=torch.int32, device=u.device)
        self.conv = torch.zeros(n, dtype=torch.int32, device=u.device)
        self.partials = u.new_zeros(n, K.tiles_per_pair(h, w))
        self.scratch = torch.empty_like(self.u)
        self.warped = u.new_empty(n, 3, h, w)
        self.cuda_graph = cuda_graph and u.is_cuda
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self.runs: dict[int, int] = {}

    def begin_warp(self, warped: torch.Tensor) -> None:
        self.warped.copy_(warped)
        self.act.fill_(1)
        self.conv.zero_()

    def median(self) -> None:
        self.K.median_filter_(self.u, self.scratch, self.act, self.conv, self.prm.median_filter)

    def _launch(self, k: int) -> None:
        for _ in range(k):
            self.K.tvl1_step(self.u, self.p, self.warped, self.act, self.conv, self.partials, **self.kw)

    def iterate(self, k: int) -> None:
        graph = self.graphs.get(k)
        if graph is None and self.cuda_graph and self.runs.get(k, 0) >= 1 and k not in self.graphs:
            graph = self.graphs[k] = self._capture(k)
        self.runs[k] = self.runs.get(k, 0) + 1
        if graph is not None:
            graph.replay()
        else:
            self._launch(k)

    def _capture(self, k: int) -> torch.cuda.CUDAGraph | None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._launch(k)     # recorded, not run: the state is untouched
            return graph
        except Exception as e:      # capture is an optimisation: fall back to plain launches
            log.warning("tvl1: CUDA graph capture failed (%s: %s); launching kernels directly",
                        type(e).__name__, e)
            return None

    def any_active(self) -> bool:
        return bool((self.act * (1 - self.conv)).any())


# ----------------------------------------------------------------------------- the solver

def tvl1_solve(gray_a: torch.Tensor, gray_b: torch.Tensor, prm: TVL1Params, fused: bool = False,
               check_every: int = 1, stats: dict | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """Coarse-to-fine TV-L1 for a batch of gray pairs.

    Args:
        gray_a, gray_b: (N, 1, H, W) float32 on the 0-255 scale, H, W >= 2.
        prm: solver parameters.
        fused: use the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).
        check_every: iterations between the host's "all pairs stopped?" checks (>= 1).
        stats: if given, gets "iterations" (batch iterations launched, all levels) and "medians" added.
        cuda_graph: with ``fused`` on CUDA, replay captured graphs of the fixed-length iteration runs.
    Returns:
        (N, 2, H, W) float32 forward flow (u right, v down) in pixels.
    """
    n, _, h, w = gray_a.shape
    sizes = pyramid_sizes(h, w, prm.nscales, prm.zoom)
    i0s, i1s = [gray_a], [gray_b]
    for sh, sw in sizes[1:]:
        i0s.append(F.interpolate(i0s[-1], size=(sh, sw), mode="bilinear", align_corners=False))
        i1s.append(F.interpolate(i1s[-1], size=(sh, sw), mode="bilinear", align_corners=False))
    level_cls = functools.partial(_TritonLevel, cuda_graph=cuda_graph) if fused else _TorchLevel
    u = gray_a.new_zeros(n, 2, *sizes[-1])
    for s in range(len(sizes) - 1, -1, -1):
        u = _solve_level(i0s[s], i1s[s], level_cls(u, prm), prm, max(1, check_every), stats)
        if s > 0:
            (fh, fw), (ch, cw) = sizes[s - 1], sizes[s]
            u = F.interpolate(u, size=(fh, fw), mode="bilinear", align_corners=False)
            u = u * torch.tensor([fw / cw, fh / ch], device=u.device, dtype=u.dtype).view(1, 2, 1, 1)
    return u


def _solve_level(i0: torch.Tensor, i1: torch.Tensor, lev: _TorchLevel, prm: TVL1Params,
                 check_every: int, stats: dict | None) -> torch.Tensor:
    stats = stats if stats is not None else {}
    gx, gy = centered_gradient(i1)
    src = torch.cat((i1, gx, gy), dim=1)                      # (N, 3, h, w)
    for _ in range(prm.warps):
        i1w = warp(src, lev.u)
        u1, u2 = lev.u[:, 0:1], lev.u[:, 1:2]
        rho_c = i1w[:, 0:1] - i1w[:, 1:2] * u1 - i1w[:, 2:3] * u2 - i0
        lev.begin_warp(torch.cat((i1w[:, 1:3], rho_c), dim=1))
        for outer in range(prm.outer_iterations):
            if outer > 0 and not lev.any_active():
                break
            if prm.median_filter > 1:
                lev.median()
                stats["medians"] = stats.get("medians", 0) + 1
            done = 0
            while done < prm.inner_iterations:
                step = min(check_every, prm.inner_iterations - done)
                lev.iterate(step)
                done += step
                stats["iterations"] = stats.get("iterations", 0) + step
                if not lev.any_active():
                    break
    return lev.u


def triton_usable(device: torch.device) -> bool:
    """True when ``device`` is CUDA and triton can be imported."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:   # a broken triton install: fall back to eager torch
        return False
    return True


class TVL1:
    """Batched TV-L1 flow estimator (see the module docstring for the algorithm and stopping rule).

    Args:
        device: "cpu", "cuda", "cuda:1" or "auto".
        tau, lambda_, theta, nscales, zoom, warps, epsilon, inner_iterations, outer_iterations,
            median_filter: as OpenCV's DualTVL1 (median_filter 0/1 disables it).
        use_kernel: "auto" (Triton on CUDA when it imports), True (require it) or False (eager torch).
        chunk_size: pairs per chunk; 0 = automatic from the memory budget of flow.base.
        check_every: iterations between convergence checks; 0 = 1 on CPU, 10 on CUDA.
        cuda_graph: "auto" (on with the fused backend on CUDA), True or False: replay the fused
            iteration runs as captured CUDA graphs (launch overhead matters once most pairs stopped).
    """

    name = "tvl1"

    def __init__(self, device: str | torch.device = "cpu", tau: float = 0.25, lambda_: float = 0.15,
                 theta: float = 0.3, nscales: int = 5, zoom: float = 0.8, warps: int = 5,
                 epsilon: float = 0.01, inner_iterations: int = 30, outer_iterations: int = 10,
                 median_filter: int = 5, use_kernel: bool | str = "auto", chunk_size: int = 0,
                 check_every: int = 0, cuda_graph: bool | str = "auto"):
        self.device = resolve_device(device)
        self.params = TVL1Params(float(tau), float(lambda_), float(theta), nscales, float(zoom), warps,
                                 float(epsilon), inner_iterations, outer_iterations, median_filter)
        self.params.validate()
        if use_kernel not in ("auto", True, False):
            raise UserError(f"tvl1: use_kernel must be 'auto', True or False, got {use_kernel!r}")
        if use_kernel is True and not triton_usable(self.device):
            raise UserError(f"tvl1: use_kernel=True needs CUDA and triton (device {self.device})")
        self.fused = triton_usable(self.device) if use_kernel == "auto" else bool(use_kernel)
        for key, v in (("chunk_size", chunk_size), ("check_every", check_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"tvl1: {key} must be an integer >= 0, got {v!r}")
        self.chunk_size = chunk_size
        self.check_every = check_every or (10 if self.device.type == "cuda" else 1)
        if cuda_graph not in ("auto", True, False):
            raise UserError(f"tvl1: cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        self.cuda_graph = self.fused and self.device.type == "cuda" and cuda_graph in ("auto", True)
        self.last_stats: dict = {}     # iterations / medians of the last call (summed over chunks)

    def bytes_per_pair(self, h: int, w: int) -> float:
        """Rough peak working memory of one pair (float32 planes of the finest level)."""
        planes = 40 if self.fused else 70
        if not self.fused and self.params.median_filter > 1:
            planes += 2 * self.params.median_filter ** 2 + 4    # unfold copy of the median
        return planes * 4.0 * h * w

    def __call__(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8/float [0,255] twice -> (N,2,H,W) float32 forward flow in pixels."""
        check_pair(frames_a, frames_b, self.name, device=self.device)
        n, _, h, w = frames_a.shape
        if h < 4 or w < 4:
            raise UserError(f"{self.name}: frames must be at least 4x4 px, got {h}x{w}")
        if n == 0:
            return torch.zeros(0, 2, h, w, device=frames_a.device)
        chunk = self.chunk_size or auto_chunk_size(self.bytes_per_pair(h, w), self.device, n)
        self.last_stats = {}
        with torch.no_grad():
            return run_chunked(self._run, frames_a, frames_b, chunk)

    def _run(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        flow = tvl1_solve(rgb_to_gray(frames_a).contiguous(), rgb_to_gray(frames_b).contiguous(),
                          self.params, fused=self.fused, check_every=self.check_every,
                          cuda_graph=self.cuda_graph,
                          stats=self.last_stats)
        return flow.float().contiguous()

    def describe(self) -> dict:
        """Name, solver options and backend, for logs and checkpoints."""
        opts = asdict(self.params)
        opts.update(backend="triton" if self.fused else "torch", chunk_size=self.chunk_size,
                    check_every=self.check_every, cuda_graph=self.cuda_graph, device=str(self.device))
        return {"name": self.name, "options": opts, "weights": None}
