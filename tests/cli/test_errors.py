"""The catalogue of bad input: what a user can get wrong, and what the program must answer.

Every case asserts the one-line message (naming the key, file or value and what to do), exit code 2, and that
the files that existed before are byte-identical afterwards (no checkpoint, result or run folder changed or lost).
Cases run the entry points in-process (`main(argv)`), except the few that check what a shell user sees (stderr,
no traceback). Read the tables as: case id, command (overrides), expected message fragment.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train as train_script
from datasets.synthetic import generate_synthetic_cityscapes
from tests.fixtures import SYNTHETIC_KEYS, TINY_MODEL, options_yaml, tiny_run
from utils.checkpoint import checkpoint_paths

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


@pytest.mark.parametrize("key,value", [("run.output_dir", "/proc/hmsa_x"), ("eval.dump_dir", "/proc/hmsa_x")])
def test_unwritable_output_folders_fail_at_start(key, value, tmp_path, data):
    message = fails(train_script.main, tiny(tmp_path, data) + [f"{key}={value}"])
    assert key in message and "/proc/hmsa_x" in message and "choose a writable folder" in message, message
    assert not list((tmp_path / "runs" / "run").glob("ckpt_*")) if (tmp_path / "runs").exists() else True


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
    assert message == f"cannot decode image (corrupt, truncated or not an image): {bad}", message


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
