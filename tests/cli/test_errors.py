"""The catalogue of bad input: what a user can get wrong, and what the program must answer.

Every case asserts the one-line message (naming the key, file or value and what to do), exit code 2, and that
the files that existed before are byte-identical afterwards (no checkpoint, result or run folder changed or lost).
Cases run the entry points in-process (`main(argv)`), except the few that check what a shell user sees (stderr,
no traceback). Read the tables as: case id, command (overrides), expected message fragment.
Sections: settings checked at load; training never thrown away; resume; evaluation outputs; data; one-line
errors; checkpoints that would run code; one writer per folder; files that cannot be resumed; recipes and values
refused at load; bad data files and the data tools; faults of the machine (a real full disk: a small tmpfs mounted
for the test, root only, skipped elsewhere) and scales the device cannot hold.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import datasets.base
import eval as eval_script
import network
import train as train_script
import utils.inference.memory as memory
from datasets import build_dataset, build_loader
from datasets.synthetic import generate_synthetic_cityscapes
from scripts import export_onnx, plan_memory, prepare_color_masks
from tests.fixtures import SYNTHETIC_KEYS, TINY_MODEL, make_setup, options_yaml, tiny_model, tiny_run
from utils.checkpoint import atomic_save, checkpoint_paths
from utils.cli import describe_os_error, run_cli
from utils.config import DataConfig, load_config, parse_bytes
from utils.engine import evaluate
from utils.evaluation.dumps import LabelIdWriter
from utils.evaluation.results_page import write_results_page
from utils.evaluation.visualize import write_images
from utils.files import atomic_write, free_bytes
from utils.inference import Inference
from utils.inference.memory import MemoryPlanError, check_eval_memory, host_available, largest_input_size

ROOT = Path(__file__).resolve().parents[2]


def tiny(tmp: Path, data: Path, run: str = "run", max_iter: int = 2) -> list[str]:
    """The tiny run on the Cityscapes-layout folder `data`, its run folder under `tmp`."""
    return tiny_run({"data.dataset": "cityscapes", "data.root": data, **dict.fromkeys(SYNTHETIC_KEYS)},
                    root=tmp, run=run, max_iter=max_iter)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails(main, argv: list[str]) -> str:
    """Run an entry point that must fail: exit code 2 and a one-line message, which is returned."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, f"exit code {e.value.code!r}: {e.value}"
    message = str(e.value)
    assert "\n" not in message and message.strip(), message
    return message


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors_data") / "data"
    generate_synthetic_cityscapes(str(root), 8, 2, 64, 128, 0)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A finished 2-iteration run (checkpoint, results); tests copy it before touching it."""
    tmp = tmp_path_factory.mktemp("errors_run")
    train_script.main(tiny(tmp, data))
    return tmp


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path


# ------------------------------------------------------------------ 2. checked at load, before any training

LOAD_CASES = [
    # (case, overrides, expected fragment)
    ("window with a negative size", ["eval.window=[-32,32]"], "eval.window"),
    ("overlap of a whole window", ["eval.overlap=1.0"], "eval.overlap must be in [0, 1)"),
    ("every N-th dump with N = 0", ["eval.dump=every", "eval.num_dump=0"], "eval.dump=every needs eval.num_dump >= 1"),
    ("negative dump count", ["eval.num_dump=-1"], "eval.num_dump must be >= 0"),
    ("repeated scale", ["eval.scales=[0.5,1.0,1.0]"], "eval.scales: scales must be distinct"),
    ("scale list without 1.0", ["eval.scales=[0.5,2.0]"], "must contain 1.0"),
    ("empty sweep flips", ["eval.scale_sets=[[1.0]]", "eval.sweep_flips=[]"], "eval.sweep_flips must not be empty"),
    ("unknown fusion", ["eval.fusion=median"], "eval.fusion: expected one of"),
    ("zero checkpoint interval", ["train.ckpt_interval=0"], "train.ckpt_interval must be at least 1"),
    ("negative checkpoint interval", ["train.ckpt_interval=-5"], "train.ckpt_interval must be at least 1"),
    ("zero log interval", ["train.log_interval=0"], "train.log_interval must be at least 1"),
    ("zero batch size", ["data.batch_size=0"], "data.batch_size must be at least 1"),
    ("zero val batch size", ["data.val_batch_size=0"], "data.val_batch_size must be at least 1"),
    ("negative workers", ["data.num_workers=-1"], "data.num_workers must be >= 0"),
    ("negative epoch validation", ["train.val_epochs=-1"], "train.val_epochs must be >= 0"),
    ("misspelt key", ["train.momentun=0.9"], "did you mean 'train.momentum'"),
    ("wrong type", ["train.max_iter=many"], "train.max_iter: expected int"),
]


@pytest.mark.parametrize("case,overrides,expected", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_bad_settings_fail_at_load_in_both_entry_points(entry, case, overrides, expected, tmp_path, data):
    main = train_script.main if entry == "train" else eval_script.main
    message = fails(main, tiny(tmp_path, data) + overrides)
    assert message.startswith("config error: ") and expected in message, message
    assert not (tmp_path / "runs").exists()  # nothing was created, let alone trained


def test_options_may_come_between_overrides(tmp_path, data):
    # `train.py a=1 --force-resume b=2` is one command line, as for eval.py.
    args = train_script.parse_args(["train.lr=0.1", "--force-resume", "train.seed=3", "--resume", "auto", "eval.flip=true"])
    assert args.force_resume and args.overrides == ["train.lr=0.1", "train.seed=3", "eval.flip=true"]


# ------------------------------------------------------------------ 2. training is never thrown away at the end

@pytest.mark.slow
def test_corrupt_val_image_costs_the_evaluation_not_the_training(tmp_path, data):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    val_image = sorted((own / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    good = val_image.read_bytes()
    val_image.write_bytes(b"not a png")
    message = fails(train_script.main, tiny(tmp_path, own))
    assert val_image.name in message, message
    run = tmp_path / "runs" / "run"
    assert [Path(p).name for p in checkpoint_paths(str(run))] == ["ckpt_00000002.pth"]  # the weights are safe
    weights = (run / "ckpt_00000002.pth").read_bytes()

    val_image.write_bytes(good)  # the user fixes the file and runs the same command: no retraining
    metrics = train_script.main(tiny(tmp_path, own))
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (run / "ckpt_00000002.pth").read_bytes() == weights
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "ckpt_00000002.pth" in log
    assert [json.loads(r)["iteration"] for r in open(run / "metrics.jsonl") if '"train"' in r] == [1, 2]


@pytest.mark.slow
def test_fixing_an_eval_value_resumes_the_finished_run(run_copy, data):
    before = snapshot(run_copy / "runs" / "run")
    metrics = train_script.main(tiny(run_copy, data) + ["eval.flip=true", "eval.scales=[1.0]"])
    assert 0.0 <= metrics["miou"] <= 1.0
    after = snapshot(run_copy / "runs" / "run")
    assert {k: v for k, v in after.items() if k.startswith("ckpt_")} == \
        {k: v for k, v in before.items() if k.startswith("ckpt_")}
    results = json.loads((run_copy / "runs" / "run" / "eval" / "results.json").read_text())
    assert results["flip"] is True and results["scales"] == [1.0]


@pytest.mark.slow
def test_refusal_names_the_keys_that_count(run_copy, data):
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    message = fails(train_script.main, tiny(run_copy, data) + ["train.lr=0.5", "eval.flip=true"])
    assert "train.lr: 0.01 -> 0.5" in message and "eval.flip" not in message.split("(")[0], message
    assert "evaluation settings eval.*" in message and "--force-resume" in message
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_moved_run_folder_resumes(run_copy, data):
    moved = run_copy / "elsewhere"
    shutil.move(str(run_copy / "runs"), str(moved))
    args = [a for a in tiny(run_copy, data, max_iter=4) if not a.startswith(("run.output_dir", "run.name"))]
    message = fails(train_script.main, args + [f"run.output_dir={moved}", "run.name=run"])
    assert "train.max_iter: 2 -> 4" in message  # the only difference that counts
    train_script.main(args + [f"run.output_dir={moved}", "run.name=run", "train.max_iter=2"])
    assert "resumed from" in (moved / "run" / "train.log").read_text()


@pytest.mark.parametrize("key,value", [("run.output_dir", "/proc/hmsa_x"), ("eval.dump_dir", "blocked/eval")])
def test_unwritable_output_folders_fail_at_start(key, value, tmp_path, data):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "blocked").write_text("a file where the dump folder's parent would be")
    message = fails(train_script.main, tiny(tmp_path, data) + [f"{key}={value}"])
    assert key in message and value in message and "choose a writable folder" in message, message
    assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == ["blocked"]


@pytest.mark.slow
def test_eval_out_unwritable_fails_at_start(run_copy, data):
    message = fails(eval_script.main, tiny(run_copy, data) + ["--out", "/proc/hmsa_x"])
    assert message.startswith("--out: cannot create or write the folder /proc/hmsa_x"), message


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(run_copy, data, monkeypatch):
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "hmsa":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    message = fails(train_script.main, tiny(run_copy, data, max_iter=4) + ["--force-resume"])
    assert message.startswith("no space left on device: ") and "ckpt_00000004.pth" in message, message
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k.endswith(".pth")} == \
        {k: v for k, v in before.items() if k.endswith(".pth")}
    assert not list(run.glob(".tmp_*"))


# ------------------------------------------------------------------ 3. resume is explicit

@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_listing_them(run_copy, data):
    run = run_copy / "runs" / "run"
    (run / "ckpt_00000002.pth").write_bytes(b"truncated")
    (run / "ckpt_00000001.pth").write_bytes(b"")
    before = snapshot(run)
    message = fails(train_script.main, tiny(run_copy, data))
    assert "none of the 2 checkpoint(s)" in message and "ckpt_00000002.pth" in message \
        and "ckpt_00000001.pth" in message and "run.name" in message, message
    assert snapshot(run) == before


@pytest.mark.slow
def test_unreadable_newest_checkpoint_is_skipped_by_name(run_copy, data, capfd):
    run = run_copy / "runs" / "run"
    shutil.copy(run / "ckpt_00000002.pth", run / "ckpt_00000001.pth")
    (run / "ckpt_00000002.pth").write_bytes(b"truncated")
    train_script.main(tiny(run_copy, data))
    log = (run / "train.log").read_text()
    assert "skipped unreadable checkpoint" in log and "ckpt_00000002.pth" in log
    assert f"resumed from {run / 'ckpt_00000001.pth'}" in log
    assert "ckpt_00000002.pth" in capfd.readouterr().err


@pytest.mark.slow
def test_failed_force_resume_leaves_the_config_as_it_was(run_copy, data):
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    wider = f"model.options={options_yaml({**TINY_MODEL, 'aspp_ch': 16})}"
    message = fails(train_script.main, tiny(run_copy, data) + [wider, "--force-resume"])
    assert "ckpt_00000002.pth" in message and "does not match the model" in message, message
    assert snapshot(run) == before  # config.yaml included


@pytest.mark.slow
def test_orphaned_temporary_checkpoints_are_removed_at_start(run_copy, data):
    run = run_copy / "runs" / "run"
    orphan = run / ".tmp_abc123.pth"
    orphan.write_bytes(b"half a checkpoint")
    train_script.main(tiny(run_copy, data))
    assert not orphan.exists()
    assert f"removed {orphan}" in (run / "train.log").read_text()


@pytest.mark.slow
def test_resume_none_refuses_a_folder_with_checkpoints(run_copy, data):
    before = snapshot(run_copy / "runs")
    message = fails(train_script.main, tiny(run_copy, data) + ["--resume", "none"])
    assert "already holds checkpoints" in message and "run.name" in message
    assert snapshot(run_copy / "runs") == before


# ------------------------------------------------------------------ 4. evaluation never overwrites training results

@pytest.mark.slow
def test_eval_without_out_writes_a_new_folder_per_evaluation(run_copy, data):
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    first = eval_script.main(tiny(run_copy, data) + ["eval.flip=true"])
    second = eval_script.main(tiny(run_copy, data) + ["eval.flip=true"])
    assert first["out"] == str(run / "eval" / "val_s0.5-1_flip") and second["out"] == first["out"] + "_2"
    after = snapshot(run)
    assert {k: after[k] for k in before} == before  # the training's results.json and everything else unchanged
    folder = eval_script.main(tiny(run_copy, data) + ["--folder", str(data / "leftImg8bit" / "val" / "frankfurt")])
    assert folder["out"].startswith(str(run / "eval" / "folder-frankfurt"))


@pytest.mark.slow
def test_folder_results_never_replace_a_labelled_split(run_copy, data):
    labelled = eval_script.main(tiny(run_copy, data))
    before = snapshot(Path(labelled["out"]))
    message = fails(eval_script.main, tiny(run_copy, data) + ["--folder", str(data / "leftImg8bit" / "val" / "frankfurt"),
                                                              "--out", labelled["out"]])
    assert "holds the results of a labelled split" in message
    assert snapshot(Path(labelled["out"])) == before
    message = fails(eval_script.main, tiny(run_copy, data) + ["--out", str(run_copy / "runs" / "run" / "eval")])
    assert "holds the results of a training run" in message


# ------------------------------------------------------------------ 5. data

def _synthetic(tmp: Path, root: Path) -> list[str]:
    """The tiny run on the generated demo dataset (data.dataset=synthetic) at `root`."""
    return tiny_run({"data.dataset": "synthetic", "data.root": root}, root=tmp, max_iter=2)


def test_cityscapes_with_a_missing_root_is_an_error_not_a_demo(tmp_path, data):
    missing = tmp_path / "cityscapes"
    message = fails(train_script.main, tiny(tmp_path, missing))
    assert f"Cityscapes folder not found: data.root={missing}" in message and "data.dataset=synthetic" in message
    assert not missing.exists() and not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]


def test_demo_data_is_never_generated_over_a_user_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    message = fails(train_script.main, _synthetic(tmp_path, mine))
    assert f"{mine} exists and is not a generated dataset" in message and "data.dataset=cityscapes" in message
    assert snapshot(mine) == {"notes.txt": hashlib.sha256(b"my notes").hexdigest()}


def test_regenerating_the_demo_data_keeps_files_it_did_not_write(tmp_path, data):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    extra = own / "leftImg8bit" / "train" / "aachen" / "my_photo.png"
    extra.write_bytes(b"mine")
    before = snapshot(own)
    message = fails(train_script.main, _synthetic(tmp_path, own) + ["data.synthetic.num_train=5"])
    assert "did not write or that changed since" in message and "my_photo.png" in message, message
    assert snapshot(own) == before


@pytest.mark.slow
def test_corrupt_training_image_is_one_line_naming_it(tmp_path, data):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    bad = sorted((own / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[1]
    bad.write_bytes(bad.read_bytes()[:100])
    message = fails(train_script.main, tiny(tmp_path, own) + ["data.num_workers=1"])  # raised in a loader worker
    assert message == f"cannot decode image (truncated file: its PNG data ends early; re-copy it): {bad}", message


def test_verify_finds_every_bad_file_before_training(tmp_path, data):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    bad = sorted((own / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[:2]
    for path in bad:
        path.write_bytes(b"garbage")
    message = fails(train_script.main, tiny(tmp_path, own) + ["data.verify=true"])
    assert message.startswith("data.verify: 2 of 8 samples of cityscapes/train") and all(str(p) in message for p in bad)
    assert not list((tmp_path / "runs").rglob("ckpt_*"))


@pytest.mark.slow
def test_folder_mode_skip_bad(run_copy, data, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, src in enumerate(sorted((data / "leftImg8bit" / "val").rglob("*.png"))[:2]):
        shutil.copy(src, folder / f"p{i}.png")
    (folder / "p1.png").write_bytes(b"not an image")
    message = fails(eval_script.main, tiny(run_copy, data) + ["--folder", str(folder)])
    assert message == f"cannot decode image (corrupt, truncated or not an image): {folder / 'p1.png'}"
    summary = eval_script.main(tiny(run_copy, data) + ["--folder", str(folder), "data.skip_bad=true"])
    assert summary["images"] >= 1


# ------------------------------------------------------------------ 6. one-line errors everywhere

def test_unknown_model_is_one_line(tmp_path, data):
    message = fails(train_script.main, tiny(tmp_path, data) + ["model.name=hmsa_deeplab"])
    assert "unknown model 'hmsa_deeplab'" in message and "did you mean" in message, message


def test_unknown_model_option_is_one_line(tmp_path, data):
    message = fails(train_script.main, tiny(tmp_path, data)
                    + ["model.options={trunk: resnet18, aspp_channels: 8}"])
    assert "has no option 'aspp_channels'" in message, message


def test_missing_checkpoint_for_eval_is_one_line(tmp_path, data):
    message = fails(eval_script.main, tiny(tmp_path, data) + ["--checkpoint", str(tmp_path / "nope.pth")])
    assert message == f"checkpoint not found: {tmp_path / 'nope.pth'}"


def test_missing_recipe_is_one_line(tmp_path):
    message = fails(train_script.main, ["--config", str(tmp_path / "recipe.yaml")])
    assert message == f"config error: config file not found: {tmp_path / 'recipe.yaml'}"


def _cli(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_shell_user_sees_one_line_without_traceback(tmp_path):
    proc = _cli("train.py", "train.ckpt_interval=0", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: config error: train.ckpt_interval must be at least 1, got 0"
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = _cli("eval.py", "--checkpoint", str(tmp_path / "nope.pth"), f"run.output_dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pth'}"


@pytest.mark.slow
def test_debug_switch_shows_the_traceback(tmp_path):
    proc = _cli("eval.py", "--checkpoint", str(tmp_path / "nope.pth"), f"run.output_dir={tmp_path}", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    proc = _cli("eval.py", "--checkpoint", str(tmp_path / "nope.pth"), f"run.output_dir={tmp_path}",
                env_extra={"HMSA_DEBUG": "1"})
    assert "Traceback" in proc.stderr


# ------------------------------------------------------------------ checkpoints that would run code

class _Planted:
    """Unpickling this runs a shell command that creates `marker` (what a planted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, base: dict | None = None) -> Path:
    torch.save({**(base or {}), "planted": _Planted(marker)}, path)
    return path


