"""GPU validation in parts that each fit a short device lease.

    python benchmarks/gpu_check.py --part torch OUT   # torch alone: GPU/driver/NVDEC facts, the CUDA tests
                                                      # that need no DALI/Kornia/PyAV, TV-L1 fused vs eager,
                                                      # flow_speed (80 s on an H100), RAFT speed variants
                                                      # with their EPE vs the reference loop (raft_*) and
                                                      # model-step variants (step_*): both unmeasured yet,
                                                      # limits add up to 34 min (expected: far less);
                                                      # --only / --skip to fit the lease
    python benchmarks/gpu_check.py --part dali OUT    # with DALI + PyAV (+ Kornia from the tests on): the
                                                      # DALI decode variants against 16 PyAV processes on
                                                      # the k400 profile first (no Kornia needed), then the
                                                      # remaining CUDA tests, the end-to-end bench (DALI
                                                      # run with the fastest variant), NVDEC vs PyAV decode
                                                      # per codec, the train step bf16 vs fp32, the
                                                      # input path (fused kernels vs kornia, step profile)
    python benchmarks/gpu_check.py --part dali --only dali_variants_k400 OUT   # the decode variants alone
    python benchmarks/gpu_check.py --part torch --budget 270 OUT   # ends within 270 s, with its summary

The parts follow the GPU host's staging (benchmarks/README.md, "Running the GPU check"): torch is there from the start,
DALI/Kornia/PyAV only after the last of three transfers. Each measurement runs as its own subprocess
with a time limit, so one failure costs only its own number; ``--skip NAME ...`` leaves some out. After
every measurement OUT/gpu_check_<part>.json is rewritten (a lease that ends early still returns what
was measured); the benchmarks' own JSON/PNG files land in OUT/results/; the full output of every
measurement in OUT/log.txt; the last lines printed are a summary table.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_RUN_S = 20          # with --budget, a measurement with less time left than this is not started


def _run(name: str, cmd: list[str], out: Path, timeout: int, env: dict | None = None) -> dict:
    """Run one measurement; its output goes to OUT/<part>.log, its status into the summary."""
    t0 = time.perf_counter()
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        status, tail = ("ok" if r.returncode == 0 else f"exit {r.returncode}"), (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        status = f"timeout {timeout}s"
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
               ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    seconds = time.perf_counter() - t0
    with open(out / "log.txt", "a") as f:
        f.write(f"\n===== {name} ({status}, {seconds:.1f} s)\n{tail}\n")
    print(f"[gpu_check] {name}: {status} in {seconds:.1f} s", flush=True)
    return {"status": status, "seconds": seconds, "tail": tail[-3000:]}


def environment() -> dict:
    import torch
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "nvcuvid": ctypes.util.find_library("nvcuvid"), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gb=p.total_memory / 2**30, sm=p.multi_processor_count,
                    cuda=torch.version.cuda)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    for mod in ("triton", "nvidia.dali", "kornia", "av", "cv2"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001 - report whatever is missing on the host
            info[mod] = f"missing ({e.__class__.__name__})"
    return info


def train_step_cmd(amp: str, channels_last: bool, steps: int, batch: int) -> list[str]:
    """The MSCL step (RAFT-small flow + augmentation + model) on device-resident synthetic batches."""
    code = f"""
import json, torch
from mscl_stream.config import load_config
from mscl_stream.data.batch import ClipBatch
from mscl_stream.commands.bench import ResidentLoader, steady_rate
from mscl_stream.train.flops import mfu
from mscl_stream.train.trainer import pretrain
cfg = load_config('configs/bench.yaml', ['train.amp={amp}', 'train.channels_last={str(channels_last).lower()}',
    'flow.precision={'bf16' if amp == 'bf16' else 'fp32'}', 'data.batch_size={batch}', 'train.max_steps={steps}',
    'train.out_dir=/tmp/gpu_check_step', 'train.overwrite=true', 'train.ckpt_every=0', 'log.every=5'])
