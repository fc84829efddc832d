"""`make demo` / `mscl-stream demo`: the whole product on a laptop CPU, in about a quarter of an hour.

sample videos with known motion -> index -> a look at one streamed batch (PNG + throughput) ->
MSCL pretraining (configs/demo.yaml) -> motion-label retrieval and linear probe of the pretrained
encoder next to a randomly initialised one. Everything lands in one run directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mscl_stream.augment import IMAGENET_MEAN, IMAGENET_STD
from mscl_stream.config import Config, load_config
from mscl_stream.errors import UserError

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoTask:
    """What the demo (and ``mscl-stream ablate``) needs to run on one sample task.

    Attributes:
        videos: synthetic videos made (about 2/3 train: pretraining set and gallery; 1/3 test: queries).
        overrides: config overrides on top of configs/demo.yaml (the step budget follows the train count).
    """

    videos: int
    overrides: tuple[str, ...]


# motion: 7 classes x 30 videos = 70 test queries, 140 train -> 35 steps per epoch, 57 epochs ~ 2,000 steps
# (configs/demo.yaml); direction: the earlier demo (120 videos, 20 steps per epoch, 100 epochs), kept so
# that its numbers in benchmarks/README.md can be reproduced
DEMO_TASKS = {"motion": DemoTask(210, ()), "direction": DemoTask(120, ("train.epochs=100",))}


def demo_task(name: str) -> DemoTask:
    if name not in DEMO_TASKS:
        raise UserError(f"--task {name!r}: choose one of {', '.join(DEMO_TASKS)}")
    return DEMO_TASKS[name]
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def save_batch_png(cfg: Config, path: Path, samples: int = 4) -> dict:
    """Stream one batch through decode -> flow -> augmentation and save both views per sample.

    Rows: samples. Columns: RGB query view, its flow, its FRA-rotated flow, RGB key view, its flow.
    Returns the throughput of that pass (clips/s for decode + flow + augmentation).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mscl_stream.data.loader import build_loader
    from mscl_stream.data.sampler import read_pretraining_manifest
    from mscl_stream.flow import estimator_from_config
    from mscl_stream.machine import resolve_device
    from mscl_stream.train.inputs import compute_flow, make_inputs

    device = resolve_device(cfg.train.device)
    loader = build_loader(cfg, read_pretraining_manifest(cfg.data), device=device)   # what pretraining samples
    loader.set_epoch(0)
    est = estimator_from_config(cfg.flow, device)
    t0 = time.perf_counter()
    batch = next(iter(loader), None)
    if batch is None:
        raise UserError(f"demo: the train split gives fewer samples than one batch (data.batch_size "
                        f"{cfg.data.batch_size}); use more videos or a smaller batch")
    batch, flow_a, flow_b = compute_flow(batch, est)
    inputs = make_inputs(batch, flow_a, flow_b, cfg, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0

    def rgb(x: torch.Tensor) -> torch.Tensor:  # (3,S,S) normalised -> (S,S,3) in [0,1]
        return (x.cpu().float() * STD + MEAN).clamp(0, 1).permute(1, 2, 0)

    n = min(samples, batch.batch_size)
    cols = [("query RGB", lambda i: rgb(inputs.rgb_q[i, :, 0])),
            ("query flow", lambda i: inputs.flow_q[i, :, 0].cpu().permute(1, 2, 0)),
            ("query FRA flow", lambda i: inputs.rot_q[i, :, 0].cpu().permute(1, 2, 0)),
            ("key RGB", lambda i: rgb(inputs.rgb_k[i, :, 0])),
            ("key flow", lambda i: inputs.flow_k[i, :, 0].cpu().permute(1, 2, 0))]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for i in range(n):
        for j, (title, get) in enumerate(cols):
            axes[i][j].imshow(get(i).numpy())
            axes[i][j].set_axis_off()
            if i == 0:
                axes[i][j].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    rate = batch.batch_size / seconds
    print(f"demo: one batch of {batch.batch_size} clips decoded + flow + augmented in {seconds:.2f} s "
          f"({rate:.1f} clips/s, first batch incl. pipeline start); views in {path}", flush=True)
    return {"first_batch_seconds": seconds, "clips_per_s": rate}


def prepare_demo_data(out: Path, cfg: Config, videos: int = 210, task: str = "motion") -> Path:
    """Make (or reuse) the demo's labelled videos of ``task`` in ``out/videos`` and index them; returns
    the manifest.

    Videos are made with ``cfg.train.seed`` (the split and the noise of every comparison depend on
    them); an existing folder is reused, with a warning when it holds another number of videos, and
    refused when its classes are another task's.
    """
    from mscl_stream.data.indexing import build_manifest
    from mscl_stream.data.synthetic import make_sample_dataset, task_classes

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    data_dir = out / "videos"
    if not (data_dir / "train").is_dir():
        make_sample_dataset(data_dir, videos=videos, codec="vp9", seed=cfg.train.seed, task=task)
    else:
        have = {d.name for d in (data_dir / "train").iterdir() if d.is_dir() and not d.name.startswith("real_")}
        if not have <= set(task_classes(task)):
            raise UserError(f"{data_dir} holds videos of other classes ({', '.join(sorted(have))}) than the "
                            f"{task} task's; use another --out, or delete {data_dir} and {manifest}")
        found = sum(1 for sp in ("train", "test") for f in (data_dir / sp).glob("*/*") if f.is_file())
        if found != videos:
            log.warning("reusing %s with %d videos, not the %d asked for (its test split sets the noise of "
                        "the comparison); delete it and %s to regenerate", data_dir, found, videos,
                        manifest.name)
    if not manifest.is_file():
        build_manifest(data_dir, manifest, data=cfg.data)
    return manifest


def run_demo(out: Path, overrides: list[str] | tuple[str, ...] = (), task: str = "motion",
             videos: int | None = None) -> dict:
    """Run the whole demo on sample ``task`` into ``out``; returns the side-by-side evaluation results.

    The task sets the videos made (:data:`DEMO_TASKS`; ``videos`` replaces its count); about 1/3 of them
    are the test queries, which set the standard error of every number the demo prints.
    """
    from mscl_stream.data.synthetic import task_classes
    from mscl_stream.eval import run_evals
    from mscl_stream.train.trainer import pretrain

    out = Path(out)
    setting = demo_task(task)
    overrides = [*setting.overrides, *overrides]
    cfg = load_config(DEMO_CONFIG, [f"train.out_dir={out / 'pretrain'}", *overrides], check=False)
    manifest = prepare_demo_data(out, cfg, setting.videos if videos is None else videos, task)
    # a rerun of the demo replaces its own earlier pretraining run (pretrain refuses that by default)
    again = [] if any(o.startswith("train.resume=") for o in overrides) else ["train.overwrite=true"]
    cfg = load_config(DEMO_CONFIG, [f"train.out_dir={out / 'pretrain'}", f"data.manifest={manifest}", *again,
                                    *overrides])
    classes = task_classes(task)

    stream = save_batch_png(cfg, out / "views.png")
    train = pretrain(cfg)
    ckpt = out / "pretrain" / "checkpoints" / "last.pt"
    results = {"stream": stream, "pretrain": train}
    kinds = ("retrieval", "linear")
    pre = run_evals(kinds, checkpoint=str(ckpt), cfg=cfg,
                    outs={k: str(out / f"eval_{k}_pretrained.json") for k in kinds})
    rnd = run_evals(kinds, checkpoint=None, cfg=cfg, outs={k: str(out / f"eval_{k}_random.json") for k in kinds})
    for kind in kinds:
        results[kind] = {"pretrained": pre[kind], "random_init": rnd[kind]}
    tmp = out / f".demo_results.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out / "demo_results.json")
    save_results_png(results, out / "demo_results.png", task)
    print_results(results, task, len(classes))
    print(f"\nrun directory: {out} (checkpoint, logs, views.png, demo_results.json, demo_results.png)")
    return results


def print_results(results: dict, task: str, n_classes: int) -> None:
    """The side-by-side table of every retrieval and probe metric, with chance and its standard error."""
    print(f"\n{task}-task evaluation on the test split (pretrained vs random init):")
    print(f"  {'metric':<22}{'pretrained':>12}{'random init':>14}")
    for kind in ("retrieval", "linear"):
        pre, rnd = results[kind]["pretrained"], results[kind]["random_init"]
        # R@1, R@5, ... in numeric order, then the other metrics
        order = lambda k: (0, int(k[2:])) if k.startswith("R@") and k[2:].isdigit() else (1, k)  # noqa: E731
        for key in sorted((k for k, v in pre.items() if isinstance(v, (int, float))), key=order):
            print(f"  {kind + ' ' + key:<22}{pre[key]:>12.3f}{rnd.get(key, float('nan')):>14.3f}")
    n = results["retrieval"]["pretrained"]["info"]["test"]
    chance = 1.0 / n_classes
    print(f"  {n} test queries, {n_classes} classes: chance R@1 ~ {chance:.2f}; one standard error of a "
          f"fraction near chance ~ {(chance * (1 - chance) / max(n, 1)) ** 0.5:.2f}")


def save_results_png(results: dict, path: Path, task: str) -> None:
    """Left: retrieval R@1/R@5 and probe top-1, pretrained vs random init. Then, per encoder, the top-1
    retrieval confusion (query class x class of its nearest training video, as fractions of the row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ret, lin = results["retrieval"], results["linear"]
    metrics = [("retrieval R@1", ret, "R@1"), ("retrieval R@5", ret, "R@5"), ("probe top-1", lin, "top1")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    x = range(len(metrics))
    for k, (arm, colour) in enumerate((("pretrained", "#3b6fb6"), ("random_init", "#bbbbbb"))):
        vals = [src[arm].get(key, float("nan")) for _, src, key in metrics]
        axes[0].bar([i + 0.38 * k for i in x], vals, 0.38, color=colour, label=arm.replace("_", " "))
        for i, v in zip(x, vals):
            axes[0].text(i + 0.38 * k, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    classes = ret["pretrained"]["classes"]
    axes[0].axhline(1 / len(classes), color="#999", ls="--", lw=1, label="chance (top-1)")
    axes[0].set_xticks([i + 0.19 for i in x], [m[0] for m in metrics], fontsize=8)
    axes[0].set_ylim(0, 1.08)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[0].set_title(f"{task} task, {ret['pretrained']['info']['test']} test queries", fontsize=9)
    for ax, arm in zip(axes[1:], ("pretrained", "random_init")):
        counts = ret[arm]["top1_confusion"]
        frac = [[c / max(sum(row), 1) for c in row] for row in counts]
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                        color="white" if frac[i][j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, fontsize=7, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{arm.replace('_', ' ')}: query class x nearest video's class", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