PLANTED_CASES = ["eval --checkpoint", "eval model.snapshot", "train model.snapshot", "train model.pretrained",
                 "train auto-resume", "train --resume PATH"]


@pytest.mark.slow
@pytest.mark.parametrize("case", PLANTED_CASES)
def test_a_planted_pickle_in_any_loaded_file_runs_nothing(case, run_copy, data, tmp_path):
    """Every checkpoint a user points at or a run folder holds is read with torch's weights_only loader: a file
    that needs another object is refused by name, with the opt-in for a trusted file, and runs nothing."""
    marker = tmp_path / "ran"
    run = run_copy / "runs" / "run"
    real = torch.load(run / "ckpt_00000002.pth", weights_only=True)
    bad = plant(tmp_path / "bad.pth", marker, real)
    args = {
        "eval --checkpoint": (eval_script, tiny(run_copy, data) + ["--checkpoint", str(bad)]),
        "eval model.snapshot": (eval_script, tiny(tmp_path, data, "fresh") + [f"model.snapshot={bad}"]),
        "train model.snapshot": (train_script, tiny(tmp_path, data, "fresh") + [f"model.snapshot={bad}"]),
        "train model.pretrained": (train_script, tiny(tmp_path, data, "fresh") + [f"model.pretrained={bad}"]),
        "train auto-resume": (train_script, tiny(run_copy, data, max_iter=4)),
        "train --resume PATH": (train_script, tiny(tmp_path, data, "fresh") + ["--resume", str(bad)]),
    }
    if case == "train auto-resume":
        bad = plant(run / "ckpt_00000003.pth", marker, real)
    entry, argv = args[case]
    before = snapshot(run_copy)
    message = fails(entry.main, argv)
    assert message == (f"{bad}: holds Python objects beyond tensors and plain values (posix.system), and "
                       "loading it could run code from the file; if you trust its source, list it in "
                       f"HMSA_TRUST_CHECKPOINT={bad} to load it anyway"), message
    assert not marker.exists()
    assert snapshot(run_copy) == before
    assert not (tmp_path / "runs" / "fresh" / "config.yaml").exists()


