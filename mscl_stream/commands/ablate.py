"""`mscl-stream ablate`: what each part of MSCL and each flow estimator buy, over variants and seeds.

A study is a base config (the demo's by default), a set of named variants (each a list of plain config
overrides, from configs/ablations.yaml or the command line) and a list of seeds. Every (variant, seed)
pair is one run: pretrain, then motion-label retrieval and a linear probe on the test split. A
``random_init`` row per seed evaluates the untrained encoder as the floor. Everything lands in one
study folder:

    STUDY/runs/<variant>/seed<k>/pretrain/   the run (config, metrics, checkpoints)
    STUDY/runs/<variant>/seed<k>/row.json    its result row, written last (atomically)
    STUDY/ablation.json                      all rows: a list of {variant, seed, overrides, R@1, ...}
    STUDY/ablation.md / .png                 mean +- standard error per variant; bars with every seed
    STUDY/ablation_confusion.png             per variant: which class each query's nearest video has

Rows already written are skipped, and an interrupted pretrain resumes from its newest checkpoint, so a
study can span several sittings: rerun the same command. ``--rescore`` evaluates the finished runs
again from their checkpoints (after the evaluation changed) without pretraining them again. Data: the
demo's labelled videos in ``STUDY/videos`` (made once, with the base config's seed, so every run sees
the same split), or any labelled manifest given with ``--manifest``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mscl_stream.commands.ablate_summary import (HEADLINE, RANDOM_INIT, confusion_by_variant,  # noqa: F401
                                                 group_confusion_table, markdown_table, plot, plot_confusion,
                                                 summarize)
from mscl_stream.config import load_config
from mscl_stream.errors import UserError

log = logging.getLogger(__name__)
VARIANTS_FILE = Path(__file__).resolve().parents[2] / "configs" / "ablations.yaml"


@dataclass(frozen=True)
class Variant:
    """One arm of the study: a name, what it tests, and the config overrides that make it."""

    name: str
    about: str
    overrides: tuple[str, ...]


def load_variants(path: Path | str = VARIANTS_FILE) -> dict[str, Variant]:
    """Variants from a YAML file: ``name: {about: str, overrides: [key=value, ...]}``."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        msg = " ".join(str(e).split())   # YAML errors span lines; the CLI prints one
        raise UserError(f"--variants-file {path}: cannot read it ({e.__class__.__name__}: {msg})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--variants-file {path}: expected a mapping of variant names")
    out = {}
    for name, spec in raw.items():
        ov = spec.get("overrides") if isinstance(spec, dict) else None
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            raise UserError(f"--variants-file {path}: variant {name!r} needs 'overrides: [key=value, ...]'")
        out[str(name)] = Variant(str(name), str(spec.get("about", "")), tuple(ov))
    return out


def parse_variant_arg(text: str) -> Variant:
    """``NAME=key=value,key=value`` (an empty list after ``NAME=`` is the base config) -> Variant."""
    name, sep, rest = text.partition("=")
    if not sep or not name or name == RANDOM_INIT:
        raise UserError(f"--variant {text!r}: expected NAME=key=value[,key=value...] (NAME not {RANDOM_INIT!r})")
    ov = tuple(o for o in rest.split(",") if o)
    if any("=" not in o for o in ov):
        raise UserError(f"--variant {text!r}: every override must be key=value")
    return Variant(name, "from the command line", ov)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _run_one(variant: Variant, seed: int, base_config: str, manifest: Path, run_dir: Path,
             extra: list[str]) -> dict:
    """Pretrain (resuming an interrupted run) and evaluate one (variant, seed); returns its row."""
    from mscl_stream.train.trainer import pretrain

    pre_dir = run_dir / "pretrain"
    ckpts = pre_dir / "checkpoints"
    started = ckpts.is_dir() and any(ckpts.glob("*.pt"))
    t0 = time.perf_counter()
    train: dict = {}
    if variant.name != RANDOM_INIT:
        # an interrupted run resumes from its newest checkpoint; a run dir without one starts over
        how = "train.resume=auto" if started else "train.overwrite=true"
        train = pretrain(_run_config(variant, seed, base_config, manifest, run_dir, [*extra, how]))
    row = {"variant": variant.name, "seed": seed, "overrides": list(variant.overrides)}
    if train:
        row["final_loss"] = train.get("loss/loss")
    row.update(_evaluate(variant, seed, base_config, manifest, run_dir, extra))
    return {**row, "about": variant.about, "steps": train.get("steps"),
            "seconds": round(time.perf_counter() - t0, 1)}


def _run_config(variant: Variant, seed: int, base_config: str, manifest: Path, run_dir: Path, extra: list[str]):
    common = [f"data.manifest={manifest}", f"train.seed={seed}", *extra]
    if variant.name == RANDOM_INIT:
        return load_config(base_config, common)
    return load_config(base_config, [*common, *variant.overrides, f"train.out_dir={run_dir / 'pretrain'}"])


def _evaluate(variant: Variant, seed: int, base_config: str, manifest: Path, run_dir: Path,
              extra: list[str]) -> dict:
    """Retrieval (Recall@k and the top-1 confusion) and the linear probe of one run's final checkpoint
    (the untrained encoder for ``random_init``)."""
    from mscl_stream.eval import run_evals

    cfg = _run_config(variant, seed, base_config, manifest, run_dir, extra)
    checkpoint = None if variant.name == RANDOM_INIT else str(run_dir / "pretrain" / "checkpoints" / "last.pt")
    res = run_evals(("retrieval", "linear"), checkpoint=checkpoint, cfg=cfg)
    ret, lin = res["retrieval"], res["linear"]
    metrics = {k: v for k, v in ret.items() if k.startswith("R@")}
    metrics.update({f"linear_{k}": v for k, v in lin.items() if isinstance(v, float)})
    return {**metrics, "classes": ret["classes"], "top1_confusion": ret["top1_confusion"],
            "test_queries": ret["info"]["test"]}


