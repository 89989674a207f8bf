"""Mapillary (config.json, palette labels, eval size), custom datasets (class YAML, id map), folders, colour masks."""
from __future__ import annotations

import json
import logging
import os
import runpy

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DataError, DataNotFoundError, build_dataset, build_loader
from datasets.custom import colors_to_ids, read_class_list
from utils.config import DataConfig
from utils.inference.video import VideoReader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LABELS = [
    {"readable": "Bird", "name": "animal--bird", "color": [165, 42, 42], "evaluate": True},
    {"readable": "Ground Animal", "name": "animal--ground-animal", "color": [0, 192, 0], "evaluate": True},
    {"readable": "Curb", "name": "construction--barrier--curb", "color": [196, 196, 196], "evaluate": True},
    {"readable": "Unlabeled", "name": "void--unlabeled", "color": [0, 0, 0], "evaluate": False},
]


def write_palette_png(path: str, values: np.ndarray) -> None:
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    im.putpalette([c for label in LABELS for c in label["color"]] + [0] * (768 - 3 * len(LABELS)))
    im.save(path)


@pytest.fixture(scope="module")
def mapillary(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mvd")
    with open(root / "config.json", "w") as f:
        json.dump({"labels": LABELS, "version": "1.2"}, f)
    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2), ("testing", 2)):
        os.makedirs(root / split / "images")
        if split != "testing":
            os.makedirs(root / split / "labels")
        for i in range(n):
            name = f"img{i:03d}"
            cv2.imwrite(str(root / split / "images" / f"{name}.jpg"), rng.integers(0, 255, (40, 60, 3), np.uint8))
            if split != "testing":
                write_palette_png(str(root / split / "labels" / f"{name}.png"), rng.integers(0, 4, (40, 60)))
    return str(root)


def mvd_cfg(root: str, **kw) -> DataConfig:
    return DataConfig.make(dataset="mapillary", root=root, num_workers=0, crop_size=(24, 24), **kw)


def test_mapillary_classes_and_labels(mapillary):
    ds = build_dataset(mvd_cfg(mapillary), "val", train=False)
    assert (ds.num_classes, ds.ignore_index) == (3, 3)
    assert ds.class_names == ["Bird", "Ground_Animal", "Curb"] and ds.palette.tolist()[2] == [196, 196, 196]
    item = ds[0]
    raw = np.asarray(Image.open(ds.samples[0].mask))
    assert torch.equal(item["mask"], torch.from_numpy(raw.astype(np.int64)))  # indices, not palette colours
    assert item["image"].shape == (3, 40, 60)
    train = build_dataset(mvd_cfg(mapillary, long_edge=30), "train", train=True)
    assert train[0]["mask"].shape == (24, 24)
    test = build_dataset(mvd_cfg(mapillary), "test", train=False)
    assert "mask" not in test[0]


def test_mapillary_eval_size(mapillary):
    resized = build_dataset(mvd_cfg(mapillary, eval_size=30), "val", train=False)[0]
    assert resized["image"].shape == (3, 20, 30) and resized["mask"].shape == (20, 30)
    from_pre_size = build_dataset(mvd_cfg(mapillary, long_edge=30), "val", train=False)[0]
    assert from_pre_size["image"].shape == (3, 20, 30)
    native = build_dataset(mvd_cfg(mapillary, eval_size=30, eval_native_labels=True), "val", train=False)[0]
    assert native["image"].shape == (3, 20, 30) and native["mask"].shape == (40, 60)


def test_mapillary_bad_config(tmp_path, mapillary):
    root = tmp_path / "m"
    os.makedirs(root / "validation" / "images")
    with pytest.raises(DataNotFoundError, match="config.json"):
        build_dataset(mvd_cfg(str(root)), "val", False)
    (root / "config.json").write_text(json.dumps({"labels": [{"readable": "x", "color": [1, 2, 3]}]}))
    with pytest.raises(DataError, match=r"labels\[0\].*evaluate"):
        build_dataset(mvd_cfg(str(root)), "val", False)
    (root / "config.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(DataError, match="'labels'"):
        build_dataset(mvd_cfg(str(root)), "val", False)


CLASSES_YAML = """\
names: [background, road, car]
colors: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
ignore_index: 255
id_map: {0: 0, 7: 1, 26: 2, 255: 255}
"""


@pytest.fixture()
def custom(tmp_path) -> tuple[str, str]:
    root = tmp_path / "mine"
    classes = tmp_path / "classes.yaml"
    classes.write_text(CLASSES_YAML)
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for i in range(3):
            sub = "a" if i < 2 else "b/c"
            os.makedirs(root / "images" / split / sub, exist_ok=True)
            os.makedirs(root / "masks" / split / sub, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / sub / f"p{i}.jpg"), rng.integers(0, 255, (30, 40, 3), np.uint8))
            cv2.imwrite(str(root / "masks" / split / sub / f"p{i}.png"), rng.choice([0, 7, 26, 255], (30, 40)).astype(np.uint8))
    return str(root), str(classes)


