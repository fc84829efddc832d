"""Config loading, overrides and validation: every problem is one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mscl_stream.config import Config, ConfigError, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_method():
    cfg = load_config()
    assert (cfg.data.frames_per_clip, cfg.data.frame_stride, cfg.data.flow_gap) == (8, 16, 8)
    assert cfg.data.max_shift == 128 and cfg.loss.temperature == 0.07
    assert cfg.model.queue_size == 65536 and cfg.optim.clip_grad == 40.0


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"batch_size": 4, "frame_size": [128, 128]}, "flow": {"iters": 6}}))
    cfg = load_config(p, ["flow.iters=3", "data.mds=off", "augment.crop_area=[0.3, 0.9]",
                          "loss.weights.lmcl=0"])
    assert cfg.data.batch_size == 4 and cfg.data.frame_size == (128, 128)
    assert cfg.flow.iters == 3 and cfg.data.mds == "off"
    assert cfg.augment.crop_area == (0.3, 0.9)
    assert cfg.loss.weights["lmcl"] == 0.0 and cfg.loss.weights["rgb_rgb"] == 1.0


@pytest.mark.parametrize("override, key", [
    ("data.batchsize=3", "data.batchsize"),
    ("data.batch_size=three", "data.batch_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.frame_size=[120, 176]", "data.frame_size"),
    ("data.frame_size=[96, 128]", "data.frame_size"),          # below RAFT's 128 px
    ("data.decoder=ffmpeg", "data.decoder"),
    ("augment.flip_p=1.5", "augment.flip_p"),
    ("loss.weights.nope=1", "loss.weights.nope"),
    ("train.resume=/no/such/ckpt.pt", "train.resume"),
    ("data.manifest=/no/such/manifest.jsonl", "data.manifest"),
    ("model.queue_size=2", "model.queue_size"),
    ("noequals", "noequals"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg


def test_renamed_key_is_one_line_naming_the_new_key(tmp_path):
    # data.num_threads also counted PyAV processes; data.decode_workers says what it counts
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  num_threads: 4\n")
    for path, overrides in ((None, ["data.num_threads=4"]), (old, [])):
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides)
        msg = str(e.value)
        assert msg.startswith("data.num_threads: renamed to data.decode_workers") and "\n" not in msg
    assert load_config(None, ["data.decode_workers=4"]).data.decode_workers == 4


def test_raft_minimum_does_not_apply_to_classical_flow():
    cfg = load_config(None, ["flow.estimator=dis_fast", "data.frame_size=[64, 88]", "augment.out_size=56"])
    assert cfg.data.frame_size == (64, 88)


def test_dict_round_trip():
    cfg = load_config(None, ["data.batch_size=5", "model.compat=released"])
    again = from_dict(to_dict(cfg))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("name", ["demo", "ucf101", "k400", "bench"])
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", check=False)
    assert cfg.data.frame_size[0] % 8 == 0


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mscl_stream.cli", "pretrain", "data.batch_size=-1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "data.batch_size" in lines[0] and "Traceback" not in r.stderr


def test_cli_missing_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mscl_stream.cli", "pretrain", "--config", "nope.yaml"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr
