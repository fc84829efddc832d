"""ClipSampler: which video and which raw frames every training sample of a rank decodes.

docs/method.md, section 1 (and 4 for MDS). A sample has two windows of T frames, ``frame_stride`` raw
frames apart: window A starts at rA, an even offset from the video's first usable frame, window B at
rA + d with d even and uniform in [-max_shift, max_shift]. Every sampled frame r of a flow step gets the
flow partner r + flow_gap. With ``data.wrap`` indices past the end wrap around inside [start, end);
without it the starts are clamped so that every index fits (a video too short for that wraps anyway,
counted and logged once).

Epoch plan, identical on every rank: the videos are permuted with a generator seeded by (seed, epoch)
and padded by repeating the first ones of the permutation up to a multiple of ``world_size``; rank r
takes every world_size-th video from position r, so shards are disjoint (up to the padding) and cover
the dataset, and every rank has the same number of samples. Each video of the shard is visited
``clips_per_video`` times, in an order and with windows drawn from a generator seeded by
(seed, epoch, rank). The whole epoch's draws are made up front (a few integers per sample), so a sample
is a pure function of (epoch, position) and resuming needs only those two numbers.

Repeated sampling (``data.repeat_samples`` = R > 1, off by default): every video visit of the plan
becomes R consecutive positions, each drawn exactly as a single sample would be (its own start and
shift, uniform over the video), so each sample's distribution is the method's; what changes is that
the R samples of a group share a video and sit next to each other in a batch, and an epoch has R times
the samples. The loader decodes a group's frames in one sweep (:meth:`ClipSampler.group`;
docs/data.md).

MDS ``online`` (section 4): every sample expands into K = ``data.mds_candidates`` candidates of the same
video, K distinct uniform even starts for window A (repeats only when the video has fewer than K
starts), each with its own window B = its A + the sample's one shift d. The device scores the A windows
and keeps one candidate per sample. Positions still count samples, so ``len()``, shards and resume are
those of the other modes; :meth:`ClipSampler.specs` returns the K candidates of a position.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mscl_stream.config import DataConfig
from mscl_stream.data.manifest import VideoRecord, read_manifest
from mscl_stream.errors import UserError

log = logging.getLogger(__name__)

MDS_DRAWS = 11          # docs/method.md, section 4: start A is drawn up to 11 times until allowed
_STREAM_SHARD, _STREAM_RANK = 1, 2   # generator streams (non-zero tags: SeedSequence pads with zeros)


@dataclass(frozen=True)
class SampleSpec:
    """One training sample: raw frame indices (int64) of both windows and their flow partners.

    Shapes: frame_idx_a, frame_idx_b (T,); partner_idx_a, partner_idx_b (F,); partner j belongs to
    sampled frame ``flow_steps(data)[j]``.
    """

    video_idx: int
    frame_idx_a: np.ndarray
    partner_idx_a: np.ndarray
    frame_idx_b: np.ndarray
    partner_idx_b: np.ndarray

    def all_frames(self) -> np.ndarray:
        """(2T + 2F,) indices in the order A, B, partners A, partners B (the loader's decode order)."""
        return np.concatenate([self.frame_idx_a, self.frame_idx_b, self.partner_idx_a, self.partner_idx_b])


def flow_steps(data: DataConfig) -> np.ndarray:
    """Which of the T sampled frames get a flow pair: (F,) int64 ("even": 0, 2, 4, ...; "all": all)."""
    step = 2 if data.flow_frames == "even" else 1
    return np.arange(0, data.frames_per_clip, step, dtype=np.int64)


def clip_span(data: DataConfig) -> int:
    """Raw frames one window touches from its start: last sampled frame or last partner, plus one."""
    last = (data.frames_per_clip - 1) * data.frame_stride
    last_partner = int(flow_steps(data)[-1]) * data.frame_stride + data.flow_gap
    return max(last, last_partner) + 1


def min_raw_frames(data: DataConfig) -> int:
    """Raw frames one training sample needs: one window (T sampled frames ``frame_stride`` apart and
    the flow partners of the frames that get flow, i.e. :func:`clip_span`); without wrap-around,
    window B may also start ``max_shift`` later. The index keeps shorter videos (evaluation uses them);
    :func:`pretraining_records` leaves them out of pretraining."""
    need = clip_span(data)
    return need if data.wrap else need + data.max_shift


def pretraining_records(records: list[VideoRecord], data: DataConfig) -> list[VideoRecord]:
    """The manifest rows long enough for one training sample (:func:`min_raw_frames`), in order.

    The rows left out are counted and logged once; a manifest with none long enough is a UserError.
    """
    need = min_raw_frames(data)
    keep = [r for r in records if r.frame_end - r.start >= need]
    if not records:
        return keep
    if not keep:
        raise UserError(f"no video is long enough for one pretraining sample: all {len(records)} are shorter "
                        f"than {need} raw frames (longest {max(r.frame_end - r.start for r in records)}); "
                        "shorten data.frames_per_clip/frame_stride/max_shift or index longer videos")
    if len(keep) < len(records):
        short = next(r for r in records if r.frame_end - r.start < need)
        log.warning("pretraining skips %d of %d videos shorter than one sample (%d raw frames; e.g. %s, %d)",
                    len(records) - len(keep), len(records), need, short.path, short.frame_end - short.start)
    return keep


def read_pretraining_manifest(data: DataConfig) -> list[VideoRecord]:
    """The rows of ``data.manifest`` (split ``data.split``) that pretraining-style sampling draws from:
    :func:`pretraining_records` of them (shorter videos counted, logged and left out), for every reader
    that samples training windows (the trainer, the demo's batch view, bench, the baseline loaders)."""
    return pretraining_records(read_manifest(data.manifest, data.split), data)


def _rng(seed: int, epoch: int, stream: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, epoch, rank, stream])


