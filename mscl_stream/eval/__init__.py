"""`mscl-stream eval retrieval|linear|finetune`: evaluate a pretrain checkpoint on a labelled manifest.

Data: ``cfg.data.manifest`` with rows of split "train" (gallery / training set) and "test" (queries /
test set; "val" is used when there is no "test"). Rows with an unknown label (-1) are left out and
counted. Without a checkpoint the same evaluation runs on a seeded random-init R3D-18: the baseline
every number should be compared with.

Settings taken from the configuration:

* clip geometry: data.frames_per_clip, data.frame_stride, data.frame_size, augment.out_size;
  decode threads data.decode_workers; batch data.batch_size; device train.device; seed train.seed;
  clips per video eval.clips.
* fine-tune: the eval section (epochs 22, lr 0.12 per 32 clips scaled by eval.batch_size, weight
  decay 1e-6, clip 40, lr x0.1 at eval.milestones 14 and 18: the SSv2 recipe), optim.momentum.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path


from mscl_stream.config import Config, to_dict
from mscl_stream.data.manifest import VideoRecord, read_manifest
from mscl_stream.errors import UserError
from mscl_stream.eval.features import ENCODER_PREFIX, build_r3d, extract_features
from mscl_stream.machine import machine_info, resolve_device
from mscl_stream.eval.finetune import finetune
from mscl_stream.eval.linear import linear_probe
from mscl_stream.eval.retrieval import KS, retrieval_recall, top1_confusion
from mscl_stream.train.schedule import scaled_lr

__all__ = ["run_eval", "run_evals", "split_records", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("retrieval", "linear", "finetune")


def split_records(manifest: str) -> tuple[list[VideoRecord], list[VideoRecord], dict]:
    """(train rows, test rows, counts) of a labelled manifest; raises UserError if a split is missing."""
    if not manifest:
        raise UserError("data.manifest: evaluation needs a manifest with train and test splits "
                        "(pass data.manifest=PATH)")
    rows = read_manifest(manifest)
    by_split: dict[str, list[VideoRecord]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    test_name = "test" if "test" in by_split else "val" if "val" in by_split else None
    if "train" not in by_split or test_name is None:
        raise UserError(f"{manifest}: evaluation needs 'train' and 'test' splits, found "
                        f"{sorted(by_split) or 'none'}")
    train = [r for r in by_split["train"] if r.label >= 0]
    test = [r for r in by_split[test_name] if r.label >= 0]
    unlabelled = len(by_split["train"]) + len(by_split[test_name]) - len(train) - len(test)
    if unlabelled:
        log.warning("eval: %d rows without a label (-1) left out", unlabelled)
    if not train or not test:
        raise UserError(f"{manifest}: no labelled rows in split {'train' if not train else test_name!r}")
    return train, test, {"train": len(train), "test": len(test), "test_split": test_name,
                         "unlabelled_left_out": unlabelled}


def class_names(records: list[VideoRecord]) -> list[str]:
    """Name of each label 0 .. max label (a label with no name, or absent, is shown as its number)."""
    names: dict[int, str] = {}
    for r in records:
        names.setdefault(r.label, r.label_name or str(r.label))
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


def run_eval(kind: str, checkpoint: str | None = None, cfg: Config | None = None, out: str | None = None,
             prefix: str = ENCODER_PREFIX, clips: int | None = None) -> dict:
    """Run one evaluation and return its results (also written as JSON to ``out`` if given).

    Args:
        kind: "retrieval" (Recall@1/5/10/20/50, test queries vs train gallery), "linear" (top-1 of a
            linear probe on frozen features) or "finetune" (top-1 after end-to-end fine-tuning).
        checkpoint: pretrain checkpoint path; None evaluates a seeded random-init R3D-18.
        cfg: configuration (see the module docstring for the keys used).
        out: JSON file for the results.
        prefix: key prefix of the query RGB encoder in the checkpoint's model state.
        clips: centred clips per video whose features (logits) are averaged (default eval.clips).

    Returns:
        The metrics as fractions at the top level ("R@1" .. "R@50", with "classes" (label names) and
        "top1_confusion" (rows: query class, columns: the nearest gallery video's class; counts); or
        "top1", "train_top1", "train_loss"), plus "kind", "encoder" (a description) and "info" (a dict:
        video counts, skips, seconds, device). The JSON file adds the checkpoint, the config, the
        machine and the date.
    """
    return run_evals((kind,), checkpoint, cfg, {kind: out} if out else None, prefix, clips)[kind]


def run_evals(kinds: tuple[str, ...] | list[str], checkpoint: str | None = None, cfg: Config | None = None,
              outs: dict[str, str] | None = None, prefix: str = ENCODER_PREFIX,
              clips: int | None = None) -> dict[str, dict]:
    """Several evaluations of one encoder: {kind: :func:`run_eval`'s result}. Retrieval and the linear
    probe share one feature extraction; ``outs`` maps a kind to its JSON file."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"eval: unknown kind {unknown[0] if unknown else 'none'!r} (use {', '.join(KINDS)})")
    cfg = cfg or Config()
    clips = clips or cfg.eval.clips
    outs = outs or {}
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint}: no such file")
    for out in outs.values():
        check_writable(out)        # before the features are paid for
    train, test, counts0 = split_records(cfg.data.manifest)
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed
    log.info("eval %s: %d train / %d test videos, %s, device %s", "+".join(kinds), len(train), len(test),
             checkpoint or "random init", device)
    feats, feat_seconds, results = None, 0.0, {}
    for kind in kinds:
        t0 = time.perf_counter()
        counts = dict(counts0)
        if kind == "finetune":
            desc, metrics = _finetune(checkpoint, train, test, cfg, device, prefix, clips, counts)
            results[kind] = _report(kind, desc, metrics, counts, t0, clips, device, checkpoint, cfg, outs)
            continue
        if feats is None:        # frozen features: extracted once for retrieval and the probe
            encoder, desc = build_r3d(checkpoint, prefix, seed=seed, width=cfg.model.rgb_width)
            gal_f, gal_l = extract_features(encoder, train, cfg, device, clips=clips)
            qry_f, qry_l = extract_features(encoder, test, cfg, device, clips=clips)
            feats, feat_seconds = (desc, gal_f, gal_l, qry_f, qry_l), time.perf_counter() - t0
        else:
            t0 -= feat_seconds   # each result counts the shared extraction in its seconds
        desc, gal_f, gal_l, qry_f, qry_l = feats
        counts["skipped_undecodable"] = len(train) + len(test) - len(gal_l) - len(qry_l)
        if kind == "retrieval":
            metrics = retrieval_recall(qry_f, qry_l, gal_f, gal_l, ks=KS)
            names = class_names(train + test)
            conf = top1_confusion(qry_f, qry_l, gal_f, gal_l, num_classes=len(names))
            metrics.update(classes=names, top1_confusion=conf.tolist())
        else:
            metrics = linear_probe(gal_f, gal_l, qry_f, qry_l)
        results[kind] = _report(kind, desc, metrics, counts, t0, clips, device, checkpoint, cfg, outs)
    return results


def _finetune(checkpoint, train, test, cfg: Config, device, prefix: str, clips: int, counts: dict):
    """(encoder description, metrics) of end-to-end fine-tuning; its steps and epochs go into ``counts``."""
    e = cfg.eval
    res = finetune(checkpoint, train, test, cfg, device, epochs=e.epochs,
                   lr=scaled_lr(e.lr, e.batch_size, e.base_batch), batch_size=e.batch_size,
                   momentum=cfg.optim.momentum, weight_decay=e.weight_decay, clip_grad=e.clip_grad,
                   milestones=e.milestones, max_steps=e.max_steps, prefix=prefix, seed=cfg.train.seed,
                   test_clips=clips)
    counts.update(steps=res.pop("steps"), epochs=res.pop("epochs"))
    return res.pop("encoder"), res


def _report(kind: str, desc: str, metrics: dict, counts: dict, t0: float, clips: int, device, checkpoint,
            cfg: Config, outs: dict) -> dict:
    """One evaluation's result: printed as one line, written to its JSON file when ``outs`` names one."""
    counts.update(seconds=round(time.perf_counter() - t0, 2), clips=clips, device=str(device))
    result = {"kind": kind, "encoder": desc, **metrics, "info": counts}
    shown = ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()
                      if isinstance(v, float) and (k.startswith("R@") or k.endswith("top1")))
    print(f"eval {kind} [{desc}]: {shown} ({counts['test']} test / {counts['train']} train videos, "
          f"{counts['seconds']:.1f} s)", flush=True)
    if kind in outs:
        _write_json(outs[kind], {**result, "checkpoint": checkpoint, "config": to_dict(cfg),
                                 "machine": machine_info(device), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return result


def check_writable(path: str) -> None:
    """One-line UserError unless a results file can be written at ``path`` (checked by writing a probe)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name such as {p / 'results.json'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = p.with_name(f".{p.name}.write-test-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def _write_json(path: str, obj: dict) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, p)
    except OSError as e:
        raise UserError(f"--out {path}: cannot write the results ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