dev = 'cuda' if torch.cuda.is_available() else 'cpu'   # CPU only to check this script itself
cfg.train.device = dev
B, T, F, (H, W) = {batch}, 8, 4, cfg.data.frame_size
g = torch.Generator().manual_seed(0)
u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8).to(dev)
ar = lambda n: torch.arange(n).repeat(B, 1).to(dev)
batch = ClipBatch(rgb_a=u8(B, T, 3, H, W), rgb_b=u8(B, T, 3, H, W), partner_rgb_a=u8(B, F, 3, H, W),
                  partner_rgb_b=u8(B, F, 3, H, W), flow_steps=torch.arange(0, T, 2).to(dev), frame_idx_a=ar(T),
                  frame_idx_b=ar(T), partner_idx_a=ar(F), partner_idx_b=ar(F),
                  labels=torch.zeros(B, dtype=torch.long).to(dev),
                  video_idx=torch.zeros(B, dtype=torch.long).to(dev))
res = pretrain(cfg, loader=ResidentLoader(batch, {steps}))
stages = res['stage_seconds']; tot = sum(stages.values()); rate = steady_rate(res, B)
print('RESULT', json.dumps({{'clips_per_s': rate, 'stage_share': {{k: v / tot for k, v in stages.items()}},
      'peak_mem_gb': res['gpu_mem_gb'], 'loss': res.get('loss/loss'), 'flops_per_clip': res['flops_per_clip'],
      'mfu': mfu(res['flops_per_clip'], rate, res['peak_flops']), 'stage_timing': res.get('stage_timing')}}))