def run_ablation(out: Path | str, variants: list[Variant], seeds: list[int], config: str | None = None,
                 manifest: str | None = None, videos: int | None = None, extra: list[str] | None = None,
                 random_init: bool = True, report_only: bool = False, rescore: bool = False,
                 task: str = "motion") -> list[dict]:
    """Run (or continue) a study into ``out``; returns every row (done now or earlier).

    Args:
        out: the study folder.
        variants: the arms, in the order of the table.
        seeds: ``train.seed`` of each run (the data stay the same).
        config: base config (default: the demo's).
        manifest: a labelled manifest with train/test splits (default: the demo's videos in out/videos).
        videos: number of demo videos when they are made here (None: the task's, as the demo).
        task: the demo's sample task (:data:`mscl_stream.demo.DEMO_TASKS`): its videos when no manifest is
            given, and its config overrides (step budget) under ``extra`` in every run.
        extra: overrides applied to every run (e.g. ``train.max_steps=200`` for a pilot).
        random_init: add the untrained-encoder row per seed.
        report_only: run nothing; summarise the rows already done (a study between sittings).
        rescore: evaluate the finished runs again from their final checkpoints and update their rows
            (after the evaluation changed or gained a metric); pretraining is not repeated.
    """
    from mscl_stream.demo import DEMO_CONFIG, demo_task, prepare_demo_data
    from mscl_stream.machine import machine_info, resolve_device

    out = Path(out)
    config = str(config or DEMO_CONFIG)
    setting = demo_task(task)
    extra = [*setting.overrides, *(extra or [])]
    videos = setting.videos if videos is None else videos
    base = _check_plan(variants, seeds, config, extra, manifest)
    out.mkdir(parents=True, exist_ok=True)
    if manifest:
        mpath = Path(manifest)
    else:   # a report reads finished rows only: no data needed
        mpath = None if report_only else prepare_demo_data(out, base, videos, task)
    arms = ([Variant(RANDOM_INIT, "untrained encoder (the floor)", ())] if random_init else []) + list(variants)
    plan = [(v, s) for v in arms for s in seeds]
    rows, t_start, done_now = [], time.perf_counter(), 0
    for i, (v, seed) in enumerate(plan, 1):
        run_dir = out / "runs" / v.name / f"seed{seed}"
        row_path = run_dir / "row.json"
        if row_path.is_file():
            row = json.loads(row_path.read_text())
            if row.get("overrides") != list(v.overrides):
                raise UserError(f"ablate: {row_path} was run with overrides {row.get('overrides')}, variant "
                                f"{v.name!r} now has {list(v.overrides)}; rename the variant or delete that folder")
            if rescore and not report_only:
                before = row.get("R@1")
                row.update(_evaluate(v, seed, config, mpath, run_dir, extra), rescored=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                _write_json(row_path, row)
                print(f"[{i}/{len(plan)}] {v.name} seed {seed}: evaluated again (R@1 {before} -> {row['R@1']})",
                      flush=True)
            else:
                print(f"[{i}/{len(plan)}] {v.name} seed {seed}: done earlier, skipped", flush=True)
            rows.append(row)
            continue
        if report_only:
            print(f"[{i}/{len(plan)}] {v.name} seed {seed}: not run yet", flush=True)
            continue
        left = len(plan) - i + 1
        eta = ((time.perf_counter() - t_start) / done_now * left) if done_now else None
        print(f"[{i}/{len(plan)}] {v.name} seed {seed}: running"
              + (f" (about {eta / 60:.0f} min left)" if eta else ""), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        row = _run_one(v, seed, config, mpath, run_dir, extra)
        row.update(config=config, manifest=str(mpath), extra_overrides=extra,
                   date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine_info(resolve_device(base.train.device)))
        _write_json(row_path, row)
        rows.append(row)
        done_now += 1
        _write_summary(out, _with_other_rows(out, rows))   # a study cut short still has its table
    rows = _with_other_rows(out, rows)
    if not rows:
        raise UserError(f"ablate: no finished runs in {out} yet")
    md = _write_summary(out, rows)
    print("\n" + md + f"\nstudy folder: {out} (ablation.json, ablation.md, ablation.png)", flush=True)
    return rows


def _check_plan(variants: list[Variant], seeds: list[int], config: str, extra: list[str],
                manifest: str | None):
    """Fail before any work on repeated names, no seeds, or a config or override that does not load;
    returns the base config."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"ablate: variant names repeat: {names}")
    if not seeds:
        raise UserError("ablate: --seeds needs at least one seed")
    base = load_config(config, extra, check=False)
    for v in variants:                                    # every variant's overrides parse and validate
        load_config(config, [*extra, *v.overrides, "data.manifest=" + (manifest or "unused")], check=False)
    return base


def _with_other_rows(out: Path, rows: list[dict]) -> list[dict]:
    """``rows`` followed by the finished rows of the study folder that this invocation did not plan
    (variants run in another sitting), so that the summary never drops a finished run."""
    have = {(r["variant"], r["seed"]) for r in rows}
    others = []
    for path in sorted((out / "runs").glob("*/seed*/row.json")):
        row = json.loads(path.read_text())
        if (row.get("variant"), row.get("seed")) not in have:
            others.append(row)
    return rows + sorted(others, key=lambda r: (r["variant"], r["seed"]))


def _write_summary(out: Path, rows: list[dict]) -> str:
    """Rewrite ablation.json (the rows), ablation.md and ablation.png from the rows done so far."""
    table = summarize(rows)
    _write_json(out / "ablation.json", rows)
    md = markdown_table(table)
    groups = group_confusion_table(confusion_by_variant(rows))
    if groups:
        md += "\nTop-1 confusions between groups of classes, summed over seeds:\n\n" + groups
    tmp = out / f".ablation.md.tmp-{os.getpid()}"
    tmp.write_text(md)
    os.replace(tmp, out / "ablation.md")
    plot(table, out / "ablation.png")
    if any("top1_confusion" in r for r in rows):
        plot_confusion(rows, out / "ablation_confusion.png")
    return md
