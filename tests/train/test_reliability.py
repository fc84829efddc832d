"""Runs that cannot hurt each other or lie: run folders, diverged weights, signals, bad input, trust.

Each test states one promise of docs/reliability.md and checks the outcome a user would see: a one-line
UserError (exit code 2) raised before the expensive part, a counted and reported skip, or a run whose
state after an interruption equals the state of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN
from mscl_stream.config import ConfigError, dump_config, load_config
from mscl_stream.errors import UserError
from mscl_stream.train import checkpoint as ck
from mscl_stream.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[2]


def _cfg(manifest: Path, out: Path, *extra: str):
    return load_config(None, [*TINY_TRAIN, f"data.manifest={manifest}", "data.split=",
                              f"train.out_dir={out}", "train.ckpt_every=0", *extra])


def _cli(*args: str, env: dict | None = None, script: Path | None = None) -> subprocess.Popen:
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "mscl_stream.cli"]
    return subprocess.Popen([*head, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


class _Boom(Exception):
    pass


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if the trainer gets as far as building the streaming loader."""
    import mscl_stream.train.trainer as tr

    def boom(*a, **k):
        raise _Boom("the loader was built before the problem was reported")
    monkeypatch.setattr(tr, "build_loader", boom)


# ----------------------------------------------------------------------------- trust: pickles, YAML, imports


class _Evil:
    """Unpickling this object would create the marker file (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_pickles_are_refused_without_running(tmp_path, tiny_manifest):
    from mscl_stream.eval.features import build_r3d
    from mscl_stream.flow.raft_weights import _read_state_dict

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(marker)}, evil)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ck.load_checkpoint(evil)                                   # --resume PATH
    with pytest.raises(UserError, match="not a readable checkpoint"):
        build_r3d(str(evil))                                       # eval --checkpoint
    with pytest.raises(UserError, match="weights_only"):
        _read_state_dict(evil)                                     # flow.weights / flow-check --weights
    with pytest.raises(UserError, match="not a readable checkpoint"):
        pretrain(_cfg(tiny_manifest, tmp_path / "run", f"train.resume={evil}"))
    assert not marker.exists()


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "marker"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"optim: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)
    with pytest.raises(ConfigError):
        load_config(None, [f"optim.lr=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_module_callable_estimator_needs_an_opt_in_and_is_not_imported_without(tmp_path, monkeypatch):
    from mscl_stream.flow import estimator_from_config, get_estimator
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_flow.py").write_text(textwrap.dedent(f"""
        import pathlib, torch
        pathlib.Path({str(marker)!r}).write_text("module code ran")
        class Est:
            name = "sneaky"; device = torch.device("cpu")
            def __init__(self, device="cpu"): pass
            def __call__(self, a, b): return torch.zeros(a.shape[0], 2, *a.shape[-2:])
            def describe(self): return {{"name": "sneaky"}}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MSCL_STREAM_ALLOW_IMPORT", raising=False)
    with pytest.raises(ConfigError, match="flow.allow_import"):
        load_config(None, ["flow.estimator=sneaky_flow:Est"])
    cfg = load_config(None, ["flow.estimator=sneaky_flow:Est"], check=False)
    with pytest.raises(UserError, match="allow_import"):
        estimator_from_config(cfg.flow, "cpu")
    with pytest.raises(UserError, match="package.module:factory"):
        get_estimator("os.path:join; rm -rf", allow_import=True)
    assert not marker.exists()
    cfg = load_config(None, ["flow.estimator=sneaky_flow:Est", "flow.allow_import=true"])
    assert estimator_from_config(cfg.flow, "cpu").name == "sneaky" and marker.exists()
    monkeypatch.setenv("MSCL_STREAM_ALLOW_IMPORT", "1")
    assert load_config(None, ["flow.estimator=sneaky_flow:Est"]).flow.estimator == "sneaky_flow:Est"


