"""`mscl-stream eval retrieval|linear|finetune`: evaluate a pretrain checkpoint on a labelled manifest.

Data: ``cfg.data.manifest`` with rows of split "train" (gallery / training set) and "test" (queries /
test set; "val" is used when there is no "test"). Rows with an unknown label (-1) are left out and
counted. Without a checkpoint the same evaluation runs on a seeded random-init R3D-18: the baseline
every number should be compared with.

Settings taken from the configuration:

* clip geometry: data.frames_per_clip, data.frame_stride, data.frame_size, augment.out_size;
  decode workers data.decode_workers (processes; data.pyav_workers); views per forward
  max(eval.batch_size, 8); device train.device; seed train.seed; clips per video eval.clips (evenly
  spread, features averaged).
* fine-tune: the eval section (epochs 22, lr 0.12 per 32 clips scaled by eval.batch_size, weight
  decay 1e-6, clip 40, lr x0.1 at eval.milestones 14 and 18: the SSv2 recipe), optim.momentum; the run
  itself (folder, resume, validation, weights, test views): :mod:`mscl_stream.eval.finetune_run`.

A manifest whose rows are all unlabelled (label -1: a pretraining manifest) is refused with one line.
Every result names its ``dataset`` (eval.dataset), ``split`` (the numbered split with ``--splits``, else
None) and ``views`` ("10x3": clips x crops; "16seg x1": segments x crops).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path


from mscl_stream.config import Config, to_dict
from mscl_stream.distributed import init_distributed
from mscl_stream.data.manifest import VideoRecord, read_manifest
from mscl_stream.errors import UserError
from mscl_stream.eval.features import ENCODER_PREFIX, build_r3d, extract_features
from mscl_stream.machine import machine_info, resolve_device
from mscl_stream.eval.finetune_run import finetune as run_finetune, views_label
from mscl_stream.eval.linear import linear_probe
from mscl_stream.eval.retrieval import KS, retrieval_recall, top1_confusion

__all__ = ["run_eval", "run_evals", "split_records", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("retrieval", "linear", "finetune")


def split_records(manifest: str) -> tuple[list[VideoRecord], list[VideoRecord], dict]:
    """(train rows, test rows, counts) of a labelled manifest; raises UserError if a split is missing."""
    if not manifest:
        raise UserError("data.manifest: evaluation needs a manifest with train and test splits "
                        "(pass data.manifest=PATH)")
    by_split = _by_split(manifest)
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


def _by_split(manifest: str) -> dict[str, list[VideoRecord]]:
    """The manifest's rows per split; UserError if every row is unlabelled (a pretraining manifest)."""
    rows = read_manifest(manifest)
    if rows and all(r.label < 0 for r in rows):
        raise UserError(f"{manifest}: every row is unlabelled (label -1, a pretraining manifest); evaluation needs "
                        f"labels: index the dataset with its layout (--format folders|ucf101|hmdb51|kinetics|ssv2)")
    by_split: dict[str, list[VideoRecord]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    return by_split


def val_records(manifest: str, test: list[VideoRecord]) -> list[VideoRecord]:
    """Fine-tune's validation videos: the labelled "val" rows when the manifest has both "val" and "test"
    splits, else ``test`` (UCF101 and HMDB51 have no validation split: see docs/evaluation.md)."""
    by_split = _by_split(manifest)
    val = [r for r in by_split.get("val", []) if r.label >= 0]
    return val if val and "test" in by_split else list(test)


def class_names(records: list[VideoRecord]) -> list[str]:
    """Name of each label 0 .. max label (a label with no name, or absent, is shown as its number)."""
    names: dict[int, str] = {}
    for r in records:
        names.setdefault(r.label, r.label_name or str(r.label))
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


def run_eval(kind: str, checkpoint: str | None = None, cfg: Config | None = None, out: str | None = None,
             prefix: str = ENCODER_PREFIX, clips: int | None = None, split: int | None = None) -> dict:
    """Run one evaluation and return its results (also written as JSON to ``out`` if given).

    Args:
        kind: "retrieval" (Recall@1/5/10/20/50, test queries vs train gallery), "linear" (top-1 of a
            linear probe on frozen features) or "finetune" (top-1 after end-to-end fine-tuning).
        checkpoint: pretrain checkpoint path; None evaluates a seeded random-init R3D-18.
        cfg: configuration (see the module docstring for the keys used).
        out: JSON file for the results.
        prefix: key prefix of the query RGB encoder in the checkpoint's model state.
        clips: clips per video, evenly spread (one: centred), whose features are averaged (default
            eval.clips); fine-tuning tests at eval.test_views.
        split: the numbered split this manifest is (recorded in the results), or None.

    Returns:
        The metrics as fractions at the top level ("R@1" .. "R@50", with "classes" (label names) and
        "top1_confusion" (rows: query class, columns: the nearest gallery video's class; counts); or
        "top1", "top5" of the first test view, with "by_views" holding every view count's), plus "kind",
        "dataset", "split", "views", "encoder" (a description) and "info" (a dict: video counts, skips,
        seconds, device). The JSON file adds the checkpoint, the config, the machine and the date;
        fine-tuning also writes one such file per view count into its run folder.
    """
    return run_evals((kind,), checkpoint, cfg, {kind: out} if out else None, prefix, clips, split)[kind]


def run_evals(kinds: tuple[str, ...] | list[str], checkpoint: str | None = None, cfg: Config | None = None,
              outs: dict[str, str] | None = None, prefix: str = ENCODER_PREFIX,
              clips: int | None = None, split: int | None = None) -> dict[str, dict]:
    """Several evaluations of one encoder: {kind: :func:`run_eval`'s result}. Retrieval and the linear
    probe share one feature extraction; ``outs`` maps a kind to its JSON file. They are not sharded: under
    torchrun rank 0 runs them and the other ranks get ``{"kind", "rank", "run_on_rank": 0}``."""
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
    kinds, results = tuple(kinds), {}
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank and kinds != ("finetune",):
        # retrieval and the linear probe are not sharded: under torchrun rank 0 extracts every feature and
        # writes the results; the other ranks take part only in a fine-tune
        frozen = [k for k in kinds if k != "finetune"]
        log.info("rank %d: %s runs on rank 0 only", rank, "+".join(frozen))
        results = {k: {"kind": k, "rank": rank, "run_on_rank": 0} for k in frozen}
        kinds = tuple(k for k in kinds if k == "finetune")
    # a fine-tune alone resolves its device in init_distributed (under torchrun: this rank's GPU)
    device = resolve_device(cfg.train.device) if kinds and kinds != ("finetune",) else None
    seed = cfg.train.seed
    if device is not None:
        log.info("eval %s: %d train / %d test videos, %s, device %s", "+".join(kinds), len(train), len(test),
                 checkpoint or "random init", device)
    feats, feat_seconds = None, 0.0
    for kind in kinds:
        t0 = time.perf_counter()
        counts = dict(counts0)
        if kind == "finetune":
            results[kind] = _finetune(checkpoint, train, test, cfg, prefix, counts, t0, outs, split)
            continue
        device = device or resolve_device(cfg.train.device)
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
        head = {"kind": kind, "dataset": cfg.eval.dataset, "split": split, "views": views_label(clips, 1),
                "encoder": desc}
        results[kind] = _report(head, metrics, counts, t0, clips, device, checkpoint, cfg, outs.get(kind))
    return results


def _finetune(checkpoint, train, test, cfg: Config, prefix: str, counts: dict, t0: float, outs: dict,
              split: int | None) -> dict:
    """End-to-end fine-tuning (under torchrun on every rank); results per view count written by rank 0."""
    dist = init_distributed(cfg.dist.backend, device=cfg.train.device)
    if dist.is_main:
        log.info("eval finetune: %d train / %d test videos, %s, device %s%s", len(train), len(test),
                 checkpoint or "random init", dist.device,
                 f" ({dist.world_size} ranks)" if dist.world_size > 1 else "")
    val = val_records(cfg.data.manifest, test)
    res = run_finetune(checkpoint, train, val, test, cfg, dist, prefix=prefix)
    counts.update(steps=res["steps"], epochs=res["epochs"], val=len(val), best_val=res["best"],
                  history=res["history"], run_dir=res["out_dir"])
    by_views = res["views"]
    first = next(iter(by_views))
    out_dir = Path(res["out_dir"])
    for label, metrics in by_views.items():
        info = {**counts, "skipped_undecodable": metrics["skipped_undecodable"]}
        head = {"kind": "finetune", "dataset": cfg.eval.dataset, "split": split, "views": label,
                "encoder": res["encoder"]}
        top = {"top1": metrics["top1"], "top5": metrics["top5"], "train_top1": res["train_top1"],
               "train_loss": res["train_loss"]}
        out = (outs.get("finetune") if label == first else None) if dist.is_main else None
        result = _report(head, top, info, t0, None, dist.device, checkpoint, cfg, out, show=dist.is_main)
        if dist.is_main:
            write_json(str(out_dir / f"results_{label.replace(' ', '')}.json"), _full(result, checkpoint, cfg,
                                                                                      dist.device))
        if label == first:
            main = result
    return {**main, "by_views": {k: {"top1": v["top1"], "top5": v["top5"]} for k, v in by_views.items()}}


def _report(head: dict, metrics: dict, counts: dict, t0: float, clips: int | None, device, checkpoint,
            cfg: Config, out: str | None, show: bool = True) -> dict:
    """One evaluation's result: printed as one line, written to the JSON file ``out`` when given."""
    counts.update(seconds=round(time.perf_counter() - t0, 2), device=str(device))
    if clips is not None:
        counts["clips"] = clips
    result = {**head, **metrics, "info": counts}
    shown = ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()
                      if isinstance(v, float) and (k.startswith("R@") or k.endswith(("top1", "top5"))))
    if show:
        views = f" {head['views']}" if head["kind"] == "finetune" else ""     # one line per view count
        print(f"eval {head['kind']}{views} [{head['encoder']}]: {shown} ({counts['test']} test / "
              f"{counts['train']} train videos, {counts['seconds']:.1f} s)", flush=True)
    if out:
        write_json(out, _full(result, checkpoint, cfg, device))
    return result


def _full(result: dict, checkpoint, cfg: Config, device) -> dict:
    """A result as its JSON file holds it: with the checkpoint, the config, the machine and the date."""
    return {**result, "checkpoint": checkpoint, "config": to_dict(cfg), "machine": machine_info(device),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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


def write_json(path: str, obj: dict) -> None:
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