def test_custom_dataset_trains_from_a_config(custom):
    root, classes = custom
    cfg = DataConfig.make(dataset="custom", root=root, classes=classes, num_workers=0, crop_size=(16, 16),
                     batch_size=2)
    train = build_dataset(cfg, "train", train=True)
    assert (train.num_classes, train.ignore_index, train.class_names) == (3, 255, ["background", "road", "car"])
    assert [s.name for s in train.samples] == ["a_p0", "a_p1", "b_c_p2"]
    batch = next(iter(build_loader(train, cfg, train=True)))
    assert batch["mask"].shape == (2, 16, 16) and set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    val = build_dataset(cfg, "val", train=False)
    raw = cv2.imread(val.samples[0].mask, cv2.IMREAD_UNCHANGED)
    lut = {0: 0, 7: 1, 26: 2, 255: 255}
    assert val[0]["mask"].tolist() == [[lut[v] for v in row] for row in raw.tolist()]


def test_custom_dataset_errors(custom, tmp_path):
    root, classes = custom
    cfg = DataConfig.make(dataset="custom", root=root, classes=classes, num_workers=0)
    bad = os.path.join(root, "masks/val/a/p0.png")
    m = np.zeros((30, 40), np.uint8)
    m[0, 0] = 8
    cv2.imwrite(bad, m)
    with pytest.raises(DataError, match=r"p0.png.*: 8"):
        build_dataset(cfg, "val", False)[0]
    os.remove(bad)
    with pytest.raises(DataError, match="without a mask.*a/p0.png"):
        build_dataset(cfg, "val", False)
    (tmp_path / "bad.yaml").write_text("names: [a]\ncolours: [[1, 2, 3]]\n")
    with pytest.raises(DataError, match="colours"):
        read_class_list(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad2.yaml").write_text("names: [a, b]\nignore_index: 1\n")
    with pytest.raises(DataError, match="ignore_index"):
        read_class_list(str(tmp_path / "bad2.yaml"))
    with pytest.raises(DataNotFoundError, match="nope.yaml"):
        read_class_list(str(tmp_path / "nope.yaml"))


def test_folder_dataset(tmp_path):
    for i, (h, w) in enumerate([(20, 30), (24, 16)]):
        cv2.imwrite(str(tmp_path / f"x{i}.png"), np.full((h, w, 3), 9 * i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0, val_batch_size=1)
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 2 and ds.num_classes == 19 and set(ds[1]) == {"image", "name"} and ds[1]["image"].shape == (3, 24, 16)
    assert ds.label_map.id_to_train[26] == 13  # predictions can be written back as Cityscapes label ids
    assert [b["name"] for b in build_loader(ds, cfg, train=False)] == [["x0"], ["x1"]]
    mixed = build_loader(ds, DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0, val_batch_size=2), False)
    with pytest.raises(DataError, match="different sizes"):
        next(iter(mixed))
    with pytest.raises(DataNotFoundError, match="image folder not found.*missing"):
        build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path / "missing")), "val", False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataNotFoundError, match="no images.*empty"):
        build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path / "empty")), "val", False)


