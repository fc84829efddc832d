"""The run machinery with a loop that is not MSCL: any TrainState checkpoints, stops and resumes exactly."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from mscl_stream.config import load_config
from mscl_stream.distributed import DistInfo
from mscl_stream.errors import Interrupted, UserError
from mscl_stream.train import checkpoint as ck
from mscl_stream.train.run import Run

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, backend=None)


class LinearLoop:
    """A TrainState: a linear model fitted by SGD with momentum to a seeded stream of random batches."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.data = torch.Generator().manual_seed(1)
        self.step = 0
        self.calls = 0          # steps trained by this process

    def train_step(self) -> None:
        x = torch.randn(4, 3, generator=self.data)
        loss = (self.model(x) - x.sum(1, keepdim=True)).square().mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step += 1
        self.calls += 1

    def position(self) -> dict:
        return {"step": self.step, "epoch": 0}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def rank_state(self) -> dict:
        return {"data_rng": self.data.get_state()}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.data.set_state(rank_state["data_rng"])
        self.step = state["step"]


def _train(out, *extra: str, total: int = 6, stop_at: int | None = None) -> LinearLoop:
    """The loop around LinearLoop.train_step that pretraining's fit() also is: checkpoints every 2 steps."""
    cfg = load_config(None, [f"train.out_dir={out}", "train.device=cpu", "log.tensorboard=false", *extra])
    with Run(cfg, ONE_PROCESS, name="linear", must_match=("train.seed",), may_change=()) as run:
        run.choose_resume()
        loop = LinearLoop()
        run.restore(loop)
        run.begin(total, initial=loop.step)
        while loop.step < total:
            loop.train_step()
            run.report(loop.step, {"step": loop.step}, rate=1.0, elapsed=1.0)
            if loop.step == stop_at:
                run.signals.signum = signal.SIGTERM          # what the SIGTERM handler records
            if run.should_stop(logged=True):
                raise run.interrupted(loop.step, run.checkpoint("step", loop))
            if loop.step % 2 == 0:
                run.checkpoint("step", loop)
        run.checkpoint("last", loop)
        run.finish({"steps": loop.step})
    return loop


def test_another_loop_stops_on_a_signal_and_resumes_to_the_uninterrupted_state(tmp_path):
    reference = _train(tmp_path / "reference")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 3") as ei:
        _train(tmp_path / "run", stop_at=3)
    assert ei.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is handler
    assert not (tmp_path / "run" / ".lock").exists()
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run")] == [2, 3]
    with pytest.raises(UserError, match="train.seed"):            # the loop's own must-match keys
        _train(tmp_path / "run", "train.resume=auto", "train.seed=1")
    resumed = _train(tmp_path / "run", "train.resume=auto")
    assert resumed.calls == 3                                      # steps 4-6, from step 3's checkpoint
    want = {**reference.model.state_dict(), **{f"momentum{i}": st["momentum_buffer"] for i, st in
                                                reference.opt.state_dict()["state"].items()}}
    got = {**resumed.model.state_dict(), **{f"momentum{i}": st["momentum_buffer"] for i, st in
                                             resumed.opt.state_dict()["state"].items()}}
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(reference.data.get_state(), resumed.data.get_state())
    # the run ended on a step checkpoint: last.pt is that file; one run id throughout
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "last.pt").samefile(ckpts / "step_00000006.pt")
    last = ck.load_checkpoint(ckpts / "last.pt")
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert last["step"] == 6 and last["run_id"] == run_id and len(last["ranks"]) == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in records if not r.get("final")] == [1, 2, 3, 4, 5, 6]
