"""Metrics: JSONL content, stage timer accumulation, progress line, FLOPs and MFU by hand."""

import json
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mscl_stream.train import flops as FL
from mscl_stream.train import metrics as M
from mscl_stream.train import timing as T


def test_jsonl_records(tmp_path):
    logger = M.MetricsLogger(tmp_path, is_main=True, tensorboard=True, jsonl=True)
    logger.log({"step": 10, "epoch": 0, "lr": 0.01, "loss/total": torch.tensor(2.5), "clips_per_s": 12.0,
                "time/flow": 0.25, "gpu_mem_gb": 1.5})
    logger.log({"step": 20, "loss/total": float("nan"), "stage_seconds": {"flow": 1.0}, "ends": [0.5, 1.0]})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    a, b = (json.loads(x) for x in lines)
    assert a["step"] == 10 and a["loss/total"] == 2.5 and a["lr"] == 0.01 and a["time/flow"] == 0.25
    assert abs(a["time"] - time.time()) < 60
    assert b["loss/total"] is None          # NaN written as null: every line stays valid JSON
    assert b["stage_seconds"] == {"flow": 1.0} and b["ends"] == [0.5, 1.0]
    # appending (resume) keeps the earlier lines
    logger = M.MetricsLogger(tmp_path, is_main=True, tensorboard=False)
    logger.log({"step": 30})
    logger.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_non_main_rank_writes_nothing(tmp_path):
    logger = M.MetricsLogger(tmp_path / "run", is_main=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_stage_timer_per_step_medians_warmup_and_gap():
    timer = T.StageTimer("cpu", warmup_steps=1)
    timer.begin_step()
    with timer("flow"):
        time.sleep(0.2)                   # warm-up step: left out of everything
    for _ in range(3):
        timer.begin_step()
        for _ in range(2):                # a stage twice in a step counts once, summed
            with timer("flow"):
                time.sleep(0.015)
        time.sleep(0.02)                  # outside any stage: the gap
        with timer("optimizer"):
            time.sleep(0.01)
    timer.begin_step()
    s = timer.summary()                   # the three closed steps after warm-up
    assert 0.03 <= s["time/flow"] < 0.03 + 0.1           # sleeps are lower bounds (a loaded machine adds)
    assert 0.01 <= s["time/optimizer"] < 0.01 + 0.1
    assert 0.06 <= s["time/step"] < 0.06 + 0.2
    assert 0.02 <= s["time/stage_gap"] < 0.02 + 0.1
    assert timer.counts() == {"flow": 3, "optimizer": 3}
    assert timer.summary() == {}          # window reset
    rep = timer.report()
    assert rep["steps"] == 3 and rep["warmup_steps"] == 1 and rep["method"] == "perf_counter"
    assert abs(rep["stage_sum_median_s"] + rep["gap_median_s"] - rep["step_median_s"]) < 0.01
    assert 0.1 < rep["gap_share"] < 0.5
    assert timer.totals()["flow"] < 0.2   # the warm-up step's 0.2 s is not in the totals


def test_stage_timer_abandoned_step_is_not_a_step():
    # the loop's end-of-epoch probe begins a step, waits for data, finds none: that is no training step
    timer = T.StageTimer("cpu")
    for _ in range(2):
        timer.begin_step()
        with timer("data_wait"):
            pass
        with timer("forward_backward"):
            time.sleep(0.03)
        timer.begin_step()                # the probe (closes the real step)
        with timer("data_wait"):
            pass
        timer.abandon_step()
    rep = timer.report()
    assert rep["steps"] == 2 and timer.counts()["forward_backward"] == 2
    assert timer.counts()["data_wait"] == 2            # the probes' waits are not counted
    assert rep["step_median_s"] >= 0.03                # a halved median would be ~0.015


def test_stage_timer_disabled_and_exceptions():
    timer = T.StageTimer("cpu")
    timer.enabled = False
    timer.begin_step()
    with timer("flow"):
        time.sleep(0.01)
    assert timer.totals() == {}
    timer.enabled = True
    timer.begin_step()
    with pytest.raises(RuntimeError):
        with timer("forward_backward"):   # an exception still records the stage's time
            raise RuntimeError("x")
    assert timer.counts()["forward_backward"] == 1


def test_format_progress():
    line = M.format_progress(250, 1000, 100.0, 41.25)
    # 250 steps in 100 s -> 0.4 s/step -> 750 steps left = 300 s
    assert line == "step 250/1000 (25.0%) | 41.2 clips/s | elapsed 0:01:40 | eta 0:05:00"
    assert "eta ?" in M.format_progress(0, 10, 0.0, 0.0)
    assert "elapsed 1:01:01" in M.format_progress(1, 2, 3661.0, 1.0)


def test_peak_and_mfu():
    assert FL.peak_flops("cpu") is None
    assert FL.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert FL.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert FL.peak_flops("NVIDIA H200") == 989e12
    assert FL.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert FL.peak_flops("Some Future GPU") is None
    # 100 GFLOP per clip at 1000 clips/s on a 989 TFLOP/s part
    assert FL.mfu(100e9, 1000.0, 989e12) == pytest.approx(100e12 / 989e12)
    assert FL.mfu(100e9, 1000.0, None) is None


@dataclass
class _Inputs:
    x: torch.Tensor


class _Net(nn.Module):
    def __init__(self, a, b, c):
        super().__init__()
        self.l1, self.l2 = nn.Linear(a, b, bias=False), nn.Linear(b, c, bias=False)

    def forward(self, inp):
        return {"loss": self.l2(torch.relu(self.l1(inp.x))).square().mean()}


def test_flops_per_clip_by_hand():
    a, b, c, batch = 16, 32, 8, 4
    net = _Net(a, b, c)
    got = FL.estimate_flops_per_clip(net, _Inputs(torch.randn(batch, a)))
    # forward: 2ab + 2bc; backward: l2 grad-weight 2bc + grad-input 2bc, l1 grad-weight 2ab (the input
    # needs no gradient) -> 4ab + 6bc per sample
    assert got == 4 * a * b + 6 * b * c
    assert net.l1.weight.grad is not None
    conv = nn.Conv3d(3, 4, kernel_size=(1, 3, 3), bias=False)
    fwd = FL.count_flops(lambda: conv(torch.randn(2, 3, 2, 5, 5)))
    # output 2 x 4 x 2 x 3 x 3 positions, each 3*1*3*3 multiply-adds
    assert fwd == 2 * (2 * 4 * 2 * 3 * 3) * (3 * 9)