def test_plugin_estimator_found_by_entry_point_name(tmp_path, monkeypatch):
    from mscl_stream.flow import ENTRY_POINT_GROUP, available_estimators, get_estimator
    (tmp_path / "plug_flow.py").write_text(textwrap.dedent("""
        import torch
        class Const:
            name = "plugged"; device = torch.device("cpu")
            def __init__(self, u=1.0, device="cpu"): self.u = u
            def __call__(self, a, b): return torch.full((a.shape[0], 2, *a.shape[-2:]), self.u)
            def describe(self): return {"name": "plugged", "options": {"u": self.u}}
    """))
    dist = tmp_path / "plug_flow-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-flow\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nplugged = plug_flow:Const\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged" in available_estimators()
    est = get_estimator("plugged", u=2.0)       # validated on a tiny pair, like any non-built-in
    a = torch.zeros(1, 3, 8, 8)
    assert est(a, a)[0, 0, 0, 0].item() == 2.0
    # a config names it like a built-in: no import opt-in needed for installed plug-ins
    assert load_config(None, ["flow.estimator=plugged"]).flow.estimator == "plugged"


# ----------------------------------------------------------------------------- numbers and config files


def test_numbers_parse_as_users_write_them(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\nloss:\n  weights: {lmcl: 2e0}\n")
    cfg = load_config(y)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.loss.weights["lmcl"] == 2.0
    for bad, key in [("optim.lr=.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
                     ("loss.weights.lmcl=-5", "loss.weights.lmcl"), ("optim.weight_decay=-1", "optim.weight_decay"),
                     ("optim.momentum=1.5", "optim.momentum"), ("train.keep_checkpoints=-1", "train.keep_checkpoints")]:
        with pytest.raises(ConfigError, match=key) as ei:
            load_config(None, [bad])
        assert "\n" not in str(ei.value)


def test_non_utf8_config_and_manifest_are_one_line_errors(tmp_path):
    from mscl_stream.data.manifest import read_manifest
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("optim: {lr: 0.1}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"path": "caf\xe9.mp4"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_manifest(m)


@pytest.mark.parametrize("row, problem", [
    ("[1, 2, 3]", "expected a JSON object"),
    ("null", "expected a JSON object"),
    ('{"label": null}', "label must be an integer"),
    ('{"label": "dog"}', "label must be an integer"),
    ('{"num_frames": "many"}', "num_frames must be an integer"),
    ('{"fps": true}', "fps must be a number"),
])
def test_malformed_manifest_rows_name_the_line(tmp_path, tiny_manifest, row, problem):
    from mscl_stream.data.manifest import read_manifest
    lines = tiny_manifest.read_text().splitlines()
    good = json.loads(lines[0])
    bad = json.loads(row)
    bad = {**good, **bad} if isinstance(bad, dict) else bad
    m = tiny_manifest.parent / f"bad_{abs(hash(row))}.jsonl"      # same folder: relative paths resolve
    m.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    try:
        with pytest.raises(UserError, match=rf":2: not a manifest row \({problem}") as ei:
            read_manifest(m)
        assert "\n" not in str(ei.value)
    finally:
        m.unlink()


def test_pretrain_without_a_manifest_names_the_key(tmp_path, no_expensive_work):
    with pytest.raises(UserError, match=r"^data.manifest: not set"):
        pretrain(load_config(None, [*TINY_TRAIN, f"train.out_dir={tmp_path}"]))


# ----------------------------------------------------------------------------- output locations


def test_bad_out_dirs_are_refused_before_work(tmp_path, tiny_manifest, no_expensive_work):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, msg in [(a_file, "exists and is not a folder"), (a_file / "sub", "a parent is a file"),
                     (Path("/proc/mscl_stream_test"), "pseudo file system")]:
        with pytest.raises(UserError, match=msg):
            pretrain(_cfg(tiny_manifest, out))
    run = tmp_path / "run"
    (run / "checkpoints").parent.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(UserError, match="checkpoints is a file"):
        pretrain(_cfg(tiny_manifest, run))
    assert not (run / ".lock").exists()                        # released on the error path
    # a start that fails before training leaves no run behind: the next start is not refused
    (run / "checkpoints").unlink()
    with pytest.raises(_Boom):
        pretrain(_cfg(tiny_manifest, run))
    with pytest.raises(_Boom):
        pretrain(_cfg(tiny_manifest, run))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_refused(tmp_path, tiny_manifest, no_expensive_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot"):
            pretrain(_cfg(tiny_manifest, ro / "run"))
    finally:
        ro.chmod(0o755)


def test_index_output_is_checked_before_probing(tmp_path, tiny_manifest, monkeypatch):
    from mscl_stream.data import indexing as ix
    monkeypatch.setattr(ix, "_probe_all", lambda *a, **k: (_ for _ in ()).throw(_Boom("probed first")))
    src = tiny_manifest.parent
    data = load_config(None, TINY_TRAIN).data
    a_file = tmp_path / "f"
    a_file.write_text("x")
    (tmp_path / "dir.jsonl").mkdir()
    for out, msg in [(tmp_path / "dir.jsonl", "is a folder"), (a_file / "m.jsonl", "is a file, not a folder"),
                     (Path("/proc/mscl_test/m.jsonl"), "cannot write")]:
        with pytest.raises(UserError, match=msg) as ei:
            ix.build_manifest(src, out, data=data, workers=1)
        assert str(ei.value).startswith("index -o")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or "write-test" in p.name]


def test_eval_out_is_checked_before_computing(tmp_path, tiny_manifest, monkeypatch):
    import mscl_stream.eval as ev
    monkeypatch.setattr(ev, "split_records", lambda *a: (_ for _ in ()).throw(_Boom("computed first")))
    (tmp_path / "res").mkdir()
    cfg = _cfg(tiny_manifest, tmp_path / "run")
    for out, msg in [(tmp_path / "res", "is a folder"), (Path("/proc/mscl_test/r.json"), "cannot write")]:
        with pytest.raises(UserError, match=msg):
            ev.run_eval("retrieval", cfg=cfg, out=str(out))


# ----------------------------------------------------------------------------- index: nothing dropped silently


def test_index_reports_every_skipped_entry_and_short_videos(tmp_path, tiny_manifest):
    from mscl_stream.data.indexing import build_manifest
    src = tmp_path / "src"
    cls = src / "right"
    cls.mkdir(parents=True)
    videos = sorted(p for p in tiny_manifest.parent.rglob("*.webm"))
    shutil.copy(videos[0], cls / "good.webm")
    data = videos[1].read_bytes()
    (cls / "cut.webm").write_bytes(data[: len(data) * 2 // 3])    # header says 40 frames
    (cls / "loop").symlink_to(cls / "loop")
    (cls / "dangling.webm").symlink_to(tmp_path / "gone.webm")
    os.mkfifo(cls / "pipe.webm")
    (cls / "null.webm").symlink_to("/dev/null")
    (cls / ".DS_Store").write_text("x")
    (src / "stray.webm").write_bytes(b"")
    report = build_manifest(src, tmp_path / "m.jsonl", data=load_config(None, [*TINY_TRAIN, "data.max_shift=0"]).data,
                            workers=1)
    why = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert why == {"loop": "symlink_loop", "dangling.webm": "dangling_link", "pipe.webm": "not_a_file",
                   "null.webm": "not_a_file", ".DS_Store": "hidden", "stray.webm": "no_class"}
    assert report["files"] == report["usable"] + len(report["excluded"])
    notes = {Path(n["path"]).name: " ".join(n["notes"]) for n in report["notes"]}
    assert "shorter than its header says" in notes.get("cut.webm", ""), report["notes"]
    assert "good.webm" not in notes


# ----------------------------------------------------------------------------- the run folder owns its run


def test_non_empty_run_dir_needs_resume_or_overwrite(tmp_path, tiny_manifest):
    out = tmp_path / "run"
    first = pretrain(_cfg(tiny_manifest, out, "train.max_steps=1"))
    with pytest.raises(UserError, match="already holds run .*--resume auto.*--overwrite"):
        pretrain(_cfg(tiny_manifest, out, "train.max_steps=1"))
    assert ck.load_checkpoint(out / "checkpoints" / "last.pt")["run_id"] == first["run_id"]
    second = pretrain(_cfg(tiny_manifest, out, "train.max_steps=1", "train.overwrite=true"))
    assert second["run_id"] != first["run_id"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in lines} == {second["run_id"]}
    assert json.loads((out / "run.json").read_text())["run_id"] == second["run_id"]


def test_stale_lock_is_taken_over_and_live_lock_refused(tmp_path, tiny_manifest, no_expensive_work):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    lock = {"pid": dead.pid, "host": socket.gethostname(), "run_id": "old"}
    (out / ".lock").write_text(json.dumps(lock))
    (out / "checkpoints").mkdir()
    stale_tmp = out / "checkpoints" / ".step_00000002.pt.tmp-999999"
    stale_tmp.write_bytes(b"half a checkpoint")
    with pytest.raises(_Boom):                 # got past the lock: stale lock and temp file removed
        pretrain(_cfg(tiny_manifest, out, "train.resume=auto"))
    assert not stale_tmp.exists() and not (out / ".lock").exists()
    (out / ".lock").write_text(json.dumps({**lock, "pid": os.getpid(), "start_ticks": None}))
    with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
        pretrain(_cfg(tiny_manifest, out, "train.resume=auto"))


# ----------------------------------------------------------------------------- resume policy


@pytest.fixture(scope="module")
def base_run(tiny_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    pretrain(_cfg(tiny_manifest, out, "train.max_steps=2"))
    return out


def _copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


@pytest.mark.parametrize("change, msg", [
    ("train.seed=1", "train.seed is 0 in the checkpoint, 1 now"),
    ("flow.estimator=farneback", "flow.estimator is 'dis_fast' in the checkpoint"),
    ("model.feat_dim=64", "model.feat_dim"),
])
def test_resume_refuses_changes_that_define_the_run(base_run, tiny_manifest, tmp_path, change, msg,
                                                    no_expensive_work):
    out = _copy_run(base_run, tmp_path)
    with pytest.raises(UserError, match=msg):
        pretrain(_cfg(tiny_manifest, out, "train.max_steps=3", "train.resume=auto", change))


def test_resume_refuses_another_manifest_of_the_same_size(base_run, tiny_manifest, tmp_path, no_expensive_work):
    out = _copy_run(base_run, tmp_path)
    text = tiny_manifest.read_text()
    other = tiny_manifest.parent / "same_size.jsonl"
    other.write_text(text.replace('"fps": 25.0', '"fps": 24.0', 1))
    try:
        assert other.stat().st_size == tiny_manifest.stat().st_size and other.read_text() != text
        with pytest.raises(UserError, match="is not the manifest .* was trained on"):
            pretrain(_cfg(other, out, "train.max_steps=3", "train.resume=auto"))
    finally:
        other.unlink()


def test_resume_auto_ignores_another_runs_checkpoints(base_run, tiny_manifest, tmp_path, no_expensive_work):
    out = _copy_run(base_run, tmp_path)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    state = ck.load_checkpoint(out / "checkpoints" / "last.pt")
    ck.save_checkpoint(out / "checkpoints" / "last.pt", {**state, "run_id": "someone-else"})
    with pytest.raises(UserError, match=f"none of run {run_id} that loads"):
        pretrain(_cfg(tiny_manifest, out, "train.max_steps=3", "train.resume=auto"))


def test_resume_warns_about_optimizer_changes_and_records_them(base_run, tiny_manifest, tmp_path, caplog):
    out = _copy_run(base_run, tmp_path)
    res = pretrain(_cfg(tiny_manifest, out, "train.max_steps=3", "train.resume=auto", "optim.lr=1e-3"))
    assert res["steps"] == 3
    assert "optim.lr: 0.01 -> 0.001" in caplog.text
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("optim.lr: 0.01 -> 0.001" in " ".join(r.get("resume_changes", [])) for r in rec)


# ----------------------------------------------------------------------------- checkpoints, metrics, RNGs


def test_step_checkpoints_are_pruned_and_metrics_carry_run_id_and_data_wait(tiny_manifest, tmp_path, capsys):
    import random
    draws = []
    res = pretrain(_cfg(tiny_manifest, tmp_path, "train.max_steps=5", "train.ckpt_every=1",
                        "train.keep_checkpoints=2", "train.seed=3"),
                   on_step=lambda s, m, b: draws.append((random.random(), float(np.random.rand()))) if s == 1 else None)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "step_00000004.pt", "step_00000005.pt"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "step" in r and not r.get("final")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(r["run_id"] == res["run_id"] and 0.0 <= r["data_wait_share"] <= 1.0 for r in steps)
    assert "data wait" in capsys.readouterr().out
    # Python and NumPy RNGs are seeded from train.seed (same seed, same draws)
    import random as r2
    r2.seed(3)
    np.random.seed(3)
    assert draws == [(r2.random(), float(np.random.rand()))]


@pytest.mark.parametrize("steps", [2, 3])   # 3 steps is the tiny manifest's whole epoch
def test_last_checkpoint_on_a_step_checkpoint_is_a_link_to_the_same_state(tiny_manifest, tmp_path, monkeypatch,
                                                                           steps):
    args = (f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.seed=1")
    pretrain(_cfg(tiny_manifest, tmp_path / "linked", *args))
    from mscl_stream.train import run
    monkeypatch.setattr(run, "link_checkpoint", lambda src, path: False)      # the plain full write
    pretrain(_cfg(tiny_manifest, tmp_path / "written", *args))
    ck_dir = tmp_path / "linked" / "checkpoints"
    assert (ck_dir / "last.pt").samefile(ck_dir / f"step_{steps:08d}.pt")
    linked, written = (ck.load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("linked", "written"))
    assert linked.pop("run_id") != written.pop("run_id")
    for state in (linked, written):
        state["config"]["train"].pop("out_dir")
    _same(linked, written, "last.pt")


# ----------------------------------------------------------------------------- diverged weights


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (what the old guard missed)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_gradients_leave_the_last_finite_state(tiny_manifest, tmp_path, monkeypatch):
    from mscl_stream.models import mscl
    forward = mscl.MSCL.forward
    calls = {"n": 0}

    def poisoned(self, inp):
        out = forward(self, inp)
        calls["n"] += 1
        if calls["n"] >= 2:        # from the second step on, the gradients are NaN (the loss is not)
            out["loss"] = _NanGrad.apply(out["loss"])
        return out
    monkeypatch.setattr(mscl.MSCL, "forward", poisoned)
    after_first = {}

    def on_step(step, model, batch):
        if step == 1:
            after_first.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    with pytest.raises(UserError, match="non-finite steps in a row"):
        pretrain(_cfg(tiny_manifest, tmp_path, "train.max_steps=6", "train.max_bad_steps=2"), on_step=on_step)
    state = ck.load_checkpoint(tmp_path / "checkpoints" / "diverged.pt")
    assert state["bad_total"] == 2 and state["step"] == 3
    # everything (weights, key encoders, queues and their pointers, BN statistics) is as after step 1
    assert set(state["model"]) == set(after_first)
    for k, v in after_first.items():
        assert torch.equal(state["model"][k], v), k
    assert all(torch.isfinite(b["momentum_buffer"]).all() for b in state["optimizer"]["state"].values())


def test_fused_sgd_skip_changes_nothing_without_a_host_read():
    from mscl_stream.train.guard import StepGuard
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    guard = StepGuard(net, opt, torch.device("cpu"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    guard.before_forward()
    loss = net(torch.randn(5, 3)).sum() * float("nan")         # the forward moved the BN statistics
    loss.backward()
    ok = guard.check(loss, torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))
    guard.optimizer_step(opt, ok)                               # fused: found_inf, no .item()
    guard.after_step(ok)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a skipped first step leaves zero momentum buffers (torch would leave uninitialised memory)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in net.parameters())
    assert guard.publish(ok, 1) == [(1, False)]
    # the next good step is exactly plain SGD's first step: buf = grad, p -= lr * (grad + wd * p)
    opt.zero_grad()
    x = torch.randn(5, 3)
    guard.before_forward()
    loss = net(x).square().mean()
    loss.backward()
    want = {n: (p - 0.1 * (p.grad + 1e-4 * p)).detach() for n, p in net.named_parameters()}
    guard.optimizer_step(opt, guard.check(loss))
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[n])


def test_eval_refuses_non_finite_weights_and_features(tmp_path, tiny_manifest, base_run):
    from mscl_stream.eval.features import build_r3d, extract_features
    from mscl_stream.data.manifest import read_manifest
    state = ck.load_checkpoint(base_run / "checkpoints" / "last.pt")
    key = "rgb_encoder.layer1.0.conv1.0.weight"
    assert key in state["model"]
    state["model"][key] = state["model"][key] * float("nan")
    ck.save_checkpoint(tmp_path / "nan.pt", state)
    with pytest.raises(UserError, match="hold NaN/inf .*diverged"):
        build_r3d(str(tmp_path / "nan.pt"))

    class NanEncoder(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))
    cfg = _cfg(tiny_manifest, tmp_path)
    with pytest.raises(UserError, match="non-finite .* features"):
        extract_features(NanEncoder(), read_manifest(tiny_manifest)[:2], cfg, "cpu")


def test_sigint_checkpoints_at_the_step_boundary_and_exits_130(tiny_manifest, tmp_path, monkeypatch, capsys):
    from mscl_stream import cli
    from mscl_stream.models import mscl
    forward, calls = mscl.MSCL.forward, {"n": 0}

    def interrupted(self, inp):
        calls["n"] += 1
        if calls["n"] == 2:              # Ctrl-C in the middle of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, inp)
    monkeypatch.setattr(mscl.MSCL, "forward", interrupted)
    dump_config(_cfg(tiny_manifest, tmp_path / "run", "train.max_steps=6"), tmp_path / "c.yaml")
    handler = signal.getsignal(signal.SIGINT)
    assert cli.main(["pretrain", "-c", str(tmp_path / "c.yaml")]) == 130
    assert "stopped by SIGINT at step 2" in capsys.readouterr().err
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run")] == [2] and calls["n"] == 2
    assert signal.getsignal(signal.SIGINT) is handler and not (tmp_path / "run" / ".lock").exists()


# ----------------------------------------------------------------------------- processes: locks, signals, kill -9

KILL_MID_WRITE = """
import os, signal, sys
import torch
real = torch.save
def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("step") == int(os.environ["KILL_AT_STEP"]) and "ranks" in obj:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
from mscl_stream.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _same(a, b, where: str) -> None:
    """Exact equality of nested checkpoint state (tensors bit for bit, floats of the model to 1e-6)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), where
    else:
        assert a == b, where


def _full_state(path: Path) -> dict:
    st = ck.load_checkpoint(path)
    return {k: st[k] for k in ("model", "optimizer", "ranks", "step", "epoch", "bad_total")}


@pytest.mark.slow
def test_locks_signals_and_kill9_resume_to_the_uninterrupted_state(tiny_manifest, tmp_path):
    """One uninterrupted reference run; a run stopped by SIGTERM (while a second run is refused its
    folder) and resumed; a run killed with SIGKILL in the middle of a checkpoint write and resumed.
    Both resumed runs must end in the reference's full state: model (with key encoders, queues and BN
    statistics), optimizer, every rank's loader position and RNGs (Python, NumPy, torch, augmentation),
    step, epoch."""
    steps = 6

    def config(name: str, *extra: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        dump_config(_cfg(tiny_manifest, tmp_path / name, f"train.max_steps={steps}", *extra), path)
        return path

    ref = _cli("pretrain", "-c", str(config("ref")))
    term_cfg = config("term", "train.ckpt_every=0")
    term = _cli("pretrain", "-c", str(term_cfg))

    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and term.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.02)
    term.send_signal(signal.SIGSTOP)           # held still (alive, holding its lock) while a second run tries
    assert term.poll() is None, "the run ended before the test could interrupt it"
    second = _cli("pretrain", "-c", str(term_cfg), "--resume", "auto")       # same folder
    out2, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and "Traceback" not in out2, out2
    assert out2.strip().splitlines()[-1].startswith("mscl-stream pretrain: error: train.out_dir:")
    assert f"in use by process {term.pid}" in out2
    term.send_signal(signal.SIGTERM)           # delivered on SIGCONT: stop at the next step boundary
    term.send_signal(signal.SIGCONT)
    out, _ = term.communicate(timeout=120)
    assert term.returncode == 143, out
    assert "stopped by SIGTERM" in out
    stopped = ck.list_checkpoints(tmp_path / "term")
    assert stopped and 1 <= stopped[-1][0] < steps
    resumed = _cli("pretrain", "-c", str(term_cfg), "--resume", "auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in out, out

    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    kill_cfg = config("kill", "train.ckpt_every=2")
    killed = _cli("pretrain", "-c", str(kill_cfg), script=_write(tmp_path / "kill.py", KILL_MID_WRITE),
                  env={"KILL_AT_STEP": "4"})
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, out
    ckdir = tmp_path / "kill" / "checkpoints"
    assert [p.name for p in ckdir.glob(".step_00000004.pt.tmp-*")], "no half-written file left to clean up"
    assert (tmp_path / "kill" / ".lock").exists()
    resumed = _cli("pretrain", "-c", str(kill_cfg), "--resume", "auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "stale lock" in out and "stale temporary checkpoint" in out and "step_00000002.pt" in out
    assert not list(ckdir.glob(".*.tmp-*"))

    want = _full_state(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert want["step"] == steps
    for name in ("term", "kill"):
        _same(want, _full_state(tmp_path / name / "checkpoints" / "last.pt"), name)
        ids = {json.loads(x).get("run_id") for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()}
        assert len(ids) == 1, ids                         # the resumed run continued the same run


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