"""
    return [PY, "-c", code]


# CUDA-only tests that need torch alone (no DALI, Kornia or PyAV: the GPU host has none of them before
# the last staging call) and the ones that need them; together they are every test that skips on CPU.
TORCH_TESTS = ["tests/flow/test_opencv.py::test_output_on_input_device",
               "tests/flow/test_raft.py::test_gpu_precisions_and_graphs_match_fp32",
               "tests/flow/test_tvl1.py::test_fused_gpu_matches_eager_and_batches_consistently",
               "tests/kernels/test_tvl1_kernel.py::test_compiled_kernels_match_reference_on_gpu",
               "tests/models/test_mscl.py::test_cuda_full_size_bf16_channels_last",
               "tests/test_losses.py::test_losses_on_cuda_match_cpu",
               "tests/kernels/test_corr_lookup.py::test_compiled_kernel_matches_grid_sample_on_gpu",
               "tests/flow/test_raft.py::test_gpu_speed_variants_match_fp32",
               "tests/train/test_step_options.py::test_flow_ahead_on_a_side_stream_hands_out_the_plain_flows",
               "tests/train/test_guard.py"]
DALI_TESTS = ["tests/data/test_loader.py", "tests/data/test_dali_modes.py",
              "tests/data/test_manifest.py::test_probe_counts_equal_dali_gpu_decode",
              "tests/flow/test_registry.py::test_dali_of_translation_or_clear_error",
              "tests/kernels/test_flow_encode.py", "tests/test_augment.py::test_cuda_matches_cpu",
              "tests/train/test_step_syncs.py",
              "tests/kernels/test_augment_kernels.py::test_make_inputs_backends_agree_on_cuda",
              "tests/data/test_yuv.py::test_cuda_conversion_queues_no_host_sync"]


def _pytest(tests: list[str]) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]


# RAFT speed variants (benchmarks/raft_variants.py), most wanted first; each its own subprocess and time
# limit (compiling variants get more). The reference runs first: the others compare their flow with its.
RAFT_VARIANTS = [("reference", 60), ("triton", 60), ("triton_channels_last", 60), ("triton_compile_update", 150),
                 ("iters_8", 60), ("warm_start_6", 60), ("triton_warm_start_6", 60), ("channels_last", 60),
                 ("eager", 60), ("compile_update_eager", 150)]
# Model step variants (benchmarks/model_step.py, no Kornia needed); seq vs ahead answers "does flow for
# batch N+1 on a side stream overlap batch N's training?"
MODEL_STEP_VARIANTS = [("model_fused", 90), ("model_foreach", 90), ("flow_only", 60), ("seq", 90), ("ahead", 90),
                       ("model_compiled", 240), ("model_loop", 90)]


def part_torch(results: Path) -> dict[str, tuple[list[str], int]]:
    """Torch-only work (first staging call): CUDA tests, TV-L1 fused vs eager, flow_speed, RAFT speed
    variants with their EPE against the reference loop, model-step variants (compile, SGD kernels,
    flow ahead)."""
    runs = {"tests_cuda_torch": (_pytest(TORCH_TESTS), 300),
            "tvl1_speed": ([PY, "benchmarks/tvl1_speed.py", "--device", "cuda", "--quick", "--out", str(results)], 100),
            "flow_speed": ([PY, "benchmarks/flow_speed.py", "--device", "cuda", "--quick", "--out", str(results)], 90),
            # the fused input path alone (no Kornia or PyAV here yet: the kornia comparison and the step
            # profile run in the dali part as input_path)
            "input_path_fused": ([PY, "benchmarks/augment_kernels.py", "--device", "cuda", "--what", "make_inputs",
                                  "--out", str(results)], 120)}
    runs["corr_lookup"] = ([PY, "benchmarks/corr_lookup.py", "--device", "cuda", "--out", str(results)], 60)
    for name, limit in RAFT_VARIANTS:
        runs[f"raft_{name}"] = ([PY, "benchmarks/raft_variants.py", "--device", "cuda", "--variant", name,
                                 "--out", str(results)], limit)
    for name, limit in MODEL_STEP_VARIANTS:
        runs[f"step_{name}"] = ([PY, "benchmarks/model_step.py", "--device", "cuda", "--variant", name,
                                 "--out", str(results)], limit)
    return runs


# benchmarks/nvdec_access.py on k400-profile data (H.264, x264 medium, GOP 250), batch 64,
# 16 videos x 32 samples = 8 batches per variant (2 left out as warm-up), every variant in a subprocess
K400_DATA = Path("/tmp/mscl-nvdec-access")
VARIANT_ARGS = ["--device", "cuda", "--profile", "k400", "--codec", "h264", "--videos", "16", "--clips-per-video",
                "32", "--batch", "64", "--warmup", "2", "--depth", "3", "--pyav-workers", "16", "--time-limit", "100",
                "--budget", "60",
                "--data", str(K400_DATA)]
DALI_MODES = {"dali_decoder": "decoder", "dali_reader": "reader", "dali_legacy": "legacy"}


def fastest_dali_mode(results: Path) -> str:
    """The data.dali_mode of the fastest DALI variant in the newest k400 nvdec_access JSON ("reader"
    when there is none yet)."""
    files = sorted(results.glob("nvdec_access_cuda_k400_h264_2*.json"))
    if not files:
        return "reader"
    rows = json.loads(files[-1].read_text())["variants"]
    ok = {v: r["samples_per_s"] for v, r in rows.items() if v in DALI_MODES and "samples_per_s" in r}
    return DALI_MODES[max(ok, key=ok.get)] if ok else "reader"


def input_path_runs(results: Path) -> dict[str, tuple[list[str], int]]:
    """The step's input path (benchmarks/augment_kernels.py, needs Kornia for the reference backend):
    make_inputs with the fused kernels vs kornia at batch 64 (ms, kernels, sync-debug check, parity),
    then a torch.profiler summary of steady training steps (kernels, syncing calls, idle gaps)."""
    return {"input_path": ([PY, "benchmarks/augment_kernels.py", "--device", "cuda", "--batch", "64",
                            "--out", str(results)], 240)}


def part_dali(results: Path) -> dict[str, tuple[list[str], int]]:
    """Needs DALI + PyAV (+ Kornia from the tests on; last staging call): the DALI decode variants on the
    k400 profile against 16 PyAV processes, the CUDA tests (NVDEC vs PyAV pixel agreement for every
    DALI mode, dali_of direction, kernels, augmentation), the end-to-end bench on the same k400 videos
    with both baselines and DALI (its fastest variant), the legacy reader without wrapped windows,
    NVDEC vs PyAV decode per codec, the train step bf16 vs fp32."""
    manifest = K400_DATA / "k400_h264_16" / "manifest.jsonl"
    # PyAV first: without the baseline no DALI figure means anything, and a short lease may end mid-part
    runs = {"dali_variants_k400": ([PY, "benchmarks/nvdec_access.py", *VARIANT_ARGS, "--variants", "pyav",
                                    "dali_decoder", "dali_reader", "dali_legacy", "dali_sync", "--out", str(results)],
                                   560),
            "tests_cuda_dali": (_pytest(DALI_TESTS), 150),
            **input_path_runs(results),
            # built when it starts: the DALI run uses the variant that was fastest above
            "bench_e2e": (lambda: [PY, "-m", "mscl_stream.cli", "bench", "-c", "configs/bench.yaml", "--steps", "20",
                                   "--baselines", "--out", str(results), f"data.manifest={manifest}", "data.split=",
                                   "data.decode_workers=16", f"data.dali_mode={fastest_dali_mode(results)}"], 420),
            "dali_nowrap_k400": ([PY, "benchmarks/nvdec_access.py", *VARIANT_ARGS, "--no-wrap", "--variants",
                                  "dali_legacy", "dali_reader", "--out", str(results)], 240),
            # repeated sampling (data.repeat_samples=4): a group of 4 samples is one decode on every path
            "dali_repeat4_k400": ([PY, "benchmarks/nvdec_access.py", *VARIANT_ARGS, "--repeat", "4",
                                   "--clips-per-video", "8", "--variants", "dali_decoder", "dali_reader", "pyav",
                                   "--out", str(results)], 300)}
    for codec in ("h264", "hevc", "vp9"):
        runs[f"decode_{codec}"] = ([PY, "benchmarks/decode.py", "--device", "cuda", "--codec", codec, "--workers",
                                    "0", "--clips", "128", "--batch", "32", "--reps", "1", "--sweep", "",
                                    "--videos", "12", "--out", str(results)], 60)
    for amp, cl in (("bf16", True), ("fp32", False)):
        runs[f"train_step_{amp}{'_cl' if cl else ''}"] = (train_step_cmd(amp, cl, 12, 64), 60)
    return runs


def _save(out: Path, summary: dict) -> None:
    """Written after every measurement, so a lease that ends mid-part still returns what was measured."""
    for run in summary["runs"].values():   # collect RESULT lines printed by inline measurements
        for line in run["tail"].splitlines():
            if line.startswith("RESULT "):
                run["result"] = json.loads(line[7:])
    (out / f"gpu_check_{summary['part']}.json").write_text(json.dumps(summary, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["torch", "dali"], required=True)
    ap.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                    help="measurements to leave out (e.g. tvl1_speed flow_speed where this card was measured)")
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME", help="run only these measurements")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="finish within this many seconds: a measurement's time limit is cut to what is left, "
                         f"and one with less than {MIN_RUN_S} s left is skipped (the summary says so)")
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results"          # the benchmarks' own JSON/PNG files, ready to commit
    results.mkdir(exist_ok=True)
    summary = {"part": a.part, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment(),
               "runs": {}}
    print("[gpu_check] environment:", json.dumps(summary["environment"]), flush=True)
    plan = (part_torch if a.part == "torch" else part_dali)(results)
    unknown = (set(a.skip) | set(a.only or ())) - set(plan)
    if unknown:
        raise SystemExit(f"gpu_check: unknown measurement(s) {sorted(unknown)}; this part has {sorted(plan)}")
    _save(a.out, summary)
    t0 = time.perf_counter()
    for name, (cmd, timeout) in plan.items():
        if name in a.skip or (a.only is not None and name not in a.only):
            continue
        if a.budget is not None:        # a lease's device time is fixed: end with a summary, not a kill
            left = a.budget - (time.perf_counter() - t0)
            if left < MIN_RUN_S:
                print(f"[gpu_check] {name}: skipped, {max(left, 0):.0f} s of the budget left", flush=True)
                summary["runs"][name] = {"status": "skipped: budget", "seconds": 0.0, "tail": ""}
                _save(a.out, summary)
                continue
            timeout = min(timeout, int(left))
        summary["runs"][name] = _run(name, cmd() if callable(cmd) else cmd, a.out, timeout)
        _save(a.out, summary)
    print(f"\n{'measurement':<28}{'status':<16}{'seconds':>8}")
    for name, run in summary["runs"].items():
        extra = ""
        if "result" in run:
            r = run["result"]
            extra = f"  {r.get('clips_per_s', 0):.1f} clips/s" + (f", MFU {r['mfu']:.3f}" if r.get("mfu") else "")
            if r.get("pairs_per_s"):
                extra = f"  {r['pairs_per_s']:.0f} pairs/s, EPE vs reference {r.get('epe_vs_reference') or 0:.4f} px"
            elif r.get("ms_per_step"):
                extra += f", {r['ms_per_step']:.1f} ms/step"
        print(f"{name:<28}{run['status']:<16}{run['seconds']:>8.1f}{extra}")
        if name.startswith("dali_") and "_k400" in name:     # nvdec_access's own table, one row per variant
            for line in run["tail"].splitlines():
                if line.startswith(("dali_", "pyav", "samples/s relative", "results in")):
                    print(f"    {line}")


if __name__ == "__main__":
    main()
