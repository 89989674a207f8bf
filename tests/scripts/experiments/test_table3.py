"""scripts/experiments/table3.py: every row and column on a tiny budget, run as a module; a rerun reuses what is done; an
interrupted table continues; a folder of another recipe is refused."""
import json
import os
import subprocess
import sys

import pytest

from scripts.experiments import table3
from utils.cli import CliError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def tiny_overrides(data_root):
    return [f"data.root={data_root}", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
            "data.synthetic.height=64", "data.synthetic.width=128", "data.augment.crop_size=[64,64]",
            "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "train.max_iter=2",
            "train.log_interval=1", "model.options={trunk: resnet10t, aspp_ch: 8, fine_ch: 8, head_ch: 8, attn_ch: 8}"]


def run_module(out, overrides, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.experiments.table3", "--out", str(out), "--rounds", "1", *extra,
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def count(path, text):
    with open(path) as f:
        return f.read().count(text)


EXPECTED = [  # (method, train scales, eval scales) of the paper's Table 3, with max pooling
    ("baseline single scale", [1.0], [1.0]),
    ("baseline average pooling", [1.0], [0.5, 1.0, 2.0]),
    ("baseline max pooling", [1.0], [0.5, 1.0, 2.0]),
    ("explicit attention (Chen et al.)", [0.5, 1.0, 2.0], [0.5, 1.0, 2.0]),
    ("hierarchical attention (ours)", [0.5, 1.0], [0.5, 1.0, 2.0]),
    ("hierarchical attention (ours)", [0.5, 1.0], [0.25, 0.5, 1.0, 2.0]),
]


@pytest.mark.slow
def test_tiny_table_every_row_resume_and_interruption(tmp_path):
    out = tmp_path / "t3"
    overrides = tiny_overrides(tmp_path / "data")
    # interrupted after the first training: the full command continues from there
    r = run_module(out, overrides, "--stage", "train-single")
    assert r.returncode == 0, r.stderr
    assert not (out / "table3.json").exists()
    r = run_module(out, overrides)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "single: trained" in r.stdout
    logs = out / "logs"
    assert count(logs / "train_single.log", "training finished") == 1

    rows = json.loads((out / "table3.json").read_text())
    assert [(r["method"], r["train_scales"], r["eval_scales"]) for r in rows] == EXPECTED
    for row in rows:
        for key in ("miou", "flops_ratio", "step_time_ratio", "peak_train_memory_mb", "iou", "gain", "classes",
                    "miou_gain"):
            assert key in row, key
        assert 0 <= row["miou"] <= 1
        assert len(row["iou"]) == len(row["gain"]) == len(row["classes"]) == 19
        assert row["peak_train_memory_mb"] > 0
    single, avg, mx, explicit, hier, hier4 = rows
    assert single["flops_ratio"] == avg["flops_ratio"] == mx["flops_ratio"] == 1.0
    assert single["step_time_ratio"] == 1.0 and single["miou_gain"] == 0.0
    # counted training cost: 0.5^2 + 1 + 2^2 = 5.25 single-scale passes (plus the head) against 0.25 + 1 = 1.25
    assert 5.0 < explicit["flops_ratio"] < 6.0 and 1.2 < hier["flops_ratio"] < 1.4
    assert hier["flops_ratio"] == hier4["flops_ratio"]
    assert single["model"] == avg["model"] == mx["model"] == "deeplabv3plus"  # rows 1-3: one checkpoint, one pass
    assert count(logs / "eval_single.log", "scale-set sweep") == 1
    md = (out / "table3.md").read_text()
    assert md.count("| hierarchical attention (ours) |") == 2 and "0.25/0.5/1/2" in md
    assert (out / "table3.png").stat().st_size > 1000
    state = json.loads((out / "state.json").read_text())
    assert {"train-single", "train-explicit", "train-hierarchical", "measure", "eval-single"} <= set(state["timings"])
    assert "load_avg_1_5_15" in state["timings"]["measure"]

    # rerun: nothing is trained, measured or evaluated again; rows already in table3.json are kept as they are
    rows[2]["miou"] = 0.123
    (out / "table3.json").write_text(json.dumps(rows))
    r = run_module(out, overrides)
    assert r.returncode == 0, r.stderr
    assert "training" not in r.stdout and "evaluating" not in r.stdout
    again = json.loads((out / "table3.json").read_text())
    assert again[2]["miou"] == 0.123 and again[0]["miou"] == single["miou"]

    # a row that was lost, with its evaluation, is evaluated again: only that model
    (out / "table3.json").write_text(json.dumps([r for r in again if r["key"] != "explicit"]))
    for f in (out / "eval" / "explicit").iterdir():
        if f.is_file():
            f.unlink()
    r = run_module(out, overrides)
    assert r.returncode == 0, r.stderr
    assert "evaluating explicit" in r.stdout and "evaluating single" not in r.stdout
    assert [x["key"] for x in json.loads((out / "table3.json").read_text())] == [
        "single", "average", "max", "explicit", "hierarchical", "hierarchical_4"]


def test_a_folder_of_another_recipe_is_refused(tmp_path):
    out = tmp_path / "t3"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"config": {"train": {"max_iter": 7}}, "trained": {}, "timings": {}}))
    with pytest.raises(CliError, match=r"another recipe \(train.max_iter: 7 -> 3\).*another --out"):
        table3.main(["--out", str(out), "train.max_iter=3"])


def test_an_unknown_model_is_refused_before_work(tmp_path):
    with pytest.raises(CliError, match="unknown model 'resnet'"):
        table3.main(["--out", str(tmp_path / "t3"), "model.name=resnet"])
    assert not (tmp_path / "t3" / "state.json").exists()


@pytest.mark.parametrize("name", ["deeplabv3plus", "attnscale_deeplabv3plus", "mscale.DeepV3R50"])
def test_any_family_member_names_the_family(tmp_path, name):
    from utils.config import load_config

    cfgs, lo = table3.model_configs(load_config(None, [f"model.name={name}"]), str(tmp_path))
    assert [c.model.name for c in cfgs.values()] == ["deeplabv3plus", "attnscale_deeplabv3plus",
                                                      "hmsa_deeplabv3plus"]
    assert "attn_ch" not in cfgs["single"].model.options and cfgs["explicit"].model.options["scales"] == [0.5, 1, 2]
    assert list(cfgs["explicit"].eval.scales) == [0.5, 1.0, 2.0] and lo == 0.5


@pytest.mark.slow
def test_the_module_answers_help():
    r = subprocess.run([sys.executable, "-m", "scripts.experiments.table3", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--out" in r.stdout and "Table 3" in r.stdout
