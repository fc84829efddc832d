"""Fine-tuning as a run: epochs of :class:`~mscl_stream.eval.finetune.FinetuneLoop` under the run machinery.

:class:`~mscl_stream.train.run.Run` gives the fine-tune run what it gives pretraining: the folder
``eval.out_dir`` checked and locked, ``--resume auto`` / a checkpoint path, SIGINT/SIGTERM answered by a
checkpoint at the next step and exit code 130/143, step checkpoints (kept per ``train.keep_checkpoints``)
and ``last.pt``, ``metrics.jsonl`` and a progress bar. Under torchrun every rank trains its share of each
batch (DDP) and scores its share of the validation and test videos.

Per epoch: the lr follows ``eval.milestones`` (x0.1 each), a validation pass every ``eval.val_every``
epochs (``eval.val_clips`` clips x 1 centre crop) on the manifest's "val" split, or the test split when
there is none; ``weights_best.pt`` (best validation top-1) and ``weights_last.pt`` (the encoder + head
state dict, written atomically) in the run folder, then a step checkpoint. At the end the last weights
are tested at each view count of ``eval.test_views`` (clips x crops, softmax probabilities averaged).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mscl_stream.config import Config
from mscl_stream.data.manifest import VideoRecord
from mscl_stream.distributed import DistInfo, all_gather_objects
from mscl_stream.errors import UserError
from mscl_stream.eval.finetune import FinetuneLoop
from mscl_stream.train.checkpoint import save_checkpoint
from mscl_stream.train.rundir import manifest_identity
from mscl_stream.train.run import Run
from mscl_stream.train.schedule import multistep_lr, scaled_lr

log = logging.getLogger(__name__)

# A resumed fine-tune must keep what defines its training; epochs, max_steps and the test views may change.
FINETUNE_MUST_MATCH = ("data.frames_per_clip", "data.frame_stride", "data.frame_size", "augment.out_size",
                       "model.rgb_width", "eval.lr", "eval.base_batch", "eval.batch_size", "eval.weight_decay",
                       "eval.clip_grad", "eval.milestones", "eval.segments", "eval.train_size", "eval.crop_scale",
                       "eval.crop_ratio", "optim.momentum", "train.seed")
FINETUNE_MAY_CHANGE = ("eval.epochs", "eval.max_steps", "eval.val_every", "eval.val_clips", "eval.test_views",
                       "eval.clips", "eval.crops")
WEIGHTS_BEST, WEIGHTS_LAST = "weights_best.pt", "weights_last.pt"


def views_label(clips: int, crops: int, segments: int = 0) -> str:
    """How a view count is named in results: "10x3" (clips x crops) or "16seg x1" (segments, crops)."""
    return f"{segments}seg x{crops}" if segments > 0 else f"{clips}x{crops}"


def parse_views(cfg: Config) -> list[tuple[int, int]]:
    """The final test's (clips, crops) pairs: ``eval.test_views`` ("10x3,1x1"), default eval.clips x eval.crops."""
    e = cfg.eval
    spec = e.test_views.strip() or f"{e.clips}x{e.crops}"
    out = []
    for part in spec.split(","):
        try:
            clips, crops = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"eval.test_views: {part.strip()!r} is not CLIPSxCROPS (e.g. \"10x3,1x1\")") from None
        if clips < 1 or crops not in (1, 3):
            raise UserError(f"eval.test_views: {part.strip()!r}: clips must be >= 1 and crops 1 or 3")
        out.append((1 if e.segments > 0 else clips, crops))
    return list(dict.fromkeys(out))


