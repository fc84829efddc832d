"""`make demo`'s whole path (data -> index -> pretrain -> views.png -> retrieval + probe, pretrained vs
random init) on a handful of videos and two steps: the plumbing, not the learning outcome."""

import json

from mscl_stream.demo import run_demo
from mscl_stream.eval.retrieval import KS


def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", ["train.max_steps=2", "train.epochs=1", "data.batch_size=4",
                                           "eval.clips=1"], videos=8)
    out = tmp_path / "demo"
    assert (out / "views.png").stat().st_size > 0 and (out / "demo_results.png").stat().st_size > 0
    assert (out / "pretrain" / "checkpoints" / "last.pt").is_file()
    for kind in ("retrieval", "linear"):
        for arm, name in (("pretrained", "pretrained"), ("random_init", "random")):
            saved = json.loads((out / f"eval_{kind}_{name}.json").read_text())
            assert saved["kind"] == kind
            assert saved["info"]["test"] == results[kind][arm]["info"]["test"] >= 1
    ret = results["retrieval"]
    assert ret["pretrained"]["encoder"].startswith("checkpoint:") and ret["random_init"]["encoder"].startswith("random")
    conf = ret["pretrained"]["top1_confusion"]
    n = ret["pretrained"]["info"]["test"]
    assert sum(map(sum, conf)) == n
    assert sum(conf[i][i] for i in range(len(conf))) / n == ret["pretrained"]["R@1"]
    assert all(f"R@{k}" in ret["random_init"] for k in KS)
    shown = capsys.readouterr().out
    assert "retrieval R@1" in shown and "linear top1" in shown


def test_demo_refuses_a_videos_folder_of_the_other_task(tmp_path):
    import pytest

    from mscl_stream.config import load_config
    from mscl_stream.demo import DEMO_CONFIG, prepare_demo_data
    from mscl_stream.errors import UserError

    (tmp_path / "videos" / "train" / "horizontal").mkdir(parents=True)     # a direction-task folder
    cfg = load_config(DEMO_CONFIG, [], check=False)
    with pytest.raises(UserError, match="motion task"):
        prepare_demo_data(tmp_path, cfg, videos=7, task="motion")
    with pytest.raises(UserError, match="--task 'spin'"):
        from mscl_stream.demo import demo_task
        demo_task("spin")
