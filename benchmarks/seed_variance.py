"""Seed variance of an ablation study's finished runs, from the evaluation side (no retraining).

Every finished seed of one variant of a `mscl-stream ablate` study (default: full MSCL) is evaluated again
from its checkpoints, with the study's data and config (ablate's ``_run_config``), under each option:

  encoder  query: the query RGB encoder (prefix ``rgb_encoder.``: what the study's rows report);
           key: the momentum encoder (``rgb_encoder_k.``: an EMA of the query encoder over the steps)
  clips    c1: one centred clip per video (the rows); c4: features averaged over 4 evenly spaced clips
  ckpts    last: last.pt (the rows); lastK: the mean of the evaluations of last.pt and the K-1 newest
           step files before it

Per option: every seed's R@1 and linear-probe top-1, their mean, between-seed SD (n - 1) and SE
(SD / sqrt(n)), and the query SE: what having only N test queries costs. For R@1 a bootstrap over the
queries (resampled with replacement, --boot times) of each run's top-1 hits, read off its top-1 confusion
matrix; for the probe the ideal bootstrap's closed form sqrt(p (1 - p) / N); both averaged over seeds.
A mean over checkpoints gets the mean of its members' query SEs, an upper bound (the SD of a mean is at
most the mean of the SDs). Every seed sees the same queries, so the query SE says how far a run's number
sits from what the same encoder would score on other videos; an SD far above it means the runs differ.

Each evaluation (run, encoder, clips, checkpoint file) is cached in the run folder as
variance_<encoder>_c<clips>_<checkpoint>.json, keyed by the checkpoint's size and mtime: a rerun
evaluates only what is new. ``--determinism STEPS`` also trains the study's config twice with one seed
for STEPS steps in a temporary folder and compares loss traces (metrics.jsonl) and final weights.

    python benchmarks/seed_variance.py --study benchmarks/results/ablation_motion_cpu [--determinism 60] [--rows-only]

Also the learning curve of every seed: the query encoder (one clip) at each checkpoint, in the JSON's
"curve" and in <name>_curve.png. Is a run still improving when its steps end, or flat from the start?
And every loss term's mean over each run's last 500 steps against its chance value ("loss_tail"): which
encoder a flat run lost; over every run of the study with the RGB-flow cross terms, how far those end
below chance against the run's R@1 ("cross_margin").

Writes benchmarks/results/seed_variance_<task>[_<variant>]_cpu_<date>.json (+ .png, _curve.png; the variant
is named unless it is full) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_tail import cross_margin, loss_tail, loss_tail_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ENCODERS = {"query": "rgb_encoder.", "key": "rgb_encoder_k."}
CLIPS = (1, 4)
MAX_CKPTS = 3
TODAY = "query_c1_last"       # what the study's rows report


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)



def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically (temp file + rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def hits_from_confusion(confusion) -> np.ndarray:
    """Per-query top-1 hits (1 = the nearest gallery video has the query's class) of a confusion matrix."""
    c = np.asarray(confusion, dtype=np.int64)
    hit = int(np.trace(c))
    return np.concatenate([np.ones(hit), np.zeros(int(c.sum()) - hit)])


def bootstrap_se(hits, n_boot: int = 1000, seed: int = 0) -> float:
    """SD of the mean hit rate over ``n_boot`` resamples of the queries with replacement (seeded)."""
    hits = np.asarray(hits, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(hits), size=(n_boot, len(hits)))
    return float(hits[idx].mean(axis=1).std(ddof=1))


def binomial_se(p: float, n: int) -> float:
    """The ideal bootstrap's SE of an accuracy p over n test videos."""
    return math.sqrt(p * (1 - p) / n)


def spread(values: list[float]) -> dict:
    """mean, sample SD (n - 1), SE of the mean and the SD's 90 % interval (chi-square, normal values: a
    few seeds pin an SD down only to a factor of 2-3); SD, SE and interval are None for one value."""
    from scipy.stats import chi2

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    ci = [sd * math.sqrt((n - 1) / chi2.ppf(q, n - 1)) for q in (0.95, 0.05)] if sd is not None else None
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n) if sd is not None else None, "sd_ci90": ci}


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per option: every seed's R@1 and probe top-1 with their spread, the mean query SEs and SD / query SE."""
    names = list(dict.fromkeys(o for opts in per_seed.values() for o in opts))
    out = {}
    for name in names:
        seeds = sorted(s for s in per_seed if name in per_seed[s])
        entry = {"seeds": seeds}
        for metric, se_key in (("R@1", "query_se"), ("linear_top1", "linear_query_se")):
            vals = [per_seed[s][name][metric] for s in seeds]
            st = spread(vals)
            qse = sum(per_seed[s][name][se_key] for s in seeds) / len(seeds)
            entry[metric] = {"per_seed": vals, **st, "query_se": qse,
                             "sd_over_query_se": st["sd"] / qse if st["sd"] is not None and qse > 0 else None}
        out[name] = entry
    return out



