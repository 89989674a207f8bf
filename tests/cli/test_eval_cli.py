"""eval.py end to end on generated data: pictures, HTML page, TensorBoard, sweep tables, dump selection,
submission and autolabel files, video, and the errors raised before any work for bad input."""
import csv
import json
import math
import os
import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval as eval_script
from datasets import build_dataset
from datasets.cityscapes import label_map
from tests.fixtures import HEIGHT, NUM_VAL, WIDTH, make_setup, tiny_model
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.evaluation.dumps import image_miou, train_to_label_lut
from utils.engine import predict
from utils.inference import Inference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    overrides, ckpt = make_setup(str(root))
    return str(root), overrides, ckpt


def run(setup, out, *extra):
    root, overrides, ckpt = setup
    return eval_script.main([*overrides, "--checkpoint", ckpt, "--out", str(out), *extra])


def val_names(root):
    folder = os.path.join(root, "data", "leftImg8bit", "val")
    files = [f for city in os.listdir(folder) for f in os.listdir(os.path.join(folder, city))]
    return sorted(f[: -len("_leftImg8bit.png")] for f in files)


@pytest.mark.slow
def test_pictures_page_tables_and_tensorboard(setup, tmp_path):
    out = tmp_path / "ev"
    summary = run(setup, out, "eval.dump=all")
    assert 0 <= summary["miou"] <= 1 and summary["images"] == NUM_VAL
    names = val_names(setup[0])
    kinds = ["input", "pred", "overlay", "gt", "error", "conf", "pred_0.5x", "pred_1.0x", "attn_0.5x"]
    assert not list(out.glob("*_attn_1.0x.png"))  # the top scale's attention weights nothing: not computed
    for name in names:
        for kind in kinds:
            img = cv2.imread(str(out / f"{name}_{kind}.png"))
            assert img is not None, (name, kind)
            expected = (HEIGHT // 2, WIDTH // 2) if kind == "pred_0.5x" else (HEIGHT, WIDTH)
            assert img.shape[:2] == expected, (name, kind)
    page = (out / "index.html").read_text()
    for src in re.findall(r"src='([^']+)'", page):
        assert (out / src).is_file(), src
    assert len(re.findall(r"src='", page)) == len(names) * len(kinds)
    assert all(name in page for name in names) and "sidewalk" in page and "mIoU" in page
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert len(rows) == 19 and rows[0]["name"] == "road"
    results = json.load(open(out / "results.json"))
    assert sum(int(r["tp"]) + int(r["fn"]) for r in rows) == results["pixels"]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    images = events.Tags()["images"]
    assert f"eval/{names[0]}/overlay" in images and f"eval/{names[0]}/attn_0.5x" in images


@pytest.mark.slow
def test_sweep_tables_from_the_command_line(setup, tmp_path):
    out = tmp_path / "sweep"
    run(setup, out, "eval.scale_sets=[[1.0],[0.5,1.0],[0.5,1.0,2.0]]", "eval.sweep_fusions=[attention,max]",
        "eval.sweep_flips=[false]", "eval.dump=none")
    sweep = json.load(open(out / "sweep.json"))
    labels = [(tuple(sorted(r["scales"])), r["fusion"], r["flip"]) for r in sweep["rows"]]
    assert labels == [((1.0,), "none", False), ((0.5, 1.0), "attention", False), ((0.5, 1.0), "max", False),
                      ((0.5, 1.0, 2.0), "attention", False), ((0.5, 1.0, 2.0), "max", False)]
    assert sweep["rows"][0]["miou_gain"] == 0
    for r in sweep["rows"]:
        assert math.isclose(r["miou_gain"], 100 * (r["miou"] - sweep["rows"][0]["miou"]), abs_tol=1e-9)
        assert len(r["gain"]) == 19
    # the configured setting (eval.scales=[0.5,1.0], attention, no flip) is the sweep's row
    results = json.load(open(out / "results.json"))
    assert math.isclose(results["miou"], sweep["rows"][1]["miou"])
    rows = list(csv.reader(open(out / "sweep.csv")))
    assert rows[0][:5] == ["scales", "fusion", "flip", "miou", "miou_gain"] and len(rows) == 6
    assert rows[0][5] == "iou_road" and rows[0][-1] == "gain_bicycle"
    assert not list(out.glob("*_pred.png"))  # eval.dump=none


@pytest.mark.slow
def test_dump_selection_worst_and_every(setup, tmp_path):
    all_out, worst_out, every_out = tmp_path / "all", tmp_path / "worst", tmp_path / "every"
    run(setup, all_out, "eval.dump=all", "eval.num_dump=0")
    # per-image mIoU recomputed from the written ground truth / prediction pictures is not exact: use the model
    root, overrides, ckpt = setup
    model = tiny_model()
    load_checkpoint(model, ckpt)
    cfg = load_config(None, overrides)
    ds = build_dataset(cfg.data, "val", train=False)
    with torch.no_grad():
        scores = {}
        for i in range(len(ds)):
            item = ds[i]
            pred = predict(model, item["image"][None], Inference.make([0.5, 1.0]))["pred"].argmax(1)[0]
            scores[item["name"]] = image_miou(pred, item["mask"], 19)
    expected = sorted(scores, key=scores.get)[:2]
    run(setup, worst_out, "eval.dump=worst", "eval.num_dump=2")
    assert sorted(p.name[: -len("_input.png")] for p in worst_out.glob("*_input.png")) == sorted(expected)
    page = (worst_out / "index.html").read_text()
    assert page.index(expected[0]) < page.index(expected[1])  # worst first
    run(setup, every_out, "eval.dump=every", "eval.num_dump=2")
    names = val_names(root)
    assert sorted(p.name[: -len("_input.png")] for p in every_out.glob("*_input.png")) == names[::2]


@pytest.mark.slow
def test_submission_label_ids_round_trip_and_resume(setup, tmp_path):
    root, overrides, ckpt = setup
    # a 'test' split: the val images without labels
    src = os.path.join(root, "data", "leftImg8bit", "val")
    dst = os.path.join(root, "data", "leftImg8bit", "test")
    if not os.path.isdir(dst):
        shutil.copytree(src, dst)
    out = tmp_path / "sub"
    summary = run(setup, out, "--split", "test", "--submit", "eval.dump=none")
    assert "miou" not in summary and summary["label_files_written"] == NUM_VAL
    table = label_map()
    model = tiny_model()
    load_checkpoint(model, ckpt)
    ds = build_dataset(load_config(None, overrides).data, "test", train=False)
    for i in range(len(ds)):
        item = ds[i]
        ids = cv2.imread(str(out / "submit" / f"{item['name']}_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == (HEIGHT, WIDTH)
        assert set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
        with torch.no_grad():
            pred = predict(model, item["image"][None], Inference.make([0.5, 1.0]))["pred"].argmax(1)[0].numpy()
        assert np.array_equal(table(ids), pred)  # label ids map back to the predicted train ids
    # resume: nothing is rewritten; a deleted file is written again
    first = out / "submit" / f"{ds[0]['name']}_leftImg8bit.png"
    os.remove(first)
    again = run(setup, out, "--split", "test", "--submit", "eval.dump=none")
    assert again["label_files_written"] == 1 and first.is_file()


def test_train_id_lut_round_trips_every_class():
    table = label_map()
    lut = train_to_label_lut(table.id_to_train, 19)
    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    assert np.array_equal(table(lut[train_ids]), train_ids)
    assert lut[0] == 7 and lut[18] == 33 and lut[255] == 0


@pytest.mark.slow
def test_autolabel_writes_probabilities(setup, tmp_path):
    out = tmp_path / "auto"
    run(setup, out, "--autolabel", "eval.dump=none")
    names = val_names(setup[0])
    for name in names:
        prob = cv2.imread(str(out / "autolabel" / f"{name}_leftImg8bit_prob.png"), cv2.IMREAD_UNCHANGED)
        ids = cv2.imread(str(out / "autolabel" / f"{name}_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
        assert prob.shape == ids.shape == (HEIGHT, WIDTH) and prob.dtype == np.uint8
        assert prob.min() >= 255 // 19  # a max softmax probability is at least 1/K
    summary = run(setup, out, "--autolabel", "eval.dump=none")
    assert summary["label_files_written"] == 0


@pytest.mark.slow
def test_folder_of_images_gives_pictures_and_autolabels(setup, tmp_path):
    root = setup[0]
    folder = tmp_path / "images"
    folder.mkdir()
    src = os.path.join(root, "data", "leftImg8bit", "val")
    for city in sorted(os.listdir(src))[:2]:
        for f in sorted(os.listdir(os.path.join(src, city))):
            shutil.copy(os.path.join(src, city, f), folder / f)
    stems = sorted(f[:-4] for f in os.listdir(folder))
    out = tmp_path / "folder"
    summary = run(setup, out, "--folder", str(folder), "--autolabel")
    assert "miou" not in summary and summary["images"] == len(stems) and summary["label_files_written"] == len(stems)
    for stem in stems:  # a folder is run to be looked at: every image gets its pictures
        assert cv2.imread(str(out / f"{stem}_overlay.png")) is not None
        assert not (out / f"{stem}_gt.png").exists()
        ids = cv2.imread(str(out / "autolabel" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(ids)) <= set(label_map().id_to_train)
        assert (out / "autolabel" / f"{stem}_prob.png").is_file()
    assert "<table class='metrics'>" not in (out / "index.html").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images"):
        run(setup, tmp_path / "nothing", "--folder", str(empty))
    assert not (tmp_path / "nothing").exists()


def make_clip(path, frames=5):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (WIDTH, HEIGHT))
    rng = np.random.default_rng(0)
    for i in range(frames):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[: HEIGHT // 2] = (200, 150, 100)
        frame[HEIGHT // 2 :] = (90, 90, 90)
        cv2.circle(frame, (10 + 15 * i, HEIGHT // 2), 8, (30, 30, 220), -1)
        frame = np.clip(frame + rng.integers(0, 20, frame.shape), 0, 255).astype(np.uint8)
        writer.write(frame)
    writer.release()


@pytest.mark.slow
def test_video_is_annotated_frame_by_frame(setup, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    out = tmp_path / "vid"
    summary = run(setup, out, "--video", str(clip), "eval.video_attention=true")
    assert summary["frames"] == 5
    cap = cv2.VideoCapture(summary["video"])
    count = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        count += 1
        assert frame.shape == (HEIGHT, 2 * WIDTH, 3)  # overlay | attention 0.5x (1.0x, the top scale, has none)
    assert count == 5
    assert "5/5 frames" in capsys.readouterr().err


@pytest.mark.slow
def test_video_attention_at_one_scale_warns_and_shows_the_overlay(setup, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=2)
    summary = run(setup, tmp_path / "one", "--video", str(clip), "eval.video_attention=true", "eval.scales=[1.0]")
    ok, frame = cv2.VideoCapture(summary["video"]).read()
    assert ok and frame.shape == (HEIGHT, WIDTH, 3)
    assert "eval.video_attention: no attention map to show" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_fails_before_any_work(setup, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match=r"eval.scales.*contain 1.0"):
        run(setup, out, "eval.scales=[0.5,2.0]")
    with pytest.raises(SystemExit, match=r"eval.scale_sets\[1\].*positive"):
        run(setup, out, "eval.scale_sets=[[1.0],[-0.5,1.0]]")
    with pytest.raises(SystemExit, match="eval.fusion"):
        run(setup, out, "eval.fusion=median")
    with pytest.raises(SystemExit, match="eval.window"):
        run(setup, out, "eval.window=[64]")
    with pytest.raises(SystemExit, match="missing.mp4"):
        run(setup, out, "--video", str(tmp_path / "missing.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(SystemExit, match="garbage.mp4"):
        run(setup, out, "--video", str(garbage))
    other = tmp_path / "other.pth"
    torch.save({"model": tiny_model(num_classes=7).state_dict()}, other)
    root, overrides, _ = setup
    with pytest.raises(SystemExit, match="does not match"):
        eval_script.main([*overrides, "--checkpoint", str(other), "--out", str(out)])
    assert not out.exists()  # nothing was written