def test_a_trusted_legacy_file_loads_in_full_when_listed(tmp_path, monkeypatch):
    from utils.checkpoint import TRUST_VARIABLE, read_checkpoint

    marker = tmp_path / "ran"
    path = plant(tmp_path / "legacy.pth", marker, {"state_dict": {"w": torch.ones(1)}})
    monkeypatch.setenv(TRUST_VARIABLE, os.pathsep.join([str(tmp_path / "other.pth"), str(path)]))
    assert read_checkpoint(str(path))["state_dict"]["w"].item() == 1.0
    assert marker.exists()  # the user's explicit choice


def test_older_checkpoints_and_the_originals_snapshots_load_without_unpickling_objects(tmp_path):
    """Our checkpoints before the safe loader kept numpy's random state as an array; the original's snapshots hold
    tensors, numbers and strings. Both load with weights_only."""
    import random

    import numpy as np

    from utils.checkpoint import read_checkpoint, rng_state, set_rng_state

    older = tmp_path / "older.pth"
    torch.save({"format": "hmsa", "model": {"w": torch.ones(2)}, "rng": [
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}]}, older)
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    torch.save({"rng": [rng_state()]}, tmp_path / "new.pth")
    set_rng_state(read_checkpoint(str(older))["rng"][0])
    set_rng_state(read_checkpoint(str(tmp_path / "new.pth"))["rng"][0])
    assert np.random.rand() == expected
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.01, momentum=0.9)
    original = tmp_path / "cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth"
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "arch": "network.ocrnet.HRNet_Mscale", "num_classes": 19,
                "epoch": 175, "optimizer": sgd.state_dict(), "mean_iu": 0.8692, "command": "python train.py ..."},
               original)
    assert read_checkpoint(str(original))["arch"] == "network.ocrnet.HRNet_Mscale"


# ------------------------------------------------------------------ one writer per folder

HOLD = """
import sys
from utils.files import file_lock
with file_lock(sys.argv[1], remove=True):
    print("held", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """Another process that holds a folder's writer lock, as a running train.py or eval.py does."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / "writer.lock")], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
        assert self.proc.stdout.readline() == "held\n"

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.communicate("\n", timeout=60)


@pytest.mark.slow
def test_a_second_training_on_a_run_in_use_is_refused(run_copy, data):
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    with Holder(run) as other:
        message = fails(train_script.main, tiny(run_copy, data, max_iter=4))
        assert f"{run} is in use: pid {other.proc.pid} on host " in message and "trains there" in message, message
        assert "choose another run.output_dir / run.name" in message
        assert {k: v for k, v in snapshot(run).items() if k != "writer.lock"} == before
    assert snapshot(run) == before  # the holder's lock file went with it


def test_a_new_run_in_use_is_refused_before_anything_is_written(tmp_path, data):
    run = tmp_path / "runs" / "run"
    with Holder(run):
        fails(train_script.main, tiny(tmp_path, data))
        assert sorted(p.name for p in run.iterdir()) == ["writer.lock"]


@pytest.mark.slow
def test_the_lock_of_a_killed_writer_is_gone(run_copy, data):
    run = run_copy / "runs" / "run"
    other = Holder(run)
    other.proc.kill()  # a killed train.py: its flock goes with it (a lock file without flock: tests/utils)
    other.proc.wait()
    metrics = train_script.main(tiny(run_copy, data))  # resumes the finished run: its final evaluation
    assert 0.0 <= metrics["miou"] <= 1.0 and not (run / "writer.lock").exists()


