"""GPU validation in parts that each fit a short device lease (< 5 min on an H100).

    python benchmarks/gpu_check.py --part torch OUT   # GPU/driver/NVDEC facts, RAFT, TV-L1, flow encode, train step
    python benchmarks/gpu_check.py --part dali OUT    # DALI mixed vs PyAV decode (H.264/HEVC/VP9), the test
                                                      # suite with CUDA, end-to-end bench with baselines

Each measurement runs as its own subprocess with a time limit, so one failure costs only its own
number. Every result lands in OUT/gpu_check_<part>.json (plus the benchmarks' own JSON/PNG files,
bundled into OUT/results_<part>.tar.gz), and the last lines printed are a summary table.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


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
from mscl_stream.train.bench import ResidentLoader, steady_rate
from mscl_stream.train.trainer import pretrain
cfg = load_config('configs/bench.yaml', ['train.amp={amp}', 'train.channels_last={str(channels_last).lower()}',
    'flow.precision={'bf16' if amp == 'bf16' else 'fp32'}', 'data.batch_size={batch}', 'train.max_steps={steps}',
    'train.out_dir=/tmp/gpu_check_step', 'train.ckpt_every=0', 'log.every=5'])
dev = 'cuda' if torch.cuda.is_available() else 'cpu'   # CPU only to check this script itself
cfg.train.device = dev
B, T, F, (H, W) = {batch}, 8, 4, cfg.data.frame_size
g = torch.Generator().manual_seed(0)
u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8).to(dev)
ar = lambda n: torch.arange(n).repeat(B, 1).to(dev)
batch = ClipBatch(rgb_a=u8(B, T, 3, H, W), rgb_b=u8(B, T, 3, H, W), partner_a=u8(B, F, 3, H, W),
                  partner_b=u8(B, F, 3, H, W), flow_steps=torch.arange(0, T, 2).to(dev), frames_a=ar(T),
                  frames_b=ar(T), partners_a=ar(F), partners_b=ar(F), labels=torch.zeros(B, dtype=torch.long).to(dev),
                  video_idx=torch.zeros(B, dtype=torch.long).to(dev))
res = pretrain(cfg, loader=ResidentLoader(batch, {steps}))
stages = res['stage_seconds']; tot = sum(stages.values())
print('RESULT', json.dumps({{'clips_per_s': steady_rate(res, B), 'stage_share': {{k: v / tot for k, v in stages.items()}},
      'peak_mem_gb': torch.cuda.max_memory_allocated() / 2**30 if dev == 'cuda' else None, 'loss': res.get('loss/loss')}}))
"""
    return [PY, "-c", code]


def part_torch(out: Path, results: Path) -> dict:
    r = {"flow_speed": _run("flow_speed", [PY, "benchmarks/flow_speed.py", "--device", "cuda", "--quick",
                                             "--out", str(results)], out, 90),
         "tvl1_speed": _run("tvl1_speed", [PY, "benchmarks/tvl1_speed.py", "--device", "cuda", "--quick",
                                             "--out", str(results)], out, 90)}
    for amp, cl in (("bf16", True), ("fp32", False)):
        r[f"train_step_{amp}{'_cl' if cl else ''}"] = _run(f"train_step {amp} channels_last={cl}",
                                                          train_step_cmd(amp, cl, 12, 64), out, 60)
    return r


def part_dali(out: Path, results: Path) -> dict:
    """Most important first: the end-to-end bench, then NVDEC decode, then the suite with CUDA (~9 min)."""
    r = {"bench_e2e": _run("end-to-end bench", [PY, "-m", "mscl_stream.cli", "bench", "-c", "configs/bench.yaml",
                                                "--steps", "20", "--baselines", "--out", str(results),
                                                "data.num_threads=16"], out, 150)}
    for codec in ("h264", "hevc", "vp9"):
        r[f"decode_{codec}"] = _run(f"decode {codec}", [PY, "benchmarks/decode.py", "--device", "cuda", "--codec",
                                                        codec, "--workers", "0", "--clips", "128", "--batch", "32",
                                                        "--reps", "1", "--sweep", "", "--videos", "12",
                                                        "--out", str(results)], out, 50)
    # The whole suite with CUDA present: the NVDEC-vs-PyAV pixel agreement, dali_of direction, RAFT
    # CUDA graphs, kernel parity on the device and the other tests that skip on CPU-only machines.
    r["test_suite_on_gpu"] = _run("pytest on GPU", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                                  out, 120)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["torch", "dali"], required=True)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="gpu_check_results_"))
    summary = {"part": a.part, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment()}
    print("[gpu_check] environment:", json.dumps(summary["environment"]), flush=True)
    summary["runs"] = (part_torch if a.part == "torch" else part_dali)(a.out, results)
    for name, run in summary["runs"].items():   # collect RESULT lines printed by inline measurements
        for line in run["tail"].splitlines():
            if line.startswith("RESULT "):
                run["result"] = json.loads(line[7:])
    (a.out / f"gpu_check_{a.part}.json").write_text(json.dumps(summary, indent=2, default=str))
    with tarfile.open(a.out / f"results_{a.part}.tar.gz", "w:gz") as tar:
        for p in sorted(results.iterdir()):
            tar.add(p, arcname=p.name)
    shutil.rmtree(results, ignore_errors=True)
    print(f"\n{'measurement':<28}{'status':<16}{'seconds':>8}")
    for name, run in summary["runs"].items():
        extra = ""
        if "result" in run:
            extra = f"  {run['result'].get('clips_per_s', 0):.1f} clips/s"
        print(f"{name:<28}{run['status']:<16}{run['seconds']:>8.1f}{extra}")


if __name__ == "__main__":
    main()