def test_folder_unreadable_image_is_an_error_or_skipped(tmp_path, caplog):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"x{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    bad = tmp_path / "x1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header survives, the pixels do not
    before = bad.read_bytes()
    strict = build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0), "folder", False)
    assert [s.name for s in strict.samples] == ["x0", "x1", "x2"]
    with pytest.raises(DataError, match=rf"^cannot decode image \(truncated file: its PNG data ends early; re-copy it\): "
                                        rf"{bad}$"):
        strict[1]
    skipping = build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0, skip_bad=True), "folder",
                             False)
    with caplog.at_level("WARNING", logger="datasets.base"):
        items = [skipping[i] for i in range(3)]
    # x1 logged and marked skipped: evaluation leaves it out (another image's pixels keep a batch whole)
    assert [(item["name"], item.get("skipped", False)) for item in items] == [("x0", False), ("x1", True), ("x2", False)]
    assert [r.getMessage() for r in caplog.records] == [f"skipping unreadable sample 1: cannot decode image (truncated "
                                                        f"file: its PNG data ends early; re-copy it): {bad} (left out "
                                                        "of the evaluation)"]
    assert bad.read_bytes() == before


def test_colors_to_ids():
    colors = np.array([[0, 0, 0], [128, 64, 128], [0, 0, 142]])
    ids = np.array([0, 1, 2])
    rgb = colors[np.array([[0, 1], [2, 1]])].astype(np.uint8)
    assert colors_to_ids(rgb, colors, ids).tolist() == [[0, 1], [2, 1]]
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(DataError, match=r"\(1, 2, 3\)"):
        colors_to_ids(rgb, colors, ids)
    assert colors_to_ids(rgb, colors, ids, unknown=255).tolist() == [[255, 1], [2, 1]]


def test_colour_mask_converter_script(tmp_path, capsys):
    (tmp_path / "classes.yaml").write_text(CLASSES_YAML)
    os.makedirs(tmp_path / "colour" / "sub")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, 4:] = (128, 64, 128)
    cv2.imwrite(str(tmp_path / "colour" / "sub" / "m.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "ids"
    convert = runpy.run_path(os.path.join(REPO, "scripts", "prepare_color_masks.py"))["main"]
    args = [str(tmp_path / "colour"), str(out), "--classes", str(tmp_path / "classes.yaml")]
    assert convert(args) == 0
    ids = cv2.imread(str(out / "sub" / "m.png"), cv2.IMREAD_UNCHANGED)
    assert ids.shape == (6, 8) and (ids[:, :4] == 0).all() and (ids[:, 4:] == 1).all()
    rgb[0, 0] = (9, 9, 9)
    cv2.imwrite(str(tmp_path / "colour" / "sub" / "m.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    with pytest.raises(SystemExit) as e:
        convert(args)
    assert e.value.code == 2 and "m.png" in str(e.value) and "(9, 9, 9)" in str(e.value)
    assert convert(args + ["--unknown", "ignore"]) == 0
    assert cv2.imread(str(out / "sub" / "m.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 255


def test_prepare_mapillary_script(mapillary, tmp_path, capsys):
    check = runpy.run_path(os.path.join(REPO, "scripts", "prepare_mapillary.py"))["main"]
    assert check([mapillary]) == 0
    assert "3 evaluated classes, ignore value 3" in capsys.readouterr().out
    broken = tmp_path / "m"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"labels": LABELS}))
    os.makedirs(broken / "training" / "images")
    cv2.imwrite(str(broken / "training" / "images" / "a.jpg"), np.zeros((4, 4, 3), np.uint8))
    assert check([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "training/labels/a.png" in out and "validation" in out


def write_avi(path, frames: int) -> None:
    # MJPG in AVI: the frame count is in the header and each frame stands alone, so a cut file still opens.
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), np.uint8))
    writer.release()


def test_truncated_video_ends_with_a_warning_counting_the_frames(tmp_path, caplog):
    whole = tmp_path / "whole.avi"
    write_avi(whole, 10)
    with caplog.at_level(logging.WARNING, logger="utils.inference.video"):
        reader = VideoReader(str(whole))
        assert reader.frame_count == 10 and len(list(reader)) == 10 and reader.frames_read == 10
    assert caplog.records == []  # a complete video ends quietly
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="utils.inference.video"):
        reader = VideoReader(str(cut))
        frames = list(reader)
    assert reader.frame_count == 10 and 0 < len(frames) < 10 and reader.frames_read == len(frames)
    [record] = caplog.records
    assert record.getMessage() == (f"video {cut} ended after {len(frames)} of the 10 frames its container announces: "
                                   "the file is truncated or damaged (the frames read were processed)")