def _pick_mds_b(allowed: list[int], target: int, start: int) -> int:
    """docs/method.md, section 4, for window B: the target if allowed, else the smallest allowed start
    above it; ``start`` (raw frame 0 of the usable range) if the target is at or before it. A target
    above every allowed start (not covered by the method text) takes the largest allowed start."""
    if target <= start:
        return start
    i = bisect.bisect_left(allowed, target)
    if i < len(allowed) and allowed[i] == target:
        return target
    j = bisect.bisect_right(allowed, target)
    return allowed[j] if j < len(allowed) else allowed[-1]


class ClipSampler:
    """Seeded, epoch-aware, resumable sampler of :class:`SampleSpec` for one rank.

    Args:
        records: the manifest rows (video_idx indexes this list).
        data: sampling settings (frames_per_clip, frame_stride, flow_gap, max_shift, wrap, flow_frames,
            clips_per_video, mds).
        rank, world_size: this process's shard.
        seed: base seed; the epoch and rank are mixed in.

    Iterating yields the samples from the current position to the end of the epoch; call
    :meth:`set_epoch` before each epoch (an exhausted epoch yields nothing until then).
    """

    def __init__(self, records: list[VideoRecord], data: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if not records:
            raise UserError("ClipSampler: no videos to sample from")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"ClipSampler: rank {rank} is not in [0, world_size={world_size})")
        self.records, self.data = records, data
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps = flow_steps(data)
        self.span = clip_span(data)
        self.epoch, self.position = 0, 0
        self.repeat = data.repeat_samples
        self._resumed = False
        self.candidates = data.mds_candidates if data.mds == "online" else 1
        self._plan: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None   # ra, rb: (n, K)
        self._short_logged = False
        self._allowed: list[list[int] | None] | None = None  # sorted allowed MDS starts per video
        self._allowed_set: list[set[int]] = []
        for r in records:
            if r.frame_end - r.start < 1:
                raise UserError(f"{r.path}: empty frame range [{r.start}, {r.frame_end}) in the manifest")
        if data.mds == "index":
            # Videos without stored starts (indexed without --mds, or too long for index-time MDS) are
            # sampled uniformly; they are counted and logged, never silently treated as "all allowed".
            missing = [r.path for r in records if not r.mds_starts]
            if len(missing) == len(records):
                raise UserError(f"data.mds=index: no video has MDS starts (e.g. {missing[0]}); "
                                "re-run `mscl-stream index --mds`")
            if missing:
                log.warning("data.mds=index: %d of %d videos have no MDS starts (e.g. %s); they use uniform "
                            "starts", len(missing), len(records), missing[0])
            self._allowed = [sorted(int(s) for s in r.mds_starts) if r.mds_starts else None for r in records]
            self._allowed_set = [set(a) if a else set() for a in self._allowed]

    # ------------------------------------------------------------------ epoch plan
    def __len__(self) -> int:
        """Samples per epoch on this rank (the same on every rank)."""
        per_rank = -(-len(self.records) // self.world_size)
        return per_rank * self.data.clips_per_video * self.repeat

    def group(self, position: int) -> range:
        """Positions of the repeated-sampling group holding ``position``: R consecutive samples of one
        video (``range(position, position + 1)`` with repeated sampling off)."""
        g = position // self.repeat * self.repeat
        return range(g, g + self.repeat)

    def shard(self, epoch: int) -> np.ndarray:
        """Video indices of this rank for ``epoch`` (padded by repetition; order of the global permutation)."""
        n, w = len(self.records), self.world_size
        perm = _rng(self.seed, epoch, _STREAM_SHARD).permutation(n)
        total = -(-n // w) * w
        padded = np.resize(perm, total)          # repeats the permutation from its start
        return padded[self.rank::w]

    def _draw_start(self, rng: np.random.Generator, lo: int, hi: int) -> int:
        """Uniform even offset from ``lo`` in [lo, hi] (inclusive)."""
        return lo + 2 * int(rng.integers(0, (hi - lo) // 2 + 1))

    def _draw_candidates(self, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
        """(K,) uniform even offsets from ``lo`` in [lo, hi], distinct when there are at least K."""
        count = (hi - lo) // 2 + 1
        return lo + 2 * rng.choice(count, size=self.candidates, replace=count < self.candidates).astype(np.int64)

    def _plan_epoch(self, epoch: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan
        d = self.data
        rng = _rng(self.seed, epoch, _STREAM_RANK, self.rank)
        vids = np.repeat(self.shard(epoch), d.clips_per_video)
        vids = vids[rng.permutation(len(vids))]
        vids = np.repeat(vids, self.repeat)      # a group's samples: consecutive, each drawn on its own
        ra = np.empty((len(vids), self.candidates), np.int64)
        rb = np.empty((len(vids), self.candidates), np.int64)
        half = d.max_shift // 2
        short = 0
        for i, v in enumerate(vids):
            rec = self.records[v]
            start, end = rec.start, rec.frame_end
            fits = end - self.span >= start
            hi = end - self.span if (fits and not d.wrap) else end - 1
            short += not (fits or d.wrap)
            if self.candidates > 1:      # online MDS: K starts for A, one shift d shared by them
                a = self._draw_candidates(rng, start, hi)
                b = a + 2 * int(rng.integers(-half, half + 1))
            else:
                a = self._draw_start(rng, start, hi)
                mds = self._allowed is not None and self._allowed[v] is not None
                if mds:
                    allowed = self._allowed_set[v]
                    for k in range(MDS_DRAWS):
                        if k:
                            a = self._draw_start(rng, start, hi)
                        if a in allowed:
                            break
                    else:
                        a = self._allowed[v][0]
                target = a + 2 * int(rng.integers(-half, half + 1))
                b = _pick_mds_b(self._allowed[v], target, start) if mds else target
            if not d.wrap and fits:
                # clamp both starts into [start, hi], keeping the even offset from start
                a = np.clip(a, start, start + (hi - start) // 2 * 2)
                b = np.clip(b, start, start + (hi - start) // 2 * 2)
            ra[i], rb[i] = a, b
        if short and not self._short_logged:
            self._short_logged = True
            log.warning("data.wrap=false: %d samples come from videos shorter than one window (%d raw "
                        "frames); their indices wrap around", short, self.span)
        self._plan = (epoch, vids.astype(np.int64), ra, rb)
        return self._plan

    # ------------------------------------------------------------------ samples
    def _window(self, rec: VideoRecord, r0: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        raw = r0 + d.frame_stride * np.arange(d.frames_per_clip, dtype=np.int64)
        partners = raw[self.steps] + d.flow_gap
        length = rec.frame_end - rec.start
        # wrap around inside [start, end); a no-op when the window fits
        wrap = lambda x: rec.start + np.mod(x - rec.start, length)  # noqa: E731
        return wrap(raw), wrap(partners)

    def specs(self, position: int) -> list[SampleSpec]:
        """The candidates of the sample at ``position`` of the current epoch: K of the same video with
        MDS ``online``, else one. Positions past the end cycle through the epoch again (the loader's
        refills after skipped files use this to keep ranks in step)."""
        _, vids, ra, rb = self._plan_epoch(self.epoch)
        i = position % len(vids)
        rec = self.records[int(vids[i])]
        out = []
        for a, b in zip(ra[i].tolist(), rb[i].tolist()):
            fa, pa = self._window(rec, a)
            fb, pb = self._window(rec, b)
            out.append(SampleSpec(int(vids[i]), fa, pa, fb, pb))
        return out

    def spec(self, position: int) -> SampleSpec:
        """The sample at ``position`` (its first candidate with MDS ``online``: a uniform start)."""
        return self.specs(position)[0]

    def __iter__(self) -> Iterator[SampleSpec]:
        n = len(self)
        while self.position < n:
            s = self.spec(self.position)
            self.position += 1           # before yielding: state_dict() after k samples says k
            yield s

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample (unless a state for this epoch was just loaded)."""
        if self._resumed and epoch == self.epoch:
            self._resumed = False
            return
        self._resumed = False
        self.epoch, self.position = int(epoch), 0

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Position in the run: the epoch, samples consumed in it, and what they depend on."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_records": len(self.records),
                "clips_per_video": self.data.clips_per_video, "repeat_samples": self.repeat}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken; the remaining samples equal those of an uninterrupted run."""
        for key, have in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size),
                          ("num_records", len(self.records)), ("clips_per_video", self.data.clips_per_video),
                          ("repeat_samples", self.repeat)):
            if state.get(key, 1 if key == "repeat_samples" else None) != have:   # older states: no repeats
                raise UserError(f"cannot resume the sampler: saved {key}={state.get(key)!r}, now {have!r} "
                                "(same manifest, seed, number of ranks and sampling settings needed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._resumed = True
