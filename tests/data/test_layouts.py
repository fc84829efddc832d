"""`mscl-stream index` of datasets as downloaded: UCF101, HMDB51, Kinetics, SSv2 and unlabelled folders.

Each test writes a stand-in in the dataset's official layout (a few tiny videos plus the annotation files
with a short video, a missing file, an unknown class, a malformed line and a duplicate) and checks the
manifest against ids, splits and counts written out by hand from the dataset's rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mscl_stream.data.indexing as indexing
from mscl_stream.cli import main as cli_main
from mscl_stream.config import DataConfig
from mscl_stream.data.indexing import build_manifest
from mscl_stream.data.layouts import detect
from mscl_stream.data.manifest import read_manifest
from mscl_stream.data.synthetic import moving_texture_frames, write_video
from mscl_stream.errors import UserError

# one sample needs (4 - 1) * 4 + 4 + 1 = 17 raw frames; the stand-ins' videos have 20 (long) or 8 (short)
SMALL = DataConfig(frames_per_clip=4, frame_stride=4, flow_gap=4, max_shift=8, flow_frames="all")
SMALL_ARGS = ["data.frames_per_clip=4", "data.frame_stride=4", "data.flow_gap=4", "data.max_shift=8",
              "data.flow_frames=all"]
LONG, SHORT = 20, 8
_CODEC = {".avi": "mjpeg", ".mp4": "h264", ".webm": "vp9"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[tuple[str, int], bytes]:
    """The bytes of a LONG- and a SHORT-frame video per container, encoded once and copied."""
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for ext, codec in _CODEC.items():
        for n in (LONG, SHORT):
            path = write_video(folder / f"{codec}{n}", moving_texture_frames(n, 32, 48, (1.0, 0.5), seed=n), codec)
            out[(ext, n)] = path.read_bytes()
    return out


def put(clips: dict, path: Path, n: int = LONG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(clips[(path.suffix, n)])


def rows(manifest: Path) -> list[tuple[str, str, int, str, int]]:
    """(split, file name, label, label_name, num_frames) of every row, sorted."""
    return sorted((r.split, Path(r.path).name, r.label, r.label_name, r.num_frames) for r in read_manifest(manifest))


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """The paths probed (workers=1 probes in this process)."""
    seen: list[str] = []
    real = indexing.probe_video

    def counting(path, **kw):
        seen.append(Path(path).name)
        return real(path, **kw)
    monkeypatch.setattr(indexing, "probe_video", counting)
    return seen


# ----------------------------------------------------------------------------- UCF101

def ucf101_standin(root: Path, clips: dict) -> None:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    # classInd deliberately not alphabetical: ids must follow it, not the sorted names
    (lists / "classInd.txt").write_text("1 YoYo\n2 ApplyEyeMakeup\n3 Basketball\n")
    (lists / "trainlist01.txt").write_text(
        "YoYo/v_YoYo_g01_c01.avi 1\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 2\n"
        "Basketball/v_Basketball_g01_c01.avi 3\n"          # short
        "Basketball/v_Basketball_g02_c01.avi 3\n"          # missing on disk
        "Juggling/v_Juggling_g01_c01.avi 4\n"              # unknown class
        "this line is not a list entry\n"                  # malformed
        "YoYo/v_YoYo_g01_c01.avi 1\n")                     # duplicate
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\nYoYo/v_YoYo_g02_c01.avi\n")
    (lists / "trainlist02.txt").write_text("YoYo/v_YoYo_g02_c01.avi 1\n")
    (lists / "testlist02.txt").write_text("YoYo/v_YoYo_g01_c01.avi\nApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    videos = root / "UCF-101"
    for name in ("YoYo/v_YoYo_g01_c01", "YoYo/v_YoYo_g02_c01", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01",
                 "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01"):
        put(clips, videos / f"{name}.avi")
    put(clips, videos / "Basketball/v_Basketball_g01_c01.avi", SHORT)


def test_ucf101_two_splits_from_the_command_line(tmp_path, clips, probes, capsys):
    root = tmp_path / "UCF101"
    ucf101_standin(root, clips)
    assert detect(root) == "ucf101"
    out = tmp_path / "m" / "ucf101_split{split}.jsonl"
    assert cli_main(["index", str(root), "-o", str(out), "--split", "1,2", "--workers", "1", *SMALL_ARGS]) == 0
    split1, split2 = tmp_path / "m" / "ucf101_split1.jsonl", tmp_path / "m" / "ucf101_split2.jsonl"
    # ids: classInd's 1-based numbers minus one (YoYo 0, ApplyEyeMakeup 1, Basketball 2)
    assert rows(split1) == [
        ("test", "v_ApplyEyeMakeup_g02_c01.avi", 1, "ApplyEyeMakeup", LONG),
        ("test", "v_YoYo_g02_c01.avi", 0, "YoYo", LONG),
        ("train", "v_ApplyEyeMakeup_g01_c01.avi", 1, "ApplyEyeMakeup", LONG),
        ("train", "v_Basketball_g01_c01.avi", 2, "Basketball", SHORT),
        ("train", "v_YoYo_g01_c01.avi", 0, "YoYo", LONG)]
    assert rows(split2) == [
        ("test", "v_ApplyEyeMakeup_g01_c01.avi", 1, "ApplyEyeMakeup", LONG),
        ("test", "v_YoYo_g01_c01.avi", 0, "YoYo", LONG),
        ("train", "v_YoYo_g02_c01.avi", 0, "YoYo", LONG)]
    report = json.loads((tmp_path / "m" / "ucf101_split1.report.json").read_text())
    assert report["excluded_by_reason"] == {"duplicate": 1, "malformed": 1, "missing": 1, "unknown_class": 1}
    assert report["files"] == 9 and report["split_number"] == 1 and report["format"] == "ucf101"
    assert (report["usable_for_evaluation"], report["usable_for_pretraining"]) == (5, 4)
    why = {x["reason"]: x["detail"] for x in report["excluded"]}
    assert why["unknown_class"].endswith("trainlist01.txt:5: 'Juggling' is not in classInd.txt")
    assert sorted(probes) == sorted({"v_YoYo_g01_c01.avi", "v_YoYo_g02_c01.avi", "v_Basketball_g01_c01.avi",
                                     "v_ApplyEyeMakeup_g01_c01.avi", "v_ApplyEyeMakeup_g02_c01.avi"})  # once each
    printed = capsys.readouterr().out
    assert "usable for evaluation 5, for pretraining 4" in printed
    assert "excluded 4: duplicate 1, malformed 1, missing 1, unknown_class 1" in printed
    assert not list((tmp_path / "m").glob("*.progress.jsonl"))          # the resume sidecar is gone


def test_ucf101_split_options(tmp_path, clips):
    root = tmp_path / "UCF101"
    ucf101_standin(root, clips)
    report = build_manifest(root, tmp_path / "one.jsonl", data=SMALL, workers=1)        # no --split: split 1
    assert report["split_number"] == 1 and report["usable"] == 5
    with pytest.raises(UserError, match=r"2 splits \(1, 2\) need the placeholder \{split\}"):
        build_manifest(root, tmp_path / "x.jsonl", data=SMALL, splits=[1, 2])
    with pytest.raises(UserError, match="--split 3: .* has splits 1, 2"):
        build_manifest(root, tmp_path / "x.jsonl", data=SMALL, splits=[3])
    # the videos folder given instead of the dataset folder: the error names the folder to index
    put(clips, root / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi")
    with pytest.raises(UserError, match=f"index {root}, the folder that holds the videos and ucfTrainTestlist/"):
        build_manifest(root / "UCF-101", tmp_path / "x.jsonl", data=SMALL, fmt="ucf101")


# ----------------------------------------------------------------------------- HMDB51

def test_hmdb51(tmp_path, clips):
    root = tmp_path / "hmdb51"
    lists = root / "testTrainMulti_7030_splits"
    lists.mkdir(parents=True)
    (lists / "cartwheel_test_split1.txt").write_text("x1.avi 1 \nx2.avi 2 \n")
    (lists / "brush_hair_test_split1.txt").write_text(
        "a1.avi 1 \nb1.avi 2 \nc1.avi 0 \n"      # train, test, unused
        "bad line here 1\n"                      # malformed
        "a1.avi 1 \n"                            # duplicate
        "gone.avi 2 \n")                         # missing on disk
    for name in ("brush_hair/a1", "brush_hair/b1", "brush_hair/c1", "cartwheel/x1"):
        put(clips, root / f"{name}.avi")
    put(clips, root / "cartwheel/x2.avi", SHORT)
    assert detect(root) == "hmdb51"
    report = build_manifest(root, tmp_path / "h.jsonl", data=SMALL, workers=1, splits=[1])
    # ids: the sorted class names (brush_hair 0, cartwheel 1); 1 -> train, 2 -> test, 0 not written
    assert rows(tmp_path / "h.jsonl") == [
        ("test", "b1.avi", 0, "brush_hair", LONG), ("test", "x2.avi", 1, "cartwheel", SHORT),
        ("train", "a1.avi", 0, "brush_hair", LONG), ("train", "x1.avi", 1, "cartwheel", LONG)]
    assert report["excluded_by_reason"] == {"duplicate": 1, "malformed": 1, "missing": 1, "unused": 1}
    assert report["shorter_than_one_sample"] == {"count": 1, "per_split": {"test": 1}}


# ----------------------------------------------------------------------------- Kinetics

def kinetics_standin(root: Path, clips: dict) -> None:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    head = "label,youtube_id,time_start,time_end,split\n"
    (ann / "train.csv").write_text(head + "abseiling,AAA,10,20,train\n"
                                   "zumba,BBB,0,10,train\n"
                                   "abseiling,CCC,5,15,train\n"          # missing on disk
                                   "zumba,DDD,x,10,train\n"              # malformed (time)
                                   "zumba,BBB,0,10,train\n")             # duplicate
    (ann / "validate.csv").write_text(head + "bowling,EEE,1,11,validate\n")
    put(clips, root / "train" / "AAA_000010_000020.mp4")
    put(clips, root / "train" / "BBB_000000_000010.mp4")
    put(clips, root / "val" / "EEE_000001_000011.mp4", SHORT)


def test_kinetics(tmp_path, clips):
    root = tmp_path / "k400"
    kinetics_standin(root, clips)
    assert detect(root) == "kinetics" and detect(root / "annotations" / "train.csv") == "kinetics"
    report = build_manifest(root, tmp_path / "k.jsonl", data=SMALL, workers=1)
    # ids: sorted class names over every CSV (abseiling 0, bowling 1, zumba 2); split "validate" -> "val"
    assert rows(tmp_path / "k.jsonl") == [
        ("train", "AAA_000010_000020.mp4", 0, "abseiling", LONG),
        ("train", "BBB_000000_000010.mp4", 2, "zumba", LONG),
        ("val", "EEE_000001_000011.mp4", 1, "bowling", SHORT)]
    # the CSV's times name the file, they are not bounds inside it: the whole file is usable
    assert all((r.start, r.end) == (0, -1) for r in read_manifest(tmp_path / "k.jsonl"))
    assert report["excluded_by_reason"] == {"duplicate": 1, "malformed": 1, "missing": 1}
    # one CSV given: its rows only, ids still from every CSV of the dataset
    build_manifest(root / "annotations" / "validate.csv", tmp_path / "v.jsonl", data=SMALL, workers=1)
    assert rows(tmp_path / "v.jsonl") == [("val", "EEE_000001_000011.mp4", 1, "bowling", SHORT)]


# ----------------------------------------------------------------------------- SSv2

def test_ssv2(tmp_path, clips):
    root = tmp_path / "ssv2"
    root.mkdir()
    (root / "labels.json").write_text(json.dumps({"Pushing something from left to right": "0",
                                                  "Holding something next to something": "1"}))
    hold, push = "Holding [something] next to [something]", "Pushing [something] from left to right"
    (root / "train.json").write_text(json.dumps([
        {"id": "11", "label": "holding a cup next to a pen", "template": hold, "placeholders": ["a cup", "a pen"]},
        {"id": "12", "template": push},
        {"id": "13", "template": "Juggling [something]"},       # unknown class
        {"id": "14", "template": push},                         # missing on disk
        {"template": push},                                     # malformed: no id
        {"id": "11", "template": hold}]))                       # duplicate
    (root / "validation.json").write_text(json.dumps([{"id": "21", "template": hold}]))
    (root / "test.json").write_text(json.dumps([{"id": "31"}]))            # no labels: not indexed
    videos = root / "20bn-something-something-v2"
    for name in ("11", "12", "13", "31"):
        put(clips, videos / f"{name}.webm")
    put(clips, videos / "21.webm", SHORT)
    assert detect(root) == "ssv2"
    report = build_manifest(root, tmp_path / "s.jsonl", data=SMALL, workers=1)
    # ids: labels.json's (template with the brackets removed)
    assert rows(tmp_path / "s.jsonl") == [
        ("train", "11.webm", 1, "Holding something next to something", LONG),
        ("train", "12.webm", 0, "Pushing something from left to right", LONG),
        ("val", "21.webm", 1, "Holding something next to something", SHORT)]
    assert report["excluded_by_reason"] == {"duplicate": 1, "malformed": 1, "missing": 1, "unknown_class": 1}
    assert (report["usable_for_evaluation"], report["usable_for_pretraining"]) == (3, 2)


# ----------------------------------------------------------------------------- unparseable annotations

@pytest.mark.parametrize("case", ["ssv2_json", "ucf_classind", "kinetics_header"])
def test_unparseable_annotation_is_one_line_before_probing(tmp_path, clips, probes, capsys, case):
    root = tmp_path / "d"
    if case == "ssv2_json":
        root.mkdir()
        (root / "labels.json").write_text('{"Holding something": "0",')           # cut short
        (root / "train.json").write_text("[]")
        put(clips, root / "1.webm")
        want = "labels.json: not JSON"
    elif case == "ucf_classind":
        ucf101_standin(root, clips)
        (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 YoYo\nApplyEyeMakeup\n")
        want = "classInd.txt:2: expected '<id> <class>'"
    else:
        kinetics_standin(root, clips)
        (root / "annotations" / "train.csv").write_text("label,youtube_id,time_start\nabseiling,AAA,10\n")
        want = "train.csv: not a Kinetics CSV"
        root = root / "annotations" / "train.csv"
    fmt = {"ssv2_json": "ssv2", "ucf_classind": "ucf101", "kinetics_header": "kinetics"}[case]
    assert cli_main(["index", str(root), "-o", str(tmp_path / "m.jsonl"), "--format", fmt, *SMALL_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and "\n" not in err
    assert probes == []


# ----------------------------------------------------------------------------- unlabelled

def test_flat_folder_is_unlabelled(tmp_path, clips, capsys):
    flat = tmp_path / "footage"
    put(clips, flat / "a.mp4")
    put(clips, flat / "b.webm", SHORT)
    assert detect(flat) == "unlabelled"
    assert cli_main(["index", str(flat), "-o", str(tmp_path / "f.jsonl"), "--workers", "1", *SMALL_ARGS]) == 0
    assert rows(tmp_path / "f.jsonl") == [("train", "a.mp4", -1, "", LONG), ("train", "b.webm", -1, "", SHORT)]
    assert "2 unlabelled" in capsys.readouterr().out
    # Kinetics' split folders as extracted, without the CSVs: the split folders name the split
    for split in ("train", "val"):
        put(clips, tmp_path / "k" / split / f"{split}1.mp4")
    assert detect(tmp_path / "k") == "unlabelled"
    build_manifest(tmp_path / "k", tmp_path / "k.jsonl", data=SMALL, workers=1)
    assert rows(tmp_path / "k.jsonl") == [("train", "train1.mp4", -1, "", LONG), ("val", "val1.mp4", -1, "", LONG)]
    # a tree of subfolders reads as class folders unless --format unlabelled says otherwise
    put(clips, flat / "day2" / "c.mp4")
    assert detect(flat) == "folders"
    build_manifest(flat, tmp_path / "t.jsonl", data=SMALL, workers=1, fmt="unlabelled")
    assert [n for _, n, label, _, _ in rows(tmp_path / "t.jsonl") if label == -1] == ["a.mp4", "b.webm", "c.mp4"]


def test_pretraining_refuses_a_manifest_with_no_video_long_enough(tmp_path, clips, capsys):
    put(clips, tmp_path / "short" / "a.webm", SHORT)
    manifest = tmp_path / "m.jsonl"
    build_manifest(tmp_path / "short", manifest, data=SMALL, workers=1)       # kept: evaluation can use it
    capsys.readouterr()
    assert cli_main(["pretrain", f"data.manifest={manifest}", f"train.out_dir={tmp_path / 'run'}",
                     "train.device=cpu", *SMALL_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "no video is long enough for one pretraining sample: all 1 are shorter than 17 raw frames" in err
    assert "\n" not in err


def test_index_with_a_config_naming_the_manifest_it_writes(tmp_path, clips, capsys, monkeypatch):
    # configs/k400.yaml names data/k400/manifest.jsonl, the file this index creates: it need not exist yet
    config = str(Path(__file__).resolve().parents[2] / "configs" / "k400.yaml")
    put(clips, tmp_path / "footage" / "a.mp4")
    monkeypatch.chdir(tmp_path)
    assert not Path("data/k400/manifest.jsonl").exists()
    assert cli_main(["index", "footage", "-o", "data/k400/manifest.jsonl", "-c", config, "--workers", "1",
                     *SMALL_ARGS]) == 0
    assert rows(tmp_path / "data/k400/manifest.jsonl") == [("train", "a.mp4", -1, "", LONG)]
    capsys.readouterr()
    # every other command still refuses a manifest that is not there, in one line
    assert cli_main(["pretrain", "-c", config, "data.manifest=data/k400/other.jsonl", *SMALL_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.manifest: data/k400/other.jsonl: no such file" in err
    assert "\n" not in err
