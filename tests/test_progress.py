"""Progress reporting: plain lines off a terminal (what CI logs and tests see), a tqdm bar on one."""

from __future__ import annotations

import io
import logging

import pytest

from mscl_stream import progress as P
from mscl_stream.train.metrics import format_progress


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    return c


def test_plain_lines_count_rate_eta_and_interval(clock):
    lines: list[str] = []
    p = P.Progress(4, "index", unit="file", interval=5.0, plain=lines.append, bar=False)
    clock.t = 102.0
    p.update(1)                       # the first update always reports: 1 file in 2 s
    clock.t = 104.0
    p.update(2)                       # 2 s after the last line: quiet
    clock.t = 108.0
    p.update(3)                       # 6 s after: 3 files in 8 s = 0.375/s, 1 left -> 2.67 s
    clock.t = 108.5
    p.update(4)                       # the end always reports
    assert lines == ["index: 1/4 files, 0.5/s, ETA 6 s", "index: 3/4 files, 0.4/s, ETA 3 s",
                     "index: 4/4 files, 0.5/s, ETA 0 s"]
    assert not p.is_bar


def test_resumed_count_rates_only_this_process(clock):
    lines: list[str] = []
    p = P.Progress(100, "pretrain", unit="step", initial=40, interval=1.0, plain=lines.append, bar=False)
    clock.t = 110.0
    p.update(50)                      # 10 steps here in 10 s; 50 left -> 50 s
    assert lines == ["pretrain: 50/100 steps, 1.0/s, ETA 50 s"]


def test_caller_lines_replace_the_standard_one_and_disabled_is_silent(clock):
    lines: list[str] = []
    p = P.Progress(10, "pretrain", unit="step", interval=None, plain=lines.append, bar=False)
    p.update(1)                       # interval None: nothing of its own
    p.update(2, postfix="ignored off a terminal", line="step 2/10 | my line")
    assert lines == ["step 2/10 | my line"]
    off = P.Progress(3, "x", plain=lines.append, enabled=False, bar=True)
    off.update(3, line="never")
    off.close()
    assert lines == ["step 2/10 | my line"] and not off.is_bar


def test_default_goes_to_stderr_without_carriage_returns(capsys):
    with P.Progress(2, "transcode") as p:          # pytest's captured stderr is no terminal
        assert not p.is_bar
        p.update(1)
        p.update(2)
    out = capsys.readouterr()
    assert out.out == "" and "\r" not in out.err
    assert [x.split(",")[0] for x in out.err.splitlines()] == ["transcode: 1/2 files", "transcode: 2/2 files"]


def test_bar_on_a_terminal_shows_count_rate_postfix_and_gives_logging_back():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, lines = Tty(), []
    root = logging.getLogger()
    before = list(root.handlers)
    p = P.Progress(5, "pretrain", unit="step", plain=lines.append, file=stream)
    assert p.is_bar
    p.update(2)
    p.update(5, postfix="3.0 clips/s, loss 1.2345", line="not printed on a terminal")
    p.close()
    text = stream.getvalue()
    assert "\r" in text and "pretrain" in text and "5/5" in text and "step/s" in text
    assert "loss 1.2345" in text and lines == []
    assert root.handlers == before


def test_format_progress_eta_of_a_resumed_run():
    # 10 steps done in this process (250 -> 260) in 100 s: 740 left at 10 s each
    assert "eta 2:03:20" in format_progress(260, 1000, 100.0, 1.0, start=250)
    assert "eta ?" in format_progress(250, 1000, 0.0, 0.0, start=250)