@pytest.mark.slow
def test_eval_out_in_use_or_a_run_folder_or_another_evaluation_is_refused(run_copy, data, tmp_path):
    out = tmp_path / "ev"
    with Holder(out) as other:
        message = fails(eval_script.main, tiny(run_copy, data) + ["--out", str(out)])
        assert f"--out: {out} is in use: pid {other.proc.pid} on host " in message and "evaluates there" in message
    assert not out.exists() or not list(out.iterdir())
    run = run_copy / "runs" / "run"
    before = snapshot(run)
    message = fails(eval_script.main, tiny(run_copy, data) + ["--out", str(run)])
    assert f"--out {run} is a training run's folder" in message
    assert snapshot(run) == before
    first = eval_script.main(tiny(run_copy, data) + ["--out", str(out)])
    again = eval_script.main(tiny(run_copy, data) + ["--out", str(out)])  # the same evaluation may run again
    assert again["miou"] == first["miou"]
    results = snapshot(out)
    message = fails(eval_script.main, tiny(run_copy, data) + ["--out", str(out), "eval.flip=true"])
    assert f"--out {out} holds the results of another evaluation" in message
    assert snapshot(out) == results


CLAIM = """
import contextlib, logging, sys
from utils.cli import CliError
from utils.folders import claim_folder
logging.basicConfig(level=logging.INFO, format="%(message)s")
with contextlib.ExitStack() as stack:
    try:
        claim_folder(sys.argv[1], "run.name", "trains", stack)
    except CliError as e:
        print("refused:", e.message, flush=True)
        sys.exit(2)
    print("claimed", flush=True)
"""


