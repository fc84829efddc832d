"""Checkpoints: atomic writes, weights_only round trip, clear errors, latest lookup, RNG round trip."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from mscl_stream.errors import UserError
from mscl_stream.train import checkpoint as ck


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4, generator=g)).sum().backward()
    opt.step()
    return model, opt, {
        "format": 1, "step": 7, "epoch": 1,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "config": {"model": {"feat_dim": 128, "queue_size": 256}, "data": {"frames_per_clip": 8},
                   "train": {"out_dir": "runs/x"}},
        "sampler": {"epoch": 1, "cursor": 40, "seed": 0},
        "rng": ck.rng_state(),
        "misc": [1.5, "text", None, True, (2, 3), torch.Size([2, 3])],
    }


def test_round_trip_weights_only(tmp_path):
    model, opt, state = _state()
    path = ck.save_checkpoint(tmp_path / "a.pt", state)
    back = ck.load_checkpoint(path)
    assert back["step"] == 7 and back["sampler"] == {"epoch": 1, "cursor": 40, "seed": 0}
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    # The loaded optimizer state resumes the same momentum buffers.
    opt2 = torch.optim.SGD(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    bufs = [s["momentum_buffer"] for s in opt.state.values()]
    bufs2 = [s["momentum_buffer"] for s in opt2.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs2))
    # Independently: plain torch.load with weights_only=True accepts the file.
    assert torch.load(path, weights_only=True)["misc"][1] == "text"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_unsafe_state_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="weights_only"):
        ck.save_checkpoint(tmp_path / "a.pt", {"arr": np.zeros(3)})
    with pytest.raises(TypeError):
        ck.save_checkpoint(tmp_path / "b.pt", {"obj": object()})
    assert not list(tmp_path.iterdir())


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ck.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")   # some bytes reach the temp file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    # a one-line error naming the file, the cause and the free space, not a traceback
    with pytest.raises(UserError, match=r"cannot write checkpoint .*ckpt\.pt: disk full \(.* GB free there\)"):
        ck.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]   # the temp file is gone

    # A crash between writing and renaming (os.replace never runs) also leaves the old file.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"step": 3})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 1


def test_corrupt_and_truncated_files_are_one_line_user_errors(tmp_path):
    good = ck.save_checkpoint(tmp_path / "good.pt", {"step": 1, "w": torch.arange(1000.0)})
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all\n" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("trunc.pt", "junk.pt", "empty.pt"):
        with pytest.raises(UserError) as ei:
            ck.load_checkpoint(tmp_path / name)
        msg = str(ei.value)
        assert "\n" not in msg and name in msg and "checkpoint" in msg
    with pytest.raises(UserError, match="no such checkpoint"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="expected a dict"):
        ck.load_checkpoint(tmp_path / "list.pt")


def test_expect_mismatch_is_an_error_not_a_fresh_start(tmp_path):
    _, _, state = _state()
    path = ck.save_checkpoint(tmp_path / "a.pt", state)
    same = {"model": {"feat_dim": 128, "queue_size": 256}, "data": {"frames_per_clip": 8}}
    exp = ck.expect_from_config(same, ["model", "data.frames_per_clip"])
    assert exp == {"config.model": same["model"], "config.data.frames_per_clip": 8}
    ck.load_checkpoint(path, expect=exp)
    ck.load_checkpoint(path, expect={"format": 1})

    with pytest.raises(UserError, match=r"config\.model\.queue_size is 256 in the checkpoint, 512 now"):
        ck.load_checkpoint(path, expect={"config.model": {"feat_dim": 128, "queue_size": 512}})
    with pytest.raises(UserError, match=r"config\.model\.extra missing in the checkpoint"):
        ck.load_checkpoint(path, expect={"config.model": {"feat_dim": 128, "queue_size": 256, "extra": 1}})
    with pytest.raises(UserError, match="has no 'config.flow.estimator'"):
        ck.load_checkpoint(path, expect={"config.flow.estimator": "raft_small"})
    with pytest.raises(UserError, match="format is 1 in the checkpoint, 2 now"):
        ck.load_checkpoint(path, expect={"format": 2})


def test_load_model_state_mismatch_one_line():
    src = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ck.load_model_state(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), src.state_dict())
    with pytest.raises(UserError) as ei:
        ck.load_model_state(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)), src.state_dict())
    msg = str(ei.value)
    # 0.weight (3,4)->(5,4), 0.bias (3,)->(5,), 1.weight (2,3)->(2,5)
    assert "\n" not in msg and "3 shape mismatches" in msg and "0.weight: checkpoint (3, 4) vs (5, 4)" in msg
    with pytest.raises(UserError, match="2 missing keys .* 2 unexpected keys"):
        ck.load_model_state(nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2)), src.state_dict())


def test_find_resumable_and_keep(tmp_path):
    assert ck.find_resumable(tmp_path, "A") == (None, None)
    for step in (5, 100, 20, 3000):
        ck.save_step_checkpoint(tmp_path, step, {"step": step, "run_id": "A"}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000020.pt", "step_00000100.pt", "step_00003000.pt"]
    # a stray temp file from a crashed save is never picked
    (tmp_path / "checkpoints" / ".step_00009999.pt.tmp-1").write_bytes(b"partial")
    latest, state = ck.find_resumable(tmp_path, "A")
    assert latest.name == "step_00003000.pt" and state["step"] == 3000
    ck.save_step_checkpoint(tmp_path, 3500, {"step": 3500, "run_id": "A"}, keep=0)
    assert len(ck.list_checkpoints(tmp_path)) == 4
    # last.pt of a finished run is newer than its step files -> picked; diverged.pt never is
    ck.save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 4000, "run_id": "A"})
    os.utime(tmp_path / "checkpoints" / "step_00003500.pt", ns=(1, 1))   # make sure "older"
    ck.save_checkpoint(tmp_path / "checkpoints" / "diverged.pt", {"step": 3999, "run_id": "A"})
    assert ck.find_resumable(tmp_path, "A")[1]["step"] == 4000
    # newer files of another run, or files that do not load, are passed over
    ck.save_checkpoint(tmp_path / "checkpoints" / "step_00004500.pt", {"step": 4500, "run_id": "B"})
    (tmp_path / "checkpoints" / "step_00004600.pt").write_bytes(b"truncated")
    assert ck.find_resumable(tmp_path, "A")[1]["step"] == 4000
    assert ck.find_resumable(tmp_path, "B")[1]["step"] == 4500
    assert ck.find_resumable(tmp_path, "C") == (None, None)
    deleted = ck.prune_checkpoints(tmp_path, keep=1)
    assert len(deleted) == 5 and {p.name for p in (tmp_path / "checkpoints").iterdir()} == {
        "last.pt", "diverged.pt", "step_00004600.pt", ".step_00009999.pt.tmp-1"}


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)           # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    ck.save_checkpoint(tmp_path / "r.pt", {"rng": ck.rng_state()})

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())

    first = draw()
    draw()  # move all generators on
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert draw() == first