def topk(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest probabilities (k capped at the class count)."""
    k = min(k, probs.shape[1])
    return float((probs.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean())


def score(model: torch.nn.Module, records: Sequence[VideoRecord], cfg: Config, dist: DistInfo, *, clips: int,
          crops: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(probabilities, labels, videos not decoded) over every rank's share of ``records``, in eval mode."""
    from mscl_stream.eval.views import score_views
    was_training = model.training
    model.eval()
    mine = list(records)[dist.rank::dist.world_size]
    probs, labels, _counts = score_views(model, mine, cfg, dist.device, clips=clips, crops=crops,
                                         segments=cfg.eval.segments)
    model.train(was_training)
    parts = all_gather_objects((probs.cpu(), labels.cpu()))
    probs = torch.cat([p for p, _ in parts])
    labels = torch.cat([lab for _, lab in parts])
    return probs, labels, len(records) - len(labels)


def run_config(cfg: Config, out_dir: str | None = None) -> Config:
    """The config the run machinery reads: the run folder is the fine-tune's (``eval.out_dir``)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=out_dir or cfg.eval.out_dir))


def finetune(checkpoint: str | None, train: Sequence[VideoRecord], val: Sequence[VideoRecord],
             test: Sequence[VideoRecord], cfg: Config, dist: DistInfo, *, prefix: str,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Fine-tune on ``train``, validate on ``val`` each ``eval.val_every`` epochs, test on ``test``.

    Returns:
        ``{"encoder", "steps", "epochs" (started), "history" (per-epoch records), "best" (validation top-1
        and epoch), "out_dir", "train_top1" / "train_loss" (the last epoch's training clips), "views":
        {label: {"top1", "top5", "skipped_undecodable"}}}``.
    """
    e = cfg.eval
    k = int(max(r.label for r in train)) + 1
    if max(r.label for r in [*val, *test]) >= k:
        raise UserError(f"fine-tune: test/val labels reach {max(r.label for r in [*val, *test])} but the training "
                        f"split only has labels 0..{k - 1}")
    views = parse_views(cfg)                         # bad view specs fail before training
    rcfg = run_config(cfg)
    lr = scaled_lr(e.lr, e.batch_size, e.base_batch)
    with Run(rcfg, dist, name="finetune", must_match=FINETUNE_MUST_MATCH, may_change=FINETUNE_MAY_CHANGE) as run:
        run.choose_resume(manifest_identity(cfg.data.manifest) if dist.is_main and cfg.data.manifest else None)
        loop = FinetuneLoop(cfg, dist, checkpoint, train, k, lr, prefix)
        run.restore(loop)
        total = e.epochs * loop.steps_per_epoch
        total = min(total, e.max_steps) if e.max_steps else total
        run.begin(total, initial=loop.step)
        t0 = time.perf_counter()
        _fit(loop, run, val, cfg, lr, total, t0, on_step)
        if dist.is_main:                             # also when max_steps ended the run inside an epoch
            save_checkpoint(Path(run.out) / WEIGHTS_LAST, loop.core.state_dict())
        s, last = loop.stats, (loop.history[-1] if loop.history else {})
        seen = s["seen"] or 1     # a run that max_steps ended inside an epoch reports that epoch's clips
        train = ({"train_top1": s["correct"] / seen, "train_loss": s["loss_sum"] / seen} if s["seen"] else
                 {"train_top1": last.get("train_top1", float("nan")), "train_loss": last.get("train_loss", float("nan"))})
        result = {"encoder": loop.desc, "steps": loop.step, "epochs": loop.epoch + (loop.batch_index > 0),
                  "history": loop.history, "best": loop.best, "out_dir": str(run.out), "views": {}, **train}
        for clips, crops in views:
            probs, labels, skipped = score(loop.core, test, cfg, dist, clips=clips, crops=crops)
            result["views"][views_label(clips, crops, e.segments)] = {
                "top1": topk(probs, labels, 1), "top5": topk(probs, labels, 5), "skipped_undecodable": skipped}
        run.checkpoint("last", loop)
        run.finish({"steps": loop.step, "run_id": run.run_id, **{f"test_top1_{v}": m["top1"] for v, m in result["views"].items()}})
    return result


def _fit(loop: FinetuneLoop, run: Run, val: Sequence[VideoRecord], cfg: Config, lr: float, total: int,
         t0: float, on_step: Callable[[int], None] | None) -> None:
    """The epochs: SGD steps (stop requests honoured at each), then validation, weights and a checkpoint."""
    e, every = cfg.eval, max(1, cfg.log.every)
    while loop.epoch < e.epochs and loop.step < total:
        epoch_lr = multistep_lr(lr, loop.epoch, e.milestones)
        loop.set_lr(epoch_lr)
        for step in loop.train_batches():
            logged = step % every == 0 or step == total
            if logged:
                s = loop.stats
                elapsed = time.perf_counter() - t0
                run.report(step, {"step": step, "epoch": loop.epoch, "run_id": run.run_id, "lr": epoch_lr,
                                  "loss": s["loss_sum"] / max(1, s["seen"])},
                           rate=s["seen"] * loop.dist.world_size / max(elapsed, 1e-9), elapsed=elapsed)
            else:
                run.tick(step)
            if on_step is not None:
                on_step(step)
            if run.should_stop(logged):
                raise run.interrupted(step, run.checkpoint("step", loop))
            if step >= total:
                break
        if loop.batch_index < loop.steps_per_epoch:     # max_steps ended the run inside the epoch
            break
        _close_epoch(loop, run, val, cfg, epoch_lr)


def _close_epoch(loop: FinetuneLoop, run: Run, val: Sequence[VideoRecord], cfg: Config, lr: float) -> None:
    """Epoch end: its record (and a validation pass when due), best/last weights, a step checkpoint."""
    e = cfg.eval
    rec = loop.end_epoch(lr)
    if e.val_every > 0 and (loop.epoch % e.val_every == 0 or loop.epoch == e.epochs):
        probs, labels, _ = score(loop.core, val, cfg, loop.dist, clips=e.val_clips, crops=1)
        rec.update(val_top1=topk(probs, labels, 1), val_top5=topk(probs, labels, 5))
        log.info("fine-tune epoch %d: train top-1 %.3f, validation top-1 %.3f", loop.epoch, rec["train_top1"],
                 rec["val_top1"])
    loop.history.append(rec)
    run.metrics.log({**rec, "run_id": run.run_id})
    if loop.dist.is_main:
        out = Path(run.out)
        if "val_top1" in rec and rec["val_top1"] > loop.best["top1"]:
            loop.best = {"top1": rec["val_top1"], "epoch": loop.epoch}
            save_checkpoint(out / WEIGHTS_BEST, loop.core.state_dict())
        save_checkpoint(out / WEIGHTS_LAST, loop.core.state_dict())
    loop.best = all_gather_objects(loop.best)[0]      # every rank holds rank 0's record
    run.checkpoint("step", loop)