def find_runs(study: Path, variant: str, seeds: list[int] | None) -> tuple[dict[int, tuple[Path, dict]], list[int]]:
    """({seed: (run folder, row)} of the finished runs of ``variant``, the expected seeds not finished).
    Expected: ``seeds``, else every seed with a run folder of any variant of the study."""
    if seeds is None:
        seeds = sorted({int(p.name[4:]) for p in study.glob("runs/*/seed*") if p.name[4:].isdigit()})
    done = {}
    for s in seeds:
        row_path = study / "runs" / variant / f"seed{s}" / "row.json"
        if row_path.is_file():
            done[s] = (row_path.parent, json.loads(row_path.read_text()))
    if not done:
        raise SystemExit(f"seed_variance: no finished run of {variant!r} in {study} (runs/{variant}/seed*/row.json)")
    return done, [s for s in seeds if s not in done]


def checkpoints(run_dir: Path, row: dict, k: int = MAX_CKPTS) -> list[Path]:
    """last.pt, then the newest k - 1 step files before the last step (a step file of that step is its twin)."""
    from mscl_stream.train.checkpoint import list_checkpoints

    last = run_dir / "pretrain" / "checkpoints" / "last.pt"
    if not last.is_file():
        raise SystemExit(f"seed_variance: {last}: missing, though the run has a row")
    steps = row.get("steps")
    older = [p for s, p in reversed(list_checkpoints(run_dir / "pretrain")) if steps is None or s < steps]
    return [last, *older[: k - 1]]


def study_config(row: dict, run_dir: Path, extra: list[str]):
    """The config the study ran and evaluated this row with (ablate's ``_run_config``), plus ``extra``."""
    from mscl_stream.commands.ablate import Variant, _run_config

    manifest = Path(row["manifest"])
    if not manifest.is_absolute() and not manifest.exists():
        manifest = ROOT / manifest
    variant = Variant(row["variant"], "", tuple(row.get("overrides", ())))
    return _run_config(variant, row["seed"], row["config"], manifest, run_dir,
                       [*row.get("extra_overrides", []), *extra])


def evaluate(row: dict, run_dir: Path, checkpoint: Path, prefix: str, clips: int) -> dict:
    """Retrieval and the linear probe of one checkpoint's encoder under ``prefix`` with ``clips`` clips."""
    from mscl_stream.eval import run_evals

    cfg = study_config(row, run_dir, ["data.decode_workers=1"])      # one decode worker: a shared machine
    t0 = time.perf_counter()
    res = run_evals(("retrieval", "linear"), checkpoint=str(checkpoint), cfg=cfg, prefix=prefix, clips=clips)
    ret, lin = res["retrieval"], res["linear"]
    return {"R@1": ret["R@1"], "R@5": ret["R@5"], "linear_top1": lin["top1"], "classes": ret["classes"],
            "top1_confusion": ret["top1_confusion"], "test_queries": ret["info"]["test"],
            "seconds": round(time.perf_counter() - t0, 1)}