@pytest.mark.slow
def test_a_requeued_job_waits_for_its_earlier_run_s_lock_and_no_other(tmp_path):
    # A requeue after a node failure: the NFS server keeps the dead node's flock until its lease expires; the new
    # run of the same job waits for it (bounded), another job is refused at once.
    run = tmp_path / "run"
    earlier = Holder(run, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})
    try:
        other = subprocess.run([sys.executable, "-c", CLAIM, str(run)], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "SLURM_JOB_ID": "78"}, timeout=120)
        assert other.returncode == 2, other.stdout + other.stderr
        assert f"is in use: pid {earlier.proc.pid} on host " in other.stdout and "(SLURM job 77)" in other.stdout
        requeued = subprocess.Popen([sys.executable, "-c", CLAIM, str(run)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
        try:
            assert "still locked by this job's run before its requeue" in requeued.stderr.readline()
        finally:
            earlier.__exit__()  # the lease expires: the lock is free
            out, _ = requeued.communicate(timeout=120)
    finally:
        if earlier.proc.poll() is None:
            earlier.proc.kill()
    assert requeued.returncode == 0 and out == "claimed\n"


def test_concurrent_evaluations_never_share_a_new_folder(tmp_path):
    from contextlib import ExitStack

    from utils.folders import claim_new_folder

    base = tmp_path / "eval" / "val_s1"
    with Holder(base), ExitStack() as mine:  # another evaluation works in the first folder
        assert claim_new_folder(str(base), mine) == f"{base}_2"
        (tmp_path / "eval" / "val_s1_2" / "results.json").write_text("{}")
        with ExitStack() as third:  # the second holds finished results and the first is still in use
            assert claim_new_folder(str(base), third) == f"{base}_3"
    with ExitStack() as later:  # the first folder's evaluation ended without results: it is taken up again
        assert claim_new_folder(str(base), later) == str(base)


# ------------------------------------------------------------------ resuming from a file that cannot be resumed

@pytest.mark.slow
def test_resuming_from_an_original_snapshot_says_to_start_from_it(run_copy, data, tmp_path):
    weights = torch.load(run_copy / "runs" / "run" / "ckpt_00000002.pth", weights_only=True)["model"]
    original = tmp_path / "cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 175, "mean_iu": 0.8692},
               original)
    before = snapshot(run_copy)
    message = fails(train_script.main, tiny(run_copy, data, "fresh") + ["--resume", str(original)])
    assert message.startswith(f"--resume {original}: not a checkpoint of a training run (it holds epoch, mean_iu, "
                              "state_dict;"), message
    assert message.endswith(f"use model.snapshot={original}")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_a_checkpoint_of_a_newer_version_is_refused_naming_its_unknown_settings(run_copy, data):
    path = run_copy / "runs" / "run" / "ckpt_00000002.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["tracker"] = {"kind": "wandb"}  # a section and a key this version does not have
    ckpt["config"]["train"]["warmup_iters"] = 100
    torch.save(ckpt, path)
    before = snapshot(run_copy)
    message = fails(train_script.main, tiny(run_copy, data))
    assert message == (f"refusing to resume {path}: its config has settings this version does not know (tracker, "
                       "train.warmup_iters): it was written by a newer version (update this one), or an older one "
                       "whose settings were removed since; --force-resume continues without them")
    assert snapshot(run_copy) == before
    metrics = train_script.main(tiny(run_copy, data) + ["--force-resume"])  # resumes into the final evaluation
    assert 0.0 <= metrics["miou"] <= 1.0


# ------------------------------------------------------------------ recipes and values refused at load

ENTRY = {"train": train_script.main, "eval": eval_script.main}

# (case, recipe text or None, overrides, expected fragments); a recipe is written to tmp_path/recipe.yaml.
RECIPE_CASES = [
    ("section twice", "train:\n  lr: 0.1\ntrain:\n  max_iter: 3\n", [],
     ["recipe.yaml: not valid YAML at line 3, column 1: duplicate key 'train' (also at line 1, column 1", "keep one"]),
    ("key twice in a section", "train:\n  lr: 0.1\n  max_iter: 3\n  lr: 0.2\n", [],
     ["recipe.yaml: not valid YAML at line 4, column 3: duplicate key 'train.lr' (also at line 2, column 3"]),
    ("key twice in a flow mapping", "model:\n  options: {trunk: resnet18, trunk: resnet50}\n", [],
     ["line 2, column 30: duplicate key 'model.options.trunk'"]),
    ("syntax error", "train: [unclosed\n", [],
     ["recipe.yaml: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>' "
      "(while parsing a flow sequence at line 1, column 8)"]),
    ("tab indentation", "train:\n  lr: 0.1\n\tmax_iter: 2\n", [],
     ["recipe.yaml: not valid YAML at line 3, column 1: found character '\\t' that cannot start any token"]),
    ("base is a list", "base: [other.yaml]\n", [],
     ["recipe.yaml: 'base:' must name one recipe file", "got list ['other.yaml']"]),
    ("base is a number", "base: 3\n", [], ["recipe.yaml: 'base:' must name one recipe file", "got int 3"]),
    ("value with a duplicate key", None, ["model.options={trunk: resnet18, trunk: resnet50}"],
     ["the value is not valid YAML at line 1, column 19: duplicate key 'trunk'"]),
    ("value syntax error", None, ["eval.scales=[1.0"],
     ["override 'eval.scales=[1.0': the value is not valid YAML at line 1, column 5: expected ',' or ']'"]),
]

VALUE_CASES = [
    # (case, overrides, expected fragment)
    ("run name leaving the output folder", ["run.name=../other"],
     "run.name must be a relative path inside run.output_dir without '..', got '../other': use a plain folder name, "
     "or set run.output_dir"),
    ("absolute run name", ["run.name=/tmp/elsewhere"], "run.name must be a relative path inside run.output_dir"),
    ("dump folder leaving the run", ["eval.dump_dir=../run2/eval"],
     "eval.dump_dir must be a relative path inside the run folder without '..', got '../run2/eval'"),
    ("absolute dump folder", ["eval.dump_dir=/tmp/results"], "could overwrite another run's results"),
    ("old and new name of a key", ["train.run_name=a", "run.name=b"],
     "overrides: 'run.name' and 'train.run_name' are the same key (the old and the new name); keep 'run.name'"),
    ("old and new name of a nested key", ["data.crop_size=[32,32]"],  # tiny() sets data.augment.crop_size
     "'data.augment.crop_size' and 'data.crop_size' are the same key"),
    ("memory budget below a byte", ["eval.memory_budget=0.5"],
     "eval.memory_budget: 0.5 is not a whole number of bytes >= 1 (a number without a unit counts bytes): write a "
     "size such as '8GiB'"),
    ("fractional byte count", ["eval.memory_budget=1.5"], "eval.memory_budget: 1.5 is not a whole number of bytes"),
    ("zero learning rate", ["train.lr=0"], "train.lr must be > 0, got 0.0"),
    ("negative learning rate", ["train.lr=-0.01"], "train.lr must be > 0"),
    ("nan learning rate", ["train.lr=nan"], "train.lr must be a finite number, got nan"),
    ("infinite learning rate", ["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    ("momentum of 1", ["train.momentum=1.0"], "train.momentum must be in [0, 1), got 1.0"),
    ("negative momentum", ["train.momentum=-0.1"], "train.momentum must be in [0, 1)"),
    ("negative weight decay", ["train.weight_decay=-1e-4"], "train.weight_decay must be >= 0"),
    ("infinite weight decay", ["train.weight_decay=inf"], "train.weight_decay must be a finite number"),
    ("negative seed", ["train.seed=-1"], "train.seed must be in [0, 2**32)"),
    ("seed beyond numpy's", ["train.seed=4294967296"], "train.seed must be in [0, 2**32)"),
    ("negative synthetic seed", ["data.synthetic.seed=-3"], "data.synthetic.seed must be in [0, 2**32)"),
    ("negative poly exponent", ["train.poly_exp=-1"], "train.poly_exp must be >= 0"),
    ("negative aux weight", ["loss.aux_weight=-0.4"], "loss.aux_weight must be >= 0"),
    ("nan scale weight", ["loss.scale_weight=nan"], "loss.scale_weight must be a finite number"),
    ("infinite scale", ["eval.scales=[0.5,1.0,.inf]"], "eval.scales[2] must be a finite number"),
    ("zero scale minimum", ["data.augment.scale_min=0"], "data.augment.scale_min must be > 0"),
    ("scale range upside down", ["data.augment.scale_min=2", "data.augment.scale_max=1"],
     "data.augment.scale_min (2.0) must be <= data.augment.scale_max (1.0)"),
    ("zero ASPP width", ["model.options.aspp_ch=0"],
     "model.options.aspp_ch is a number of channels: it must be a whole number >= 1, got 0"),
    ("negative attention width", ["model.options.attn_ch=-8"], "model.options.attn_ch is a number of channels"),
    ("fractional head width", ["model.options.head_ch=7.5"], "model.options.head_ch is a number of channels"),
]


@pytest.mark.parametrize("case,recipe,overrides,expected", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_bad_recipes_fail_at_load_in_both_entry_points(entry, case, recipe, overrides, expected, tmp_path, data):
    argv = tiny(tmp_path, data) + overrides
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        argv = ["--config", str(tmp_path / "recipe.yaml")] + argv
    before = snapshot(tmp_path)
    message = fails(ENTRY[entry], argv)
    assert message.startswith("config error: ") and all(e in message for e in expected), message
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path, data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("train:\n  lr: 0.1  # café\n".encode("latin-1"))
    for main in ENTRY.values():
        message = fails(main, ["--config", str(recipe)] + tiny(tmp_path, data))
        assert message == f"config error: {recipe}: not UTF-8 text (byte 23, line 2: b'\\xe9'); save the file as UTF-8"
    assert not (tmp_path / "runs").exists()


def test_a_duplicate_key_in_the_base_names_the_base(tmp_path, data):
    (tmp_path / "base.yaml").write_text("eval:\n  flip: true\n  flip: false\n")
    (tmp_path / "recipe.yaml").write_text("base: base.yaml\n")
    message = fails(train_script.main, ["--config", str(tmp_path / "recipe.yaml")] + tiny(tmp_path, data))
    assert f"{tmp_path / 'base.yaml'}: not valid YAML at line 3, column 3: duplicate key 'eval.flip'" in message


def test_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    # `<<:` followed by one of its keys is YAML's way to override a merged value, and an alias repeats no key.
    (tmp_path / "recipe.yaml").write_text("eval:\n  scales: &s [0.5, 1.0]\n  scale_sets: [*s, *s]\n")
    cfg = load_config(str(tmp_path / "recipe.yaml"), ["model.options={<<: {trunk: resnet18, aspp_ch: 8}, aspp_ch: 16}"])
    assert cfg.eval.scale_sets == ((0.5, 1.0), (0.5, 1.0))
    assert cfg.model.options == {"trunk": "resnet18", "aspp_ch": 16}


@pytest.mark.parametrize("case,overrides,expected", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_bad_values_fail_at_load_in_both_entry_points(entry, case, overrides, expected, tmp_path, data):
    message = fails(ENTRY[entry], tiny(tmp_path, data) + overrides)
    assert message.startswith("config error: ") and expected in message, message
    assert not (tmp_path / "runs").exists()  # nothing was created, let alone trained


def test_a_refusal_is_one_line_on_stderr_without_alias_warnings(tmp_path, data, capsys, caplog):
    # An old key name warns only once the config is valid: a refused one prints the error line alone.
    (tmp_path / "recipe.yaml").write_text("data:\n  gblur: true\n")
    argv = ["--config", str(tmp_path / "recipe.yaml")] + tiny(tmp_path, data) + ["data.class_uniform_pct=0.1"]
    with caplog.at_level("WARNING", logger="utils.config"), pytest.raises(SystemExit) as e:
        run_cli(train_script.main, argv + ["train.lr=-1"])
    assert e.value.code == 2 and not caplog.records
    assert capsys.readouterr().err.splitlines() == ["error: config error: train.lr must be > 0, got -1.0"]
    with caplog.at_level("WARNING", logger="utils.config"):
        load_config(str(tmp_path / "recipe.yaml"), ["data.class_uniform_pct=0.1"])
    assert "'data.gblur' is now" in caplog.text and "'data.class_uniform_pct' is now" in caplog.text


def test_a_finished_run_is_untouched_by_a_refused_command(tmp_path, data):
    # A run folder that already holds results: a refused command, of either entry point, changes no byte of it.
    run = tmp_path / "runs" / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text('{"miou": 0.5}\n')
    before = snapshot(tmp_path / "runs")
    for main in ENTRY.values():
        fails(main, tiny(tmp_path, data) + ["eval.dump_dir=../../elsewhere"])
    assert snapshot(tmp_path / "runs") == before and not (tmp_path / "elsewhere").exists()


def test_good_values_still_load():
    cfg = load_config(None, ["run.name=group/run1", "eval.dump_dir=eval/final", "train.poly_exp=0",
                             "train.momentum=0", "train.seed=4294967295", "model.options.aspp_ch=1"])
    assert (cfg.run.name, cfg.eval.dump_dir, cfg.train.seed) == ("group/run1", "eval/final", 2**32 - 1)
    assert parse_bytes("0.5KiB") == 512 and parse_bytes(3) == 3 and parse_bytes("1.5GB") == 1_500_000_000


# ------------------------------------------------------------------ bad data files and the data tools

def own_copy(data: Path, tmp: Path) -> Path:
    """A copy of the shared dataset that a test may damage."""
    own = tmp / "data"
    shutil.copytree(data, own)
    return own


def images(root: Path, split: str) -> list[Path]:
    return sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))


def as_jpeg(path: Path, keep: float = 1.0) -> bytes:
    """The image at `path` encoded as JPEG, cut to its first `keep` fraction (as an interrupted copy leaves it)."""
    encoded = cv2.imencode(".jpg", cv2.imread(str(path)))[1].tobytes()
    return encoded[: int(len(encoded) * keep)]


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, without the pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def verify_fails(tmp: Path, own: Path) -> str:
    """train.py with data.verify=true on `own` must stop before training; its message."""
    message = fails(train_script.main, tiny(tmp, own) + ["data.verify=true"])
    assert not list((tmp / "runs").rglob("ckpt_*"))
    return message


# ------------------------------------------------------------------ 1. data.skip_bad in evaluation

@pytest.fixture
def four_val(tmp_path) -> tuple[list[str], Path]:
    """make_setup's data (val images of 48x96, data.val_batch_size=2) with the first two val images unreadable,
    so that the first batch holds skipped images only."""
    overrides, _ = make_setup(str(tmp_path), fit=False)
    root = tmp_path / "data"
    for path in images(root, "val")[:2]:
        path.write_bytes(b"not an image")
    return overrides, root


@pytest.mark.slow
def test_skipped_images_count_nowhere_in_an_evaluation(four_val, caplog, monkeypatch):
    _, root = four_val
    cfg = DataConfig.make(dataset="cityscapes", root=str(root), num_workers=0, val_batch_size=2, skip_bad=True)
    dataset = build_dataset(cfg, "val", False)
    asked = []

    def should_stop() -> bool:
        asked.append(True)
        return False

    model, how = tiny_model(), Inference.make([1.0])
    monkeypatch.setattr(logging.getLogger("datasets"), "propagate", True)  # a failed run's logger may have cut it
    with caplog.at_level("WARNING", logger="datasets.base"):
        result = evaluate(model, build_loader(dataset, cfg, False), 19, 255, how, torch.device("cpu"),
                          should_stop=should_stop)
    assert len(asked) == 3  # every batch asks (a collective across ranks), the all-skipped one included
    assert result.images_seen == 3 and result.images_skipped == 2
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all(w.endswith("(left out of the evaluation)") for w in warned), warned
    readable = build_dataset(cfg, "val", False)
    readable.drop_samples({0: "unreadable", 1: "unreadable"})
    alone = evaluate(model, build_loader(readable, cfg, False), 19, 255, how, torch.device("cpu"))
    assert torch.equal(result.hist, alone.hist) and result.loss == alone.loss


def test_training_still_replaces_an_unreadable_sample(four_val):
    from datasets import SampleRef

    _, root = four_val
    cfg = DataConfig.make(dataset="cityscapes", root=str(root), num_workers=0, skip_bad=True, crop_size=(32, 32))
    dataset = build_dataset(cfg, "val", True)
    item = dataset[SampleRef(0, 0)]
    assert item["name"] == dataset.samples[2].name and "skipped" not in item


@pytest.mark.slow
def test_eval_with_skip_bad_counts_each_readable_image_once(run_copy, data, tmp_path, capfd):
    own = own_copy(data, tmp_path)
    bad = images(own, "val")[0]
    bad.write_bytes(b"not an image")
    capfd.readouterr()
    summary = eval_script.main(tiny(run_copy, own) + ["data.skip_bad=true"])
    assert summary["images"] == 1
    err = capfd.readouterr().err
    assert err.count(f"skipping unreadable sample 0: cannot decode image (corrupt, truncated or not an image): {bad} "
                     "(left out of the evaluation)") == 1, err
    without = tmp_path / "without"
    shutil.copytree(own, without)
    stem = bad.name[: -len("_leftImg8bit.png")]
    for path in without.rglob(f"{stem}_*"):
        path.unlink()
    alone = eval_script.main(tiny(run_copy, without))
    assert alone["images"] == 1 and alone["miou"] == summary["miou"]


# ------------------------------------------------------------------ 2. truncated files

def test_verify_finds_a_truncated_png_and_a_truncated_jpeg(tmp_path, data):
    own = own_copy(data, tmp_path)
    png, jpeg = images(own, "train")[:2]
    png.write_bytes(png.read_bytes()[:-20])
    jpeg.write_bytes(as_jpeg(jpeg, keep=0.9))  # JPEG bytes under a .png name: decoded by content
    message = verify_fails(tmp_path, own)
    assert message.startswith("data.verify: 2 of 8 samples of cityscapes/train"), message
    assert f"cannot decode image (truncated file: its PNG data ends early; re-copy it): {png}" in message
    assert f"cannot decode image (truncated file: its JPEG data ends early; re-copy it): {jpeg}" in message


@pytest.mark.slow
def test_eval_folder_refuses_a_truncated_jpeg_or_skips_it(run_copy, data, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, src in enumerate(images(data, "val")):
        (folder / f"p{i}.jpg").write_bytes(as_jpeg(src, keep=0.7 if i == 1 else 1.0))
    cut = folder / "p1.jpg"
    assert cv2.imread(str(cut)) is not None  # OpenCV alone would segment it, grey rows and all
    before = snapshot(folder)
    message = fails(eval_script.main, tiny(run_copy, data) + ["--folder", str(folder)])
    assert message == f"cannot decode image (truncated file: its JPEG data ends early; re-copy it): {cut}"
    summary = eval_script.main(tiny(run_copy, data) + ["--folder", str(folder), "data.skip_bad=true"])
    assert summary["images"] == 1
    assert snapshot(folder) == before


# ------------------------------------------------------------------ 3. listed paths that are not files

@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_a_listed_path_that_is_not_a_file_stops_before_training(kind, tmp_path, data):
    own = own_copy(data, tmp_path)
    path = images(own, "train")[3]
    path.unlink()
    if kind == "folder":
        path.mkdir()
        expected = f"image path is a folder, not a file: {path}"
    else:
        path.symlink_to(tmp_path / "gone.png")
        expected = f"image file is a broken symbolic link: {path} -> {tmp_path / 'gone.png'}"
    message = fails(train_script.main, tiny(tmp_path, own))
    assert message.startswith("cityscapes/train/cv0: 1 listed file(s) cannot be read: ") and expected in message
    assert not list((tmp_path / "runs").rglob("ckpt_*"))
    skipped = build_dataset(DataConfig.make(dataset="cityscapes", root=str(own), num_workers=0, verify=True,
                                            skip_bad=True), "train", True)
    assert len(skipped) == 7  # data.skip_bad with data.verify: dropped like any unreadable file


# ------------------------------------------------------------------ 4. unreadable files

def test_permission_denied_is_not_called_corrupt(tmp_path, data, monkeypatch):
    own = own_copy(data, tmp_path)
    locked = images(own, "train")[2]

    def opener(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(datasets.base, "open", opener, raising=False)
    message = verify_fails(tmp_path, own)
    assert f"cannot read {locked}: Permission denied (check the permissions" in message, message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_permission_denied_by_the_file_mode(tmp_path, data):
    own = own_copy(data, tmp_path)
    locked = images(own, "train")[2]
    locked.chmod(0)
    assert f"cannot read {locked}: Permission denied" in verify_fails(tmp_path, own)


# ------------------------------------------------------------------ 5. images over the decoder's pixel limit

def test_an_image_over_the_pixel_limit_names_its_size_and_the_variable(tmp_path, data):
    own = own_copy(data, tmp_path)
    big = images(own, "train")[0]
    big.write_bytes(huge_png(40000, 40000))
    message = verify_fails(tmp_path, own)
    assert (f"cannot decode image (40000x40000 = 1600000000 pixels, more than OpenCV's limit of 1073741824 (its "
            f"default); raise it with the environment variable OPENCV_IO_MAX_IMAGE_PIXELS=1600000000): {big}"
            ) in message, message


@pytest.mark.slow
def test_a_lowered_pixel_limit_is_the_one_reported(tmp_path, data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENCV_IO_MAX_IMAGE_PIXELS": "4096"}
    proc = subprocess.run([sys.executable, "train.py", *tiny(tmp_path, data), "data.verify=true"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "128x64 = 8192 pixels, more than OpenCV's limit of 4096; raise it with the environment variable " \
           "OPENCV_IO_MAX_IMAGE_PIXELS=8192" in proc.stderr


# ------------------------------------------------------------------ 6. scripts/prepare_color_masks.py

CLASSES = "names: [background, road]\ncolors: [[0, 0, 0], [128, 64, 128]]\n"


@pytest.fixture
def colour(tmp_path) -> Path:
    """A folder of colour masks (one in a subfolder) and the class list beside it."""
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, 4:] = (128, 64, 128)
    for rel in ("a.png", "sub/b.png", "sub/sub/b.png"):
        (tmp_path / "colour" / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "colour" / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "classes.yaml").write_text(CLASSES)
    return tmp_path


@pytest.mark.parametrize("case", ["the source", "inside the source", "over a source mask"])
def test_colour_masks_are_never_converted_over_themselves(case, colour):
    top = colour / "colour"
    # Last case: the source inside the destination, where the id mask of SRC/sub/b.png would be DST/sub/b.png,
    # which is SRC/b.png.
    src, dst = {"the source": (top, top), "inside the source": (top, top / "ids"),
                "over a source mask": (top / "sub", top)}[case]
    before = snapshot(colour)
    message = fails(prepare_color_masks.main, [str(src), str(dst), "--classes", str(colour / "classes.yaml")])
    expected = {"the source": f"output folder {dst} is the source folder",
                "inside the source": f"output folder {dst} is inside the source folder {src}",
                "over a source mask": f"the id mask {dst / 'sub' / 'b.png'} would overwrite the colour mask there"}
    assert expected[case] in message, message
    assert snapshot(colour) == before


@pytest.mark.parametrize("case", ["no --classes", "missing file", "no colors"])
def test_colour_masks_need_their_class_list(case, colour):
    if case == "no colors":
        (colour / "classes.yaml").write_text("names: [background, road]\n")
    classes = {"no --classes": [], "missing file": ["--classes", str(colour / "nope.yaml")],
               "no colors": ["--classes", str(colour / "classes.yaml")]}[case]
    before = snapshot(colour)
    message = fails(prepare_color_masks.main, [str(colour / "colour"), str(colour / "ids"), *classes])
    expected = {"no --classes": "--classes: give the class-list YAML whose 'colors' list the colour of each class",
                "missing file": f"--classes: class list not found: {colour / 'nope.yaml'}",
                "no colors": f"{colour / 'classes.yaml'}: no 'colors': list the [r, g, b] colour of each of the 2 "
                             "classes"}[case]
    assert message.startswith(expected), message
    assert snapshot(colour) == before


@pytest.mark.slow
def test_colour_mask_errors_reach_the_shell_as_one_line(colour):
    proc = subprocess.run([sys.executable, "-m", "scripts.prepare_color_masks", str(colour / "colour"),
                           str(colour / "colour")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --classes: give the class-list YAML whose 'colors' list the colour of each class"], proc.stderr


# ------------------------------------------------------------------ 7. scripts/plan_memory.py

def test_plan_counts_the_classes_of_a_custom_class_list(colour):
    cfg = load_config(None, ["data.dataset=custom", f"data.custom.classes={colour / 'classes.yaml'}"])
    assert plan_memory.num_classes(cfg) == 2
    message = fails(plan_memory.main, ["data.dataset=custom", f"data.custom.classes={colour / 'nope.yaml'}",
                                       "--size", "32x32"])
    assert message.startswith(f"class list not found: {colour / 'nope.yaml'}"), message


def test_plan_for_a_cuda_device_that_is_not_here():
    absent = f"cuda:{torch.cuda.device_count()}"
    message = fails(plan_memory.main, ["--device", absent])
    assert message.startswith(f"--device {absent}: no such CUDA device here") and "eval.memory_budget=" in message


# ------------------------------------------------------------------ 8. scripts/export_onnx.py

@pytest.fixture(scope="module")
def export_setup(tmp_path_factory) -> tuple[list[str], str]:
    return make_setup(str(tmp_path_factory.mktemp("export")), fit=False)


def test_export_to_an_unwritable_place_is_one_line(export_setup):
    overrides, ckpt = export_setup
    message = fails(export_onnx.main, [*overrides, "--checkpoint", ckpt, "--out", "/proc/hmsa_x/model.onnx"])
    assert message.startswith("--out: cannot create or write the folder /proc/hmsa_x"), message


def test_export_of_a_corrupt_checkpoint_is_one_line_and_writes_nothing(export_setup, tmp_path):
    overrides, ckpt = export_setup
    bad = tmp_path / "bad.pth"
    bad.write_bytes(Path(ckpt).read_bytes()[:1000])
    out = tmp_path / "out" / "model.onnx"
    before = snapshot(tmp_path)
    message = fails(export_onnx.main, [*overrides, "--checkpoint", str(bad), "--out", str(out)])
    assert str(bad) in message, message
    assert snapshot(tmp_path) == before and not out.parent.exists()


def test_a_failed_export_leaves_nothing_half_written(export_setup, tmp_path, monkeypatch):
    overrides, ckpt = export_setup
    out = tmp_path / "model.onnx"

    def half(module, path, example, dynamo=True):
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(export_onnx, "export_onnx", half)
    message = fails(export_onnx.main, [*overrides, "--checkpoint", ckpt, "--out", str(out)])
    assert message.startswith("no space left on device: "), message
    assert list(tmp_path.iterdir()) == []  # neither the file nor the hidden folder it was written in


# ------------------------------------------------------------------ a full disk, and scales the device cannot hold

MiB = 2**20


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[Path, int], Path]]:
    """`mount(folder, size)`: a tmpfs of `size` bytes mounted on `folder` (created), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a file still open does not fail it


def fill(folder: Path, leave: int) -> None:
    """Take the free space of `folder`'s file system down to about `leave` bytes."""
    (folder / "filler").write_bytes(b"\0" * max(0, free_bytes(str(folder)) - leave))


def assert_nothing_partial(folder: Path) -> None:
    """No temporary file, no empty file, and every PNG decodes."""
    for path in folder.rglob("*"):
        if path.is_file():
            assert not path.name.startswith("."), f"temporary file left: {path}"
            assert path.stat().st_size > 0, f"empty file left: {path}"
            if path.suffix == ".png":
                assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, f"partial picture: {path}"


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", MiB)
    path = disk / "ckpt.pth"
    atomic_save({"w": torch.zeros(10)}, str(path))
    before = path.read_bytes()
    with pytest.raises(OSError) as e:
        atomic_save({"w": torch.zeros(300_000)}, str(path))  # 1.2 MB: torch's writer fails, then closes the zip
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert describe_os_error(e.value).startswith(f"no space left on device: {path} ")
    assert path.read_bytes() == before and [p.name for p in disk.iterdir()] == ["ckpt.pth"]


def test_a_writer_that_hides_the_errno_is_read_by_the_space_left(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", MiB)

    def write(f) -> None:  # as a writer that turns the file's error into its own, without the errno
        try:
            f.write(b"x" * 2 * MiB)
            f.flush()
        except OSError:
            raise RuntimeError("writer failed") from None

    with pytest.raises(OSError) as e:
        atomic_write(str(disk / "out.bin"), write, True, ".tmp_", ".bin")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "out.bin")
    assert not list(disk.iterdir())


def test_a_writer_error_with_space_left_stays_what_it_is(tmp_path):
    def write(f) -> None:
        raise RuntimeError("not a disk problem")

    with pytest.raises(RuntimeError, match="not a disk problem"):
        atomic_write(str(tmp_path / "out.bin"), write, True, ".tmp_", ".bin")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_train_on_a_full_disk_stops_with_one_line_and_keeps_the_checkpoints(tmp_path, data, small_disk):
    """A real full disk at the checkpoint of iteration 4: torch.save's error becomes 'no space left on device'."""
    train_script.main(tiny(tmp_path / "first", data))
    ckpt = (tmp_path / "first" / "runs" / "run" / "ckpt_00000002.pth").stat().st_size
    used = sum(p.stat().st_size for p in (tmp_path / "first" / "runs").rglob("*") if p.is_file())
    root = tmp_path / "full"
    runs = small_disk(root / "runs", used + ckpt // 2)  # room for the logs, not for another checkpoint
    shutil.copytree(tmp_path / "first" / "runs", runs, dirs_exist_ok=True)
    run = runs / "run"
    before = snapshot(run)
    message = fails(train_script.main, tiny(root, data, max_iter=4) + ["--force-resume"])
    assert message.startswith(f"no space left on device: {run / 'ckpt_00000004.pth'} "), message
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k.endswith(".pth")} == \
        {k: v for k, v in before.items() if k.endswith(".pth")}
    assert_nothing_partial(run)


# ------------------------------------------------------------------ pictures, label ids, pages


def pictures(n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"kind{i}": rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(n)}  # noise: ~37 KB


def test_pictures_on_a_full_disk_stop_naming_the_file_and_leave_no_partial_file(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", MiB)
    fill(disk, 100_000)
    with pytest.raises(OSError) as e:
        write_images(str(disk / "dump"), "img", pictures())
    assert e.value.errno == errno.ENOSPC and e.value.filename.startswith(str(disk / "dump" / "img_kind"))
    (disk / "filler").unlink()
    assert_nothing_partial(disk)
    assert len(list((disk / "dump").iterdir())) >= 1  # the first pictures were written whole


def test_label_ids_on_a_full_disk_are_not_taken_as_done(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", MiB)
    fill(disk, 4096)
    writer = LabelIdWriter(str(disk / "submit"), np.arange(256, dtype=np.uint8), with_prob=True)
    logits = torch.randn(19, 256, 512)
    with pytest.raises(OSError) as e:
        writer.add("a", logits)
    assert e.value.errno == errno.ENOSPC and e.value.filename.startswith(str(disk / "submit" / "a"))
    assert not writer.done("a")  # a resume writes it again
    (disk / "filler").unlink()
    assert_nothing_partial(disk)


def test_a_results_page_on_a_full_disk_keeps_the_previous_page(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", MiB)
    page = disk / "index.html"
    write_results_page(str(page), "before", [])
    before = page.read_bytes()
    fill(disk, 4096)
    many = [{"name": f"image {i} " + "x" * 200, "score": 0.5, "files": {"input": str(disk / f"{i}.png")}}
            for i in range(5000)]
    with pytest.raises(OSError) as e:
        write_results_page(str(page), "after", many)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(page)
    assert page.read_bytes() == before


@pytest.mark.slow
def test_eval_on_a_full_disk_stops_with_one_line_and_no_empty_picture(tmp_path, small_disk):
    overrides, ckpt = make_setup(str(tmp_path))
    out = small_disk(tmp_path / "out", MiB)
    fill(out, 64 * 1024)  # the log's first lines fit, a few pictures do, the rest do not
    message = fails(eval_script.main, [*overrides, "--checkpoint", ckpt, "--out", str(out), "eval.dump=all"])
    assert message.startswith(f"no space left on device: {out}/") and ".png (free space" in message, message
    (out / "filler").unlink()
    assert_nothing_partial(out)
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------ evaluation memory


def tiny_config(*overrides: str):
    return load_config(None, tiny_run() + list(overrides))


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    cfg = tiny_config()
    return network.build_model(cfg.model.name, 19, **cfg.model.options)


@pytest.mark.slow
def test_huge_scales_are_refused_with_the_estimate_and_what_fits(tiny_net, monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: 2 * 2**30)  # a machine with 2 GiB free
    with pytest.raises(MemoryPlanError) as e:
        check_eval_memory(tiny_config("eval.scales=[1.0,40.0]"), torch.device("cpu"), tiny_net, (64, 128),
                          training=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("eval.scales [1.0, 40.0]: evaluating 2 image(s) of 64x128"), \
        message
    assert "is estimated at 3." in message and "GiB, but cpu has 2." in message, message
    assert "would fit: eval.scales=[1.0] (" in message and "eval.window=[64,128]" in message, message
    assert tiny_net.training  # the modes training set are back


def test_a_budget_that_fits_is_proposed_on_a_cpu(tiny_net, monkeypatch):
    # Without dumps, one scale and one image at a time need about half the unconstrained peak; the planner
    # chooses such a schedule only under a budget, which a CPU has only when it is set.
    monkeypatch.setattr(memory, "host_available", lambda: 3 * 2**30)
    with pytest.raises(MemoryPlanError, match=r"would fit: eval.memory_budget=2\.\dGiB \(one scale at a time"):
        check_eval_memory(tiny_config("eval.scales=[1.0,40.0]"), torch.device("cpu"), tiny_net, (64, 128),
                          dumps=False, training=True)


def test_default_scales_are_accepted(tiny_net, monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: 2 * 2**30)
    line = check_eval_memory(tiny_config("eval.scales=[0.5,1.0,2.0]"), torch.device("cpu"), tiny_net, (64, 128))
    assert line.startswith("memory plan: eval.scales [0.5, 1.0, 2.0]") and "available on cpu" in line, line


def test_a_budget_no_schedule_fits_is_refused_before_the_first_image(tiny_net):
    cfg = tiny_config("eval.scales=[1.0,40.0]", "eval.memory_budget=100MiB")
    with pytest.raises(MemoryPlanError, match=r"over eval.memory_budget, 100.00 MiB\), but cpu has"):
        check_eval_memory(cfg, torch.device("cpu"), tiny_net, (64, 128))


@pytest.mark.slow
def test_the_demo_fits_this_machine():
    cfg = load_config(None, [])
    net = network.build_model(cfg.model.name, 19, **cfg.model.options)
    size = (cfg.data.synthetic.height, cfg.data.synthetic.width)
    assert check_eval_memory(cfg, torch.device("cpu"), net, size, training=True).startswith("memory plan:")


@pytest.mark.slow
def test_the_cityscapes_recipe_fits_an_80_gb_gpu(monkeypatch):
    """HRNet-OCR, scales [0.5, 1.0, 2.0] on 1024x2048 images, planned as on a GPU with 79 GiB free (on the CPU)."""
    monkeypatch.setattr(memory, "device_free", lambda device: 79 * 2**30)
    cfg = load_config("configs/cityscapes/eval_hmsa_ocrnet_hrnet_w48.yaml", ["eval.scales=[0.5,1.0,2.0]"])
    net = network.build_model(cfg.model.name, 19, **cfg.model.options)
    line = check_eval_memory(cfg, torch.device("cuda"), net, (1024, 2048))
    assert line.startswith("memory plan:") and "79.00 GiB available on cuda" in line, line


def test_host_available_is_a_share_of_the_machine():
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < host_available() <= total


def test_largest_input_size_reads_headers_and_applies_the_eval_resize(tmp_path):
    paths = []
    for h, w in ((100, 200), (300, 400), (50, 900)):
        paths.append(str(tmp_path / f"{h}x{w}.png"))
        cv2.imwrite(paths[-1], np.zeros((h, w, 3), np.uint8))
    paths.append(str(tmp_path / "missing.png"))  # the loader reports it, not this
    data = load_config(None, []).data
    assert largest_input_size(paths, data) == (300, 400)
    resized = load_config(None, ["data.eval_size=800"]).data
    assert largest_input_size(paths, resized) == (600, 800)


# ------------------------------------------------------------------ through the entry points (the calls in
# train.py and eval.py)


def test_train_refuses_huge_scales_before_training(tmp_path, data, monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: 2 * 2**30)
    message = fails(train_script.main, tiny(tmp_path, data) + ["eval.scales=[1.0,40.0]"])
    assert message.startswith("eval.scales [1.0, 40.0]: ") and "available" in message, message
    assert not list((tmp_path / "runs" / "run").glob("*.pth"))


@pytest.mark.slow
def test_eval_refuses_huge_scales_before_the_first_image(tmp_path, monkeypatch):
    overrides, ckpt = make_setup(str(tmp_path), fit=False)
    monkeypatch.setattr(memory, "host_available", lambda: 2**30)  # 2 x 48x96 at 40x: ~2 GiB
    out = tmp_path / "out"
    message = fails(eval_script.main, [*overrides, "--checkpoint", ckpt, "--out", str(out), "eval.scales=[1.0,40.0]"])
    assert message.startswith("eval.scales [1.0, 40.0]: ") and "available" in message, message
    assert not list(out.glob("*.png")) and not (out / "results.json").exists()
