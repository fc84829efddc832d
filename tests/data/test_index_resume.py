"""An interrupted `mscl-stream index` resumes: nothing probed twice, nothing lost, the same manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mscl_stream.data.indexing as indexing
from mscl_stream.config import DataConfig
from mscl_stream.data.index_progress import progress_path
from mscl_stream.data.indexing import build_manifest
from mscl_stream.data.synthetic import moving_texture_frames, write_video

SMALL = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=4, max_shift=8, flow_frames="all")
N_FILES, STOP_AFTER = 7, 3
REAL_PROBE = indexing.probe_video


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A flat folder of N_FILES tiny videos (one short) and one file that is not a video."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(N_FILES - 1):
        write_video(root / f"v{i}", moving_texture_frames(20 if i else 8, 32, 48, (1.0, 0.0), seed=i), "vp9")
    (root / "notes.txt").write_text("not a video\n")
    return root


class Stop(Exception):
    """Stands for a kill: raised by the probe after STOP_AFTER files."""


def counting_probe(monkeypatch, stop_after: int | None = None) -> list[str]:
    seen: list[str] = []
    real = REAL_PROBE

    def probe(path, **kw):
        if stop_after is not None and len(seen) == stop_after:
            raise Stop
        seen.append(Path(path).name)
        return real(path, **kw)
    monkeypatch.setattr(indexing, "probe_video", probe)
    return seen


def manifest_and_report(out: Path) -> tuple[str, dict]:
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    for k in ("created", "seconds", "manifest"):
        report.pop(k)
    return out.read_text(), report


def test_interrupted_index_probes_only_the_rest(tmp_path, source, monkeypatch):
    whole = tmp_path / "whole" / "m.jsonl"
    build_manifest(source, whole, data=SMALL, workers=1)
    assert not progress_path(whole).exists()

    out = tmp_path / "resumed" / "m.jsonl"
    first = counting_probe(monkeypatch, stop_after=STOP_AFTER)
    with pytest.raises(Stop):
        build_manifest(source, out, data=SMALL, workers=1)
    assert not out.exists() and len(first) == STOP_AFTER
    sidecar = progress_path(out)
    assert len(sidecar.read_text().splitlines()) == 1 + STOP_AFTER          # header + one line per probe
    with open(sidecar, "a") as f:
        f.write('{"key": "torn by a kill mid-wri')                          # a torn last line is ignored

    second = counting_probe(monkeypatch)
    build_manifest(source, out, data=SMALL, workers=1)
    assert sorted(second) == sorted(set(p.name for p in source.iterdir()) - set(first))   # only the rest
    assert manifest_and_report(out) == manifest_and_report(whole)
    assert not sidecar.exists()


def test_resume_through_the_process_pool_and_other_settings_start_afresh(tmp_path, source, monkeypatch):
    out = tmp_path / "m.jsonl"
    counting_probe(monkeypatch, stop_after=STOP_AFTER)
    with pytest.raises(Stop):
        build_manifest(source, out, data=SMALL, workers=1)
    monkeypatch.undo()
    # the pool's results are appended in this process as they arrive; the spawned workers probe the rest
    report = build_manifest(source, out, data=SMALL, workers=2)
    assert report["usable"] == N_FILES - 1 and report["excluded_by_reason"] == {"unreadable": 1}

    counting_probe(monkeypatch, stop_after=STOP_AFTER)
    with pytest.raises(Stop):
        build_manifest(source, out, data=SMALL, workers=1)
    # another minimum length decides other MDS work: the sidecar is not reused
    longer = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=4, max_shift=8, flow_frames="all", wrap=False)
    again = counting_probe(monkeypatch)
    build_manifest(source, out, data=longer, workers=1)
    assert len(again) == N_FILES
