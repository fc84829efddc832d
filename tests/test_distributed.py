"""Distributed helpers: single-process identity and a real 2-process gloo job on localhost."""

import json
import textwrap

import pytest
import torch

from conftest import run_ranks
from mscl_stream.errors import UserError
from mscl_stream import distributed as D

WORKER = textwrap.dedent("""
    import json, sys, torch
    from mscl_stream import distributed as D
    info = D.init_distributed(backend="auto", device="cpu")
    r = info.rank
    # rank r contributes r + 2 rows whose values encode (rank, row): unequal shares
    x = torch.stack([torch.tensor([100.0 * r + i, -r]) for i in range(r + 2)])
    cat = D.all_gather_cat(x)
    same = D.all_gather_cat(torch.full((3,), float(r)), same_size=True)
    objs = D.all_gather_objects({"rank": r, "cursor": 10 * r})
    chosen = D.broadcast_object("picked-by-%d" % r)
    mean = D.all_reduce_mean(torch.tensor(float(r + 1)))
    D.barrier()
    out = {"info": [info.rank, info.world_size, info.local_rank, str(info.device), info.is_main, info.backend],
           "cat": cat.tolist(), "same": same.tolist(), "objs": objs, "chosen": chosen, "mean": mean.item(),
           "is_main": D.is_main(), "world": D.get_world_size()}
    # a second init joins nothing and owns nothing: releasing it keeps the group; the creator's release ends it
    again = D.init_distributed(backend="auto", device="cpu")
    D.release(again)
    kept = torch.distributed.is_initialized() and D.get_world_size() == 2
    D.release(info)
    out["owns"] = [info.owns_group, again.owns_group, kept, torch.distributed.is_initialized()]
    json.dump(out, open(sys.argv[1], "w"))
""")


def test_two_process_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    world = 2
    run_ranks(script, lambda r: [str(tmp_path / f"r{r}.json")], world, timeout=90)
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(world)]
    want_cat = [[0.0, 0.0], [1.0, 0.0], [100.0, -1.0], [101.0, -1.0], [102.0, -1.0]]
    for r, got in enumerate(res):
        assert got["info"] == [r, 2, r, "cpu", r == 0, "gloo"]
        assert got["cat"] == want_cat
        assert got["same"] == [0.0] * 3 + [1.0] * 3
        assert got["objs"] == [{"rank": 0, "cursor": 0}, {"rank": 1, "cursor": 10}]
        assert got["chosen"] == "picked-by-0"
        assert got["mean"] == pytest.approx(1.5)
        assert got["is_main"] == (r == 0) and got["world"] == 2
        assert got["owns"] == [True, False, True, False]


def test_single_process_identity(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.backend, info.device) == (0, 1, True, None, torch.device("cpu"))
    assert not info.owns_group          # no process group, nothing to leave
    x = torch.randn(4, 3)
    assert D.all_gather_cat(x) is x
    assert D.all_gather_objects(5) == [5] and D.broadcast_object("a") == "a"
    D.barrier()
    D.cleanup()


def test_partial_env_and_bad_backend(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK.*not set"):
        D.init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(UserError, match="nccl needs CUDA"):
        D.init_distributed(backend="nccl", device="cpu")
