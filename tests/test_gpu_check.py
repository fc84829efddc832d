"""The prepared GPU run (benchmarks/gpu_check.py) is right before it meets a GPU.

Device time is scarce (minutes per lease), so a mistyped option or a renamed test must fail here, on
CPU: every command it runs parses with its script's own parser, every test it names exists, and every
test that skips for want of CUDA is on one of its lists.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load(REPO / "benchmarks" / "gpu_check.py")


def _plan(tmp_path: Path) -> dict[str, list[str]]:
    plan = {**gpu_check.part_torch(tmp_path), **gpu_check.part_dali(tmp_path)}
    return {name: (cmd() if callable(cmd) else cmd) for name, (cmd, _) in plan.items()}


class _Parsed(Exception):
    pass


def _parse_only(script: Path, args: list[str], monkeypatch) -> argparse.Namespace:
    """Run the script's main() up to its parse_args and stop there with the parsed namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    mod = _load(script)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        with pytest.raises(_Parsed) as got:
            mod.main()
    finally:
        monkeypatch.undo()
    return got.value.args[0]


def test_every_benchmark_command_parses(tmp_path, monkeypatch, capsys):
    scripts = 0
    for name, cmd in _plan(tmp_path).items():
        assert cmd[0] == sys.executable, name
        if cmd[1] == "-c":                     # inline step script: checked by running it below
            continue
        if cmd[1:3] == ["-m", "pytest"]:
            continue                           # the test lists: checked below
        if cmd[1:3] == ["-m", "mscl_stream.cli"]:
            from mscl_stream.cli import build_parser
            from mscl_stream.config import load_config
            args, extra = build_parser().parse_known_args(cmd[3:])
            assert args.cmd == "bench", name
            # every override is a real key with a valid value; the manifest is made on the GPU host
            stand_in = tmp_path / "manifest.jsonl"
            stand_in.touch()
            load_config(args.config, [f"data.manifest={stand_in}" if o.startswith("data.manifest=") else o
                                      for o in list(args.overrides) + extra])
            continue
        script = REPO / cmd[1]
        assert script.is_file() and script.parent.name == "benchmarks", (name, cmd[1])
        try:
            if script.name == "nvdec_access.py":    # its parse_args also checks the epoch length
                _load(script).parse_args(cmd[2:])
            else:
                _parse_only(script, cmd[2:], monkeypatch)
        except SystemExit as e:
            pytest.fail(f"{name}: {cmd[1]} refuses its arguments: {capsys.readouterr().err.strip()} ({e})")
        scripts += 1
    assert scripts >= 20


def test_the_parse_check_catches_a_bad_option(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        _parse_only(REPO / "benchmarks" / "raft_variants.py", ["--variant", "no_such_variant"], monkeypatch)
    with pytest.raises(SystemExit):               # too few batches for a steady state: refused before any data
        _load(REPO / "benchmarks" / "nvdec_access.py").parse_args(["--videos", "16", "--clips-per-video", "8"])


def test_budget_cuts_time_limits_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    # three measurements of 30 s limits in a 12 s budget: the first ends in 1 s, the second is cut to the
    # ~11 s left and killed there, the third has under MIN_RUN_S left and is skipped with a note
    import json
    sleep = lambda s: [sys.executable, "-c", f"import time; time.sleep({s})"]       # noqa: E731
    plan = {"quick": (sleep(1), 30), "long": (sleep(60), 30), "late": (sleep(1), 30)}
    monkeypatch.setattr(gpu_check, "part_torch", lambda results: plan)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"stub": True})
    monkeypatch.setattr(gpu_check, "MIN_RUN_S", 3)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--part", "torch", "--budget", "12", str(tmp_path)])
    gpu_check.main()
    runs = json.loads((tmp_path / "gpu_check_torch.json").read_text())["runs"]
    assert runs["quick"]["status"] == "ok" and runs["quick"]["seconds"] < 8
    assert runs["long"]["status"].startswith("timeout") and 7 < runs["long"]["seconds"] < 15
    assert runs["late"]["status"] == "skipped: budget"


def _listed() -> list[str]:
    return gpu_check.TORCH_TESTS + gpu_check.DALI_TESTS


def test_every_listed_test_exists():
    for node in _listed():
        path, _, func = node.partition("::")
        assert (REPO / path).is_file(), node
        if func:
            assert f"def {func}(" in (REPO / path).read_text(), node


PLUGIN = '''
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        for mark in item.iter_markers("skipif"):
            if mark.args and mark.args[0] is True and "CUDA" in mark.kwargs.get("reason", ""):
                print("CUDA-SKIP", item.nodeid)
                break
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="lists the tests that skip without CUDA")
def test_every_cuda_only_test_is_on_a_gpu_check_list(tmp_path):
    (tmp_path / "cuda_skips.py").write_text(PLUGIN)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "cuda_skips",
                          "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}, timeout=300)
    skipping = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("CUDA-SKIP ")]
    assert len(skipping) >= 20, out.stdout[-2000:] + out.stderr[-2000:]
    listed = _listed()
    missing = [n for n in skipping if not any(n == x or n.startswith(x + "::") or n.startswith(x + "[")
                                              or n.split("::")[0] == x for x in listed)]
    assert missing == [], f"CUDA-only tests that benchmarks/gpu_check.py never runs: {missing}"


@pytest.mark.slow
def test_the_inline_train_step_script_runs_on_cpu():
    # twice, as gpu_check runs it (bf16 then fp32) into the same run folder
    for _ in range(2):
        r = subprocess.run(gpu_check.train_step_cmd("fp32", False, steps=2, batch=2), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert any(ln.startswith("RESULT ") for ln in r.stdout.splitlines()), r.stdout[-2000:]


# The torch-part measurements that carry the most logic of their own, at CPU dry-run sizes: each must
# run to its RESULT line (a crash here would cost a GPU lease its number).
DRY_RUNS = {
    "model_step ahead": ["benchmarks/model_step.py", "--device", "cpu", "--batch", "2", "--size", "32", "40",
                         "--crop", "32", "--rgb-width", "8", "--steps", "2", "--warmup", "1", "--variant", "ahead",
                         "--set", "flow.estimator=dis_fast", "flow.precision=auto", "flow.cuda_graph=false"],
    "raft_variants": ["benchmarks/raft_variants.py", "--device", "cpu", "--size", "128", "128", "--batch", "4",
                      "--iters", "2", "--epe-chains", "1", "--min-time", "0.1", "--max-calls", "2",
                      "--variant", "reference", "triton_warm_start_6"],
    "augment_kernels": ["benchmarks/augment_kernels.py", "--device", "cpu", "--batch", "2", "--quick"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DRY_RUNS))
def test_benchmark_dry_runs_on_cpu(name, tmp_path):
    r = subprocess.run([sys.executable, *DRY_RUNS[name], "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert list(tmp_path.glob("*.json")), r.stdout[-2000:]