def cached_eval(run_dir: Path, row: dict, encoder: str, clips: int, ckpt: Path, evaluate_fn=evaluate) -> dict:
    """``evaluate_fn``'s result for (run, encoder, clips, checkpoint), from its cache file when the
    checkpoint file is unchanged; else evaluated and written (atomically)."""
    st = ckpt.stat()
    key = {"encoder": encoder, "prefix": ENCODERS[encoder], "clips": clips, "checkpoint": ckpt.name,
           "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    path = run_dir / f"variance_{encoder}_c{clips}_{ckpt.stem}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    res = {"key": key, **evaluate_fn(row, run_dir, ckpt, ENCODERS[encoder], clips),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, res)
    return res


def run_options(run_dir: Path, row: dict, n_boot: int, evaluate_fn=evaluate) -> dict[str, dict]:
    """{option: R@1, probe top-1, their query SEs, the checkpoints} of one run, every option it has
    (lastK only with K checkpoints)."""
    ckpts = checkpoints(run_dir, row)
    out = {}
    for enc in ENCODERS:
        for clips in CLIPS:
            evals = [cached_eval(run_dir, row, enc, clips, p, evaluate_fn) for p in ckpts]
            for k in range(1, len(evals) + 1):
                m = evals[:k]
                out[f"{enc}_c{clips}_{'last' if k == 1 else f'last{k}'}"] = {
                    "R@1": float(np.mean([e["R@1"] for e in m])),
                    "linear_top1": float(np.mean([e["linear_top1"] for e in m])),
                    "query_se": float(np.mean([bootstrap_se(hits_from_confusion(e["top1_confusion"]), n_boot)
                                               for e in m])),
                    "linear_query_se": float(np.mean([binomial_se(e["linear_top1"], e["test_queries"]) for e in m])),
                    "checkpoints": [e["key"]["checkpoint"] for e in m]}
    return out



def row_option(row: dict, n_boot: int) -> dict[str, dict]:
    """The rows' own option (query encoder, one clip, last checkpoint) read off the study's row, with its
    query SEs: ``--rows-only``, for runs whose checkpoints are not worth evaluating again."""
    return {TODAY: {"R@1": row["R@1"], "linear_top1": row["linear_top1"],
                    "query_se": bootstrap_se(hits_from_confusion(row["top1_confusion"]), n_boot),
                    "linear_query_se": binomial_se(row["linear_top1"], row["test_queries"]),
                    "checkpoints": ["the row"]}}


def curve(run_dir: Path, row: dict, evaluate_fn=evaluate) -> list[dict]:
    """R@1 and probe top-1 of the query encoder (one clip) at every step file and at last.pt, oldest first:
    is a run still improving when its step budget ends, or flat from the start?"""
    from mscl_stream.train.checkpoint import list_checkpoints

    steps = row.get("steps")
    points = [(s, p) for s, p in list_checkpoints(run_dir / "pretrain") if steps is None or s < steps]
    points.append((steps, run_dir / "pretrain" / "checkpoints" / "last.pt"))
    out = []
    for step, ckpt in points:
        e = cached_eval(run_dir, row, "query", 1, ckpt, evaluate_fn)
        out.append({"step": step, "checkpoint": ckpt.name, "R@1": e["R@1"], "linear_top1": e["linear_top1"]})
    return out


def determinism(row: dict, steps: int, work: Path) -> dict:
    """Train the row's config twice with its seed for ``steps`` steps; are loss traces and weights identical?"""
    import torch

    from mscl_stream.train.checkpoint import load_checkpoint
    from mscl_stream.train.trainer import pretrain

    traces, states = [], []
    for i in range(2):
        run_dir = work / f"run{i}"
        cfg = study_config(row, run_dir, [f"train.max_steps={steps}", "train.ckpt_every=0", "log.every=1",
                                          "log.tensorboard=false", "train.overwrite=true"])
        pretrain(cfg)
        recs = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        traces.append([{k: v for k, v in r.items() if k == "step" or k == "grad_norm" or k.startswith("loss/")}
                       for r in recs if "loss/loss" in r])
        states.append(load_checkpoint(run_dir / "pretrain" / "checkpoints" / "last.pt")["model"])
    a, b = traces
    loss_diff = max((abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k != "step"), default=None)
    w_diff = max(float((states[0][k].double() - states[1][k].double()).abs().max())
                 for k in states[0] if torch.is_tensor(states[0][k]) and states[0][k].is_floating_point())
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": steps, "seed": row["seed"],
            "variant": row["variant"], "logged_steps": [len(a), len(b)], "loss_traces_identical": a == b,
            "loss_max_abs_diff": loss_diff,
            "weights_identical": w_diff == 0.0, "weights_max_abs_diff": w_diff}



