"""End to end on generated data: train, checkpoint, resume, evaluate, dump images."""
import json
import os
import warnings

import pytest
import torch

import eval as eval_script
import train as train_script
from tests.fixtures import tiny_run
from utils.checkpoint import checkpoint_paths, read_checkpoint

# Every test here trains a model.
pytestmark = pytest.mark.slow


def overrides(tmp_path, max_iter=4, run="run"):
    return tiny_run(root=tmp_path, run=run, max_iter=max_iter)


def test_train_writes_run_folder_and_evaluates(tmp_path):
    metrics = train_script.main(overrides(tmp_path))
    run = tmp_path / "runs" / "run"
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (run / "config.yaml").is_file()
    assert [os.path.basename(p) for p in checkpoint_paths(str(run))] == ["ckpt_00000004.pth", "ckpt_00000002.pth"]
    ckpt = read_checkpoint(str(run / "ckpt_00000004.pth"))
    assert ckpt["state"]["iteration"] == 4 and ckpt["config"]["train"]["max_iter"] == 4
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert {"loss", "lr", "main"} <= set(rows[0])
    assert any(r["split"] == "val" for r in rows)
    assert list((run / "tb").iterdir())
    results = json.load(open(run / "eval" / "results.json"))
    assert results["scales"] == [0.5, 1.0] and len(results["per_class"]) == 19
    names = {p.name for p in (run / "eval").iterdir()}
    assert any(n.endswith("_attn_0.5x.png") for n in names)
    assert any(n.endswith("_overlay.png") for n in names)

    # eval.py reproduces the run from its own config.yaml, with another scale set
    ev = eval_script.main(["--config", str(run / "config.yaml"), "eval.scales=[0.5,1.0,2.0]",
                           "--out", str(tmp_path / "ev")])
    assert json.load(open(tmp_path / "ev" / "results.json"))["scales"] == [0.5, 1.0, 2.0]
    assert 0.0 <= ev["miou"] <= 1.0
    dumped = {p.name for p in (tmp_path / "ev").iterdir()}
    assert any(n.endswith("_attn_1.0x.png") for n in dumped)
    assert not any(n.endswith("_attn_2.0x.png") for n in dumped)  # as the original: the top scale's is unused


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    torch.use_deterministic_algorithms(True)
    try:
        train_script.main(overrides(tmp_path, max_iter=6, run="straight"))
        straight = read_checkpoint(str(tmp_path / "runs" / "straight" / "ckpt_00000006.pth"))["model"]

        real = train_script.train_step
        steps = []

        def crash_at_5(*args, **kwargs):
            out = real(*args, **kwargs)
            steps.append(1)
            if len(steps) == 5:  # killed after step 5, before its logging and checkpoint
                raise KeyboardInterrupt("simulated kill")
            return out

        monkeypatch.setattr(train_script, "train_step", crash_at_5)
        with pytest.raises(KeyboardInterrupt):
            train_script.main(overrides(tmp_path, max_iter=6, run="resumed"))
        monkeypatch.setattr(train_script, "train_step", real)
        train_script.main(overrides(tmp_path, max_iter=6, run="resumed"))  # --resume auto is the default
    finally:
        torch.use_deterministic_algorithms(False)
    log = open(tmp_path / "runs" / "resumed" / "train.log").read()
    assert "resumed from" in log and "ckpt_00000004.pth" in log
    resumed = read_checkpoint(str(tmp_path / "runs" / "resumed" / "ckpt_00000006.pth"))["model"]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def always_overflowing_scaler(precision, device):
    """A loss scaler whose first scale overflows any fp16 gradient: every step is skipped and halves the scale, so
    the scale counts the steps since the scaler was made (the weights do not move)."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**60, enabled=precision == "fp16")


def train_rows(run_dir):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "train"]


def test_fp16_resume_continues_the_loss_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "grad_scaler", always_overflowing_scaler)
    fp16 = {"run.precision": "fp16", "eval.num_dump": 0}
    real = train_script.train_step

    def crash_at_3(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[4].get_scale() == 2.0**57:  # after step 3, before its logging and the final checkpoint
            raise KeyboardInterrupt("simulated kill")
        return out

    monkeypatch.setattr(train_script, "train_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_script.main(tiny_run(fp16, root=tmp_path, max_iter=3))
    # skipped steps still advance the schedule, as the original's: torch's warning about it is not shown
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    run = tmp_path / "runs" / "run"
    assert read_checkpoint(str(run / "ckpt_00000002.pth"))["scaler"]["scale"] == 2.0**58
    monkeypatch.setattr(train_script, "train_step", real)
    train_script.main(tiny_run(fp16, root=tmp_path, max_iter=3))
    assert [(r["iteration"], r["loss_scale"]) for r in train_rows(run)] == [(1, 2.0**59), (2, 2.0**58), (3, 2.0**57)]
    assert read_checkpoint(str(run / "ckpt_00000003.pth"))["scaler"]["scale"] == 2.0**57


def test_fp32_run_force_resumed_in_fp16_starts_a_fresh_loss_scale(tmp_path):
    train_script.main(overrides(tmp_path, max_iter=2))
    run = tmp_path / "runs" / "run"
    assert "loss_scale" not in train_rows(run)[0]
    assert read_checkpoint(str(run / "ckpt_00000002.pth"))["scaler"] == {}  # fp32: the scaler is off
    train_script.main(overrides(tmp_path, max_iter=3) + ["run.precision=fp16", "--force-resume"])
    assert "holds no loss-scaler state (saved without fp16): the fp16 loss scale starts afresh" in open(
        run / "train.log").read()
    assert train_rows(run)[-1]["iteration"] == 3 and train_rows(run)[-1]["loss_scale"] == 2.0**16


def test_resume_refuses_a_different_config(tmp_path):
    train_script.main(overrides(tmp_path, max_iter=2))
    with pytest.raises(SystemExit, match="train.lr"):
        train_script.main(overrides(tmp_path, max_iter=2) + ["train.lr=0.5"])


def test_non_finite_loss_stops_training_with_the_iteration(tmp_path, monkeypatch):
    real = train_script.build_criterion

    def poisoned(*args, **kwargs):
        criterion = real(*args, **kwargs)

        def call(outputs, target):
            total, terms = criterion(outputs, target)
            return total * float("nan"), terms

        return call

    monkeypatch.setattr(train_script, "build_criterion", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss at iteration 1") as e:
        train_script.main(overrides(tmp_path, max_iter=2))
    assert e.value.code == 2


def test_validation_every_epoch_keeps_the_best_checkpoint(tmp_path):
    # 8 images, batch 4: 2 steps per epoch; 3 epochs; validation after epochs 1 and 2, then the final one.
    args = [a for a in overrides(tmp_path) if not a.startswith("train.max_iter")]
    train_script.main(args + ["train.max_iter=0", "train.max_epoch=3", "train.val_epochs=1"])
    run = tmp_path / "runs" / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    val = {r["iteration"]: r["miou"] for r in rows if r["split"] == "val"}
    assert sorted(val) == [2, 4, 6]
    best_iteration = max(val, key=lambda it: (val[it], -it))  # the first of equal values is kept
    best = read_checkpoint(str(run / "best.pth"))
    assert best["best"] == {"miou": val[best_iteration], "iteration": best_iteration, "epoch": best_iteration // 2}
    assert best["state"]["iteration"] == best_iteration
    # ckpt_4 was written before the validation at iteration 4 (state.best_miou = val[2]); a run resumed from it
    # takes the best so far from best.pth, so that a worse model cannot replace it
    assert read_checkpoint(str(run / "ckpt_00000004.pth"))["state"]["best_miou"] == val[2]
    results = json.load(open(run / "eval" / "results.json"))
    assert (results["best_miou"], results["best_iteration"]) == (val[best_iteration], best_iteration)
    assert results["iteration"] == 6 and results["miou"] == val[6]
    log = (run / "train.log").read_text()
    assert f"best: mIoU {100 * val[best_iteration]:.2f} at iteration {best_iteration}" in log
    if best_iteration > 2:
        os.remove(run / "ckpt_00000006.pth")
        train_script.main(args + ["train.max_iter=0", "train.max_epoch=3", "train.val_epochs=1"])
        log = (run / "train.log").read_text().split("resumed from")[-1]
        assert f"best so far: mIoU {100 * val[best_iteration]:.2f} at iteration {best_iteration} (best.pth)" in log
        assert read_checkpoint(str(run / "best.pth"))["best"]["miou"] >= val[best_iteration]


@pytest.mark.timeout(600)
def test_epochs_of_different_lengths_are_each_trained_once(tmp_path, monkeypatch):
    # Switching coarse data off can shorten later epochs (class-uniform share over all classes). Epoch 0 has 8
    # samples (2 steps of 4), the later ones 4 (1 step): 3 epochs are 4 iterations, each epoch trained once.
    from datasets.base import SegmentationDataset

    real = SegmentationDataset.epoch_length
    monkeypatch.setattr(SegmentationDataset, "epoch_length",
                        lambda self, epoch: real(self, epoch) if epoch == 0 else 4)
    args = [a for a in overrides(tmp_path) if not a.startswith("train.max_iter")]
    train_script.main(args + ["train.max_iter=0", "train.max_epoch=3", "train.lr_step=epoch"])
    run = tmp_path / "runs" / "run"
    state = read_checkpoint(checkpoint_paths(str(run))[0])["state"]
    assert (state["iteration"], state["epoch"], state["epoch_samples"]) == (4, 3, 0)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"train"' in line]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])  # poly per epoch


def test_data_pipeline_warnings_reach_train_log(tmp_path):
    from datasets.synthetic import generate_synthetic_cityscapes

    data = tmp_path / "data"
    generate_synthetic_cityscapes(str(data), 8, 2, 64, 128, 0)
    bad = sorted((data / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[0]
    bad.write_bytes(b"not a png")
    args = [a for a in overrides(tmp_path, max_iter=2) if not a.startswith("data.root")]
    train_script.main(args + ["data.dataset=cityscapes", f"data.root={data}", "data.skip_bad=true"])
    log = (tmp_path / "runs" / "run" / "train.log").read_text()
    assert "WARNING: skipping unreadable sample" in log and bad.name in log
