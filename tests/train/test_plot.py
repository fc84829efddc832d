"""`mscl-stream plot`: the plotted lines hold the file's values, other runs are left out, errors are one line.

The metrics files here are written by hand with known values; the expected lines are those values,
read off the figure's own Line2D objects (what is drawn), not recomputed by the code under test.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mscl_stream.cli import main
from mscl_stream.errors import UserError
from mscl_stream.train import plot as plot_mod
from mscl_stream.train.plot import figure, plot_run, plot_run_or_warn, read_metrics

B1 = {"step": 1, "run_id": "B", "lr": 0.1, "clips_per_s": 2.0, "data_wait_share": 0.5,
      "loss/rgb_rgb": 1.5, "loss/lmcl": 0.5, "loss/loss": 2.0}
B2 = {"step": 2, "run_id": "B", "lr": 0.05, "clips_per_s": 3.0, "data_wait_share": 0.25,
      "loss/rgb_rgb": 1.0, "loss/lmcl": 0.25, "loss/loss": 1.25,
      "time/flow": 0.25, "time/forward_backward": 0.5, "time/step": 1.0, "time/stage_gap": 0.25}
B3_FIRST = {"step": 3, "run_id": "B", "lr": 0.02, "clips_per_s": 4.0, "data_wait_share": 0.1,
            "loss/rgb_rgb": 0.5, "loss/lmcl": 0.25, "loss/loss": 0.75, "time/flow": 0.1, "time/step": 0.5}
RESUME_NOTE = {"step": 2, "run_id": "B", "resume_changes": ["optim.lr: 0.1 -> 0.05"]}
B3_AGAIN = {"step": 3, "run_id": "B", "lr": 0.01, "clips_per_s": 5.0, "data_wait_share": None,
            "loss/rgb_rgb": 0.5, "loss/lmcl": 0.125, "loss/loss": 0.625}


def _write(folder: Path, lines: list, run_id: str | None = "B") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                                  for x in lines))
    if run_id is not None:
        (folder / "run.json").write_text(json.dumps({"run_id": run_id, "seed": 0}))
    return folder


def _lines(fig, title_start: str) -> dict:
    (ax,) = [a for a in fig.axes if a.get_title().startswith(title_start)]
    return {ln.get_label(): ln for ln in ax.get_lines()}


def _xy(line) -> tuple[list, list]:
    return [int(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


@pytest.fixture
def run(tmp_path) -> Path:
    old = [{"step": 1, "run_id": "A", "loss/loss": 99.0, "clips_per_s": 9.0},
           {"step": 2, "run_id": "A", "loss/loss": 98.0, "clips_per_s": 9.0}]
    return _write(tmp_path / "run", [*old, B1, B2, B3_FIRST, RESUME_NOTE, B3_AGAIN,
                                     {"final": True, "run_id": "B", "steps": 3, "clips_per_s": 4.5},
                                     '{"step": 4, "run_id": "B", "lo'])       # cut short by a kill


def test_plotted_lines_hold_the_files_values(run):
    m = read_metrics(run)
    assert m.run_id == "B" and [r["step"] for r in m.steps] == [1, 2, 3] and m.final["clips_per_s"] == 4.5
    fig = figure(m)

    loss = _lines(fig, "loss")
    assert set(loss) == {"rgb_rgb", "lmcl", "total (loss)"}
    assert _xy(loss["total (loss)"]) == ([1, 2, 3], [2.0, 1.25, 0.625])      # step 3: the resumed run's line
    assert _xy(loss["rgb_rgb"]) == ([1, 2, 3], [1.5, 1.0, 0.5])
    assert _xy(loss["lmcl"]) == ([1, 2, 3], [0.5, 0.25, 0.125])
    assert loss["total (loss)"].get_linewidth() > 2 * loss["lmcl"].get_linewidth()      # the total is bold

    assert _xy(_lines(fig, "throughput")["clips_per_s"]) == ([1, 2, 3], [2.0, 3.0, 5.0])
    assert _xy(_lines(fig, "learning rate")["lr"]) == ([1, 2, 3], [0.1, 0.05, 0.01])
    steps, wait = _xy(_lines(fig, "data-wait")["data_wait_share"])
    assert steps == [1, 2, 3] and wait[:2] == [0.5, 0.25] and math.isnan(wait[2])   # null -> a gap, not 0

    # stage shares only where stage times were logged (step 2; step 3's first line was replaced)
    stages = _lines(fig, "stage time")
    assert {k: _xy(v) for k, v in stages.items()} == {"flow": ([2], [0.25]), "forward_backward": ([2], [0.5]),
                                                      "outside stages": ([2], [0.25])}
    assert any("left out 2 line(s) of other runs (A: 2)" in n for n in m.notes)
    assert any("1 unreadable line(s) (line 9)" in n for n in m.notes)
    assert "left out 2 line(s)" in fig.get_suptitle()


def test_without_run_json_the_last_run_in_the_file_is_plotted(tmp_path):
    d = _write(tmp_path / "r", [B1, {"step": 1, "run_id": "C", "loss/loss": 7.0, "clips_per_s": 1.0}], run_id=None)
    m = read_metrics(d)
    assert m.run_id == "C" and [r["loss/loss"] for r in m.steps] == [7.0] and m.final is None
    assert any("(B: 1)" in n for n in m.notes)
    assert "not finished" in figure(m).get_suptitle()


def test_png_is_written_atomically_and_cli(run, tmp_path, capsys):
    import matplotlib.image

    out = plot_run(run)
    assert out == run / "metrics.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(out).shape[:2]
    assert w > 800 and h > 600
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    assert main(["plot", str(run), "-o", str(tmp_path / "sub" / "x.png")]) == 0
    assert (tmp_path / "sub" / "x.png").is_file() and str(tmp_path / "sub" / "x.png") in capsys.readouterr().out


@pytest.mark.parametrize("case, match", [
    ("missing", "no such folder"), ("file", "not a folder"), ("no_metrics", "metrics.jsonl: no such file"),
    ("empty", "empty"), ("garbage", "none of them a JSON object"), ("other_run", "no line of run B"),
    ("no_steps", "no logged step"), ("no_values", "nothing to plot"),
])
def test_errors_are_one_line(tmp_path, capsys, case, match):
    d = tmp_path / "run"
    if case == "file":
        d.write_text("x")
    elif case == "no_metrics":
        d.mkdir()
    elif case == "empty":
        _write(d, [])
    elif case == "garbage":
        _write(d, ["not json", "[1, 2]"])
    elif case == "other_run":
        _write(d, [{"step": 1, "run_id": "A", "loss/loss": 1.0}])
    elif case == "no_steps":
        _write(d, [RESUME_NOTE, {"final": True, "run_id": "B"}])
    elif case == "no_values":
        _write(d, [{"step": 1, "run_id": "B", "time/flow": 0.1}])      # a stage time without the step time
    with pytest.raises(UserError, match=match):
        figure(read_metrics(d))
    assert main(["plot", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mscl-stream plot: error:") and "\n" not in err and match in err
    assert not (d / "metrics.png").exists() if d.is_dir() else True


def test_output_must_be_png(run):
    with pytest.raises(UserError, match="must be a .png"):
        plot_run(run, run / "x.jpg")


def test_a_failing_plot_only_warns(run, monkeypatch, caplog):
    def broken(m):
        raise RuntimeError("no fonts")
    monkeypatch.setattr(plot_mod, "figure", broken)
    with caplog.at_level(logging.WARNING):
        assert plot_run_or_warn(run) is None
    assert "metrics plot not written (RuntimeError: no fonts)" in caplog.text
    assert not (run / "metrics.png").exists() and not [p for p in run.iterdir() if ".tmp-" in p.name]
    with caplog.at_level(logging.WARNING):
        assert plot_run_or_warn(run / "nope") is None        # a UserError is a warning here too
    assert "no such folder" in caplog.text