def markdown(options: dict[str, dict]) -> str:
    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"
    lines = ["| option | seeds | R@1 per seed | R@1 mean | SD (90 % interval) | SE | query SE | SD / query SE "
             "| probe per seed | probe mean | SD | query SE | SD / query SE |", "|" + " --- |" * 13]
    for name, o in options.items():
        r, p = o["R@1"], o["linear_top1"]
        ci = " (%.3f-%.3f)" % tuple(r["sd_ci90"]) if r["sd_ci90"] else ""
        lines.append(f"| {name} | {len(o['seeds'])} | {', '.join(f(v) for v in r['per_seed'])} | {f(r['mean'])} "
                     f"| {f(r['sd'])}{ci} | {f(r['se'])} | {f(r['query_se'])} | {f(r['sd_over_query_se'], 2)} "
                     f"| {', '.join(f(v) for v in p['per_seed'])} | {f(p['mean'])} | {f(p['sd'])} "
                     f"| {f(p['query_se'])} | {f(p['sd_over_query_se'], 2)} |")
    return "\n".join(lines) + "\n"


def curve_markdown(curves: dict[int, list[dict]]) -> str:
    """R@1 / probe per seed (rows) and checkpoint step (columns)."""
    steps = sorted({c["step"] for cs in curves.values() for c in cs if c["step"] is not None})
    lines = ["| seed | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + " --- |" * (len(steps) + 1)]
    for seed, cs in sorted(curves.items()):
        at = {c["step"]: c for c in cs}
        lines.append(f"| {seed} | " + " | ".join(f"{at[s]['R@1']:.3f} / {at[s]['linear_top1']:.3f}" if s in at else "-"
                                                 for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(result: dict, path: Path) -> None:
    """R@1 and probe against the checkpoint's step, one line per seed, chance dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric, label in zip(axes, ("R@1", "linear_top1"), ("R@1", "linear probe top-1")):
        for seed, cs in sorted(result["curve"].items(), key=lambda kv: int(kv[0])):
            ax.plot([c["step"] for c in cs], [c[metric] for c in cs], "o-", color=f"C{int(seed) % 10}",
                    label=f"seed {seed}")
        ax.axhline(result["chance"], color="0.6", ls="--", lw=1, label="chance")
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['variant']} on the {result['task']} task: the query encoder at each checkpoint "
                 f"({result['machine'].get('cpu', 'cpu')})", fontsize=9)
    save_figure(fig, path)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["options"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(names)), 7), sharex=True)
    for ax, metric, label in zip(axes, ("R@1", "linear_top1"), ("R@1", "linear probe top-1")):
        for i, name in enumerate(names):
            o = result["options"][name]
            for j, (s, v) in enumerate(zip(o["seeds"], o[metric]["per_seed"])):
                ax.plot(i - 0.15 + 0.1 * j, v, "o", color=f"C{s % 10}", ms=5,
                        label=f"seed {s}" if i == 0 else None)
            m = o[metric]
            ax.errorbar(i + 0.25, m["mean"], yerr=m["sd"] or 0, fmt="s", color="k", capsize=4,
                        label="mean +- between-seed SD" if i == 0 else None)
            ax.errorbar(i + 0.35, m["mean"], yerr=m["query_se"], fmt="none", ecolor="0.6", capsize=3,
                        label="+- query SE" if i == 0 else None)
        ax.axhline(result["chance"], color="0.8", ls="--", lw=1, label="chance")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"seed variance: {result['variant']} on the {result['task']} task, seeds {result['seeds_done']} "
                 f"({result['machine'].get('cpu', 'cpu')})", fontsize=9, y=0.995)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, default=RESULTS / "ablation_motion_cpu")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--task", default="motion", help="the study's sample task (names the output file)")
    ap.add_argument("--seeds", type=int, nargs="+", help="the seeds expected (default: every run folder's)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the queries")
    ap.add_argument("--rows-only", action="store_true",
                    help="no re-evaluation: the rows' own numbers, their query SEs and the loss tails")
    ap.add_argument("--determinism", type=int, metavar="STEPS", help="also train twice with one seed for STEPS steps")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.study / "runs").is_dir():
        raise SystemExit(f"--study {args.study}: not a study folder (no runs/ in it)")
    if args.boot < 2 or (args.determinism is not None and args.determinism < 1):
        raise SystemExit("--boot needs >= 2 resamples and --determinism >= 1 step")
    import torch

    from mscl_stream.machine import machine_info

    t0, load0 = time.perf_counter(), os.getloadavg()
    runs, missing = find_runs(args.study, args.variant, args.seeds)
    print(f"{args.variant}: seeds {sorted(runs)} finished" + (f", {missing} not yet" if missing else ""), flush=True)
    if args.rows_only:
        per_seed, curves = {s: row_option(row, args.boot) for s, (_, row) in sorted(runs.items())}, {}
    else:
        per_seed = {s: run_options(d, row, args.boot) for s, (d, row) in sorted(runs.items())}
        curves = {s: curve(d, row) for s, (d, row) in sorted(runs.items())}
    tails = {s: loss_tail(d) for s, (d, _) in sorted(runs.items())}
    reproduces = None if args.rows_only else {        # rows-only reads the rows: nothing to reproduce
        s: all(per_seed[s][TODAY][m] == row[m] for m in ("R@1", "linear_top1"))
        for s, (_, row) in runs.items()}
    first = runs[min(runs)][1]
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "study": str(args.study), "variant": args.variant,
              "task": args.task, "seeds_done": sorted(runs), "seeds_missing": missing, "boot": args.boot,
              "test_queries": first["test_queries"], "chance": 1 / len(first["classes"]),
              "today_option": TODAY, "rows_only": args.rows_only, "today_reproduces_rows": reproduces,
              "options": summarize(per_seed), "per_seed": per_seed, "curve": curves,
              "loss_tail": tails, "cross_margin": cross_margin(args.study),
              "machine": machine_info("cpu"), "load_avg_at_start": load0,
              "versions": {"torch": torch.__version__, "numpy": np.__version__,
                           "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()}}
    name = args.task if args.variant == "full" else f"{args.task}_{args.variant}"
    out = args.out_dir / f"seed_variance_{name}_cpu_{time.strftime('%Y%m%d')}.json"
    if args.determinism:
        with tempfile.TemporaryDirectory(prefix="seed_variance_det_") as work:
            result["determinism"] = determinism(first, args.determinism, Path(work))
    elif out.is_file() and "determinism" in (prev := json.loads(out.read_text())):
        result["determinism"] = prev["determinism"]          # an earlier probe's answer stays with the rerun
    result["load_avg_at_end"], result["seconds"] = os.getloadavg(), round(time.perf_counter() - t0, 1)
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    if curves:
        plot_curve(result, out.with_name(out.stem + "_curve.png"))
    print("\n" + markdown(result["options"]))
    if curves:
        print("R@1 / probe at each checkpoint:\n" + curve_markdown(curves))
    print("loss terms over the last 500 steps:\n"
          + loss_tail_markdown(tails, {s: row["R@1"] for s, (_, row) in runs.items()}))
    if "determinism" in result:
        print("determinism:", json.dumps(result["determinism"]))
    print(f"wrote {out} (+ .png)")


if __name__ == "__main__":
    main()
