"""data.verify: every image and mask decoded before work, in worker processes; the error lists each bad file."""
from __future__ import annotations

import json
import logging
import os
import runpy
import shutil

import cv2
import numpy as np
import pytest

from datasets import DataError, build_dataset
from datasets.synthetic import generate_synthetic_cityscapes
from datasets.verify import SHOWN, find_bad_files, verify_dataset
from utils.config import DataConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, W = 32, 48


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    return generate_synthetic_cityscapes(str(tmp_path_factory.mktemp("v") / "s"), 3, 4, H, W, 0)


def cfg(root: str, **kw) -> DataConfig:
    return DataConfig.make(**{"dataset": "cityscapes", "root": root, "num_workers": 0, "crop_size": (16, 16), **kw})


def files_of(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def val_file(root: str, city: str, index: int, kind: str) -> str:
    stem = f"{city}_{index:06d}_000019"
    if kind == "image":
        return os.path.join(root, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png")
    return os.path.join(root, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png")


@pytest.fixture()
def broken(clean, tmp_path) -> tuple[str, dict[str, str]]:
    """The clean dataset with three bad val samples: a truncated image, a mask of another size, unknown ids."""
    root = str(tmp_path / "b")
    shutil.copytree(clean, root)
    image = val_file(root, "lindau", 1, "image")
    with open(image, "rb") as f:
        data = f.read()
    with open(image, "wb") as f:
        f.write(data[: len(data) // 2])
    small = val_file(root, "munster", 2, "mask")
    cv2.imwrite(small, np.full((H // 2, W), 7, np.uint8))
    ids = val_file(root, "frankfurt", 3, "mask")
    mask = np.full((H, W), 7, np.uint8)
    mask[0, 0] = 99
    cv2.imwrite(ids, mask)
    return root, {"image": image, "small": small, "ids": ids}


def test_clean_dataset_passes_inline_and_in_workers(clean):
    ds = build_dataset(cfg(clean), "val", False)
    assert verify_dataset(ds, 0) == [] and verify_dataset(ds, 2) == []
    assert verify_dataset(build_dataset(cfg(clean), "train", True), 2) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_file_is_listed_one_line_each(broken, workers):
    root, bad = broken
    before = files_of(root)
    ds = build_dataset(cfg(root), "val", False)  # without data.verify nothing is decoded yet
    found = find_bad_files(ds, workers)
    assert [f for f, _ in found] == [bad["ids"], bad["image"], bad["small"]]  # sample order
    with pytest.raises(DataError) as e:
        verify_dataset(ds, workers)
    lines = str(e.value).splitlines()
    assert lines[0] == ("data.verify: 3 of 4 samples of cityscapes/val/cv0 have unusable files; replace or remove "
                        "them, or set data.skip_bad=true to skip them")
    assert lines[1] == (f"{bad['ids']}: label values not in the Cityscapes label table: 99 "
                        "(known ids: 0..33, 34 values)")
    assert lines[2] == f"cannot decode image (truncated file: its PNG data ends early; re-copy it): {bad['image']}"
    image = val_file(root, "munster", 2, "image")
    assert lines[3] == f"mask size 48x16 differs from image size 48x32 (WxH): {bad['small']} (image {image})"
    assert len(lines) == 4
    assert files_of(root) == before  # verification reads, never writes


def test_data_verify_in_build_dataset_runs_before_class_uniform_centroids(broken, tmp_path):
    root, bad = broken
    centroids = tmp_path / "centroids"
    settings = dict(num_workers=2, pct=0.5, tile=16, cache_dir=str(centroids))
    with pytest.raises(DataError, match=r"^data.verify: 3 of 4 samples of cityscapes/val/cv0"):
        build_dataset(cfg(root, verify=True, **settings), "val", train=True)
    assert not centroids.exists()  # stopped before any centroid was computed
    assert len(build_dataset(cfg(root, verify=True), "train", True)) == 3  # the train split is clean


def test_skip_bad_logs_each_bad_file_instead(broken, caplog):
    root, bad = broken
    with caplog.at_level(logging.WARNING, logger="datasets.verify"):
        ds = build_dataset(cfg(root, verify=True, skip_bad=True), "val", False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4 and all(w.startswith("data.verify: ") and w.endswith("(skipped: data.skip_bad=true)")
                                      for w in warnings[:3])
    assert bad["image"] in warnings[1] and bad["small"] in warnings[2]
    assert warnings[3] == "data.verify: 3 of 4 samples of cityscapes/val/cv0 skipped (data.skip_bad=true), 1 left"
    # Skipped, not replaced by another sample: an evaluation counts each image once.
    assert [s.name for s in ds.samples] == ["frankfurt_000000_000019"] and len(ds) == 1


def test_skip_bad_with_every_sample_bad_is_one_line(broken):
    root, _ = broken
    image = val_file(root, "frankfurt", 0, "image")
    with open(image, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DataError) as e:
        build_dataset(cfg(root, verify=True, skip_bad=True), "val", False)
    assert str(e.value) == ("data.verify: all 4 samples of cityscapes/val/cv0 have unusable files, e.g. cannot "
                            f"decode image (corrupt, truncated or not an image): {image}; check data.root")


def test_skip_bad_drops_with_the_class_uniform_centroids_renumbered(broken, tmp_path):
    """Dropping after the centroids were computed (what datasets.agree does for a file another rank cannot read)
    leaves the centroids a build without that file computes."""
    root, _ = broken
    settings = dict(pct=0.5, tile=16, cache_dir=str(tmp_path / "centroids"))
    full = build_dataset(cfg(root, **settings), "train", True)
    full.drop_samples({1: "unreadable on rank 1"})
    clean_root = str(tmp_path / "without")
    shutil.copytree(root, clean_root)
    name = full.listed()[1].name
    for folder, _, files in os.walk(clean_root):
        for f in files:
            if f.startswith(name):
                os.remove(os.path.join(folder, f))
    without = build_dataset(cfg(clean_root, **settings), "train", True)
    assert [s.name for s in full.samples] == [s.name for s in without.samples] and full.num_main == 2
    assert full.dropped == {1: "unreadable on rank 1"}
    for c in range(full.num_classes):
        assert np.array_equal(full.uniform.centroids[c], without.uniform.centroids[c]), c
    assert full.epoch_length(0) == without.epoch_length(0)


def test_truncated_jpeg_that_opencv_accepts_is_found(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), np.uint8), (0, 0), 2)
        cv2.imwrite(str(tmp_path / f"p{i}.jpg"), smooth)
    path = tmp_path / "p1.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    assert cv2.imread(str(path)) is not None  # OpenCV fills the missing rows with grey and says nothing
    ds = build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0), "folder", False)
    found = find_bad_files(ds, 0)
    assert len(found) == 1 and found[0][0] == str(path)
    assert found[0][1] == f"cannot decode image (truncated file: its JPEG data ends early; re-copy it): {path}"
    with pytest.raises(DataError, match=r"^data.verify: 1 of 3 samples of folder/"):
        build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0, verify=True), "folder", False)


def test_long_lists_are_cut_in_the_message_not_in_the_result(tmp_path):
    for i in range(SHOWN + 3):
        (tmp_path / f"x{i:02d}.png").write_bytes(b"not an image")
    ds = build_dataset(DataConfig.make(dataset="folder", root=str(tmp_path), num_workers=0), "folder", False)
    assert len(find_bad_files(ds, 0)) == SHOWN + 3
    with pytest.raises(DataError) as e:
        verify_dataset(ds, 0)
    lines = str(e.value).splitlines()
    assert len(lines) == 1 + SHOWN + 1 and lines[-1] == "... and 3 more"


@pytest.mark.slow
def test_prepare_cityscapes_verify(clean, broken, capsys):
    check = runpy.run_path(os.path.join(REPO, "scripts", "prepare_cityscapes.py"))["main"]
    assert check([clean, "--verify", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "ok       train: 3 samples decode, masks match their images" in out
    assert "ok       val: 4 samples decode, masks match their images" in out
    root, bad = broken
    before = files_of(root)
    assert check([root, "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"BAD      val: cannot decode image (truncated file: its PNG data ends early; re-copy it): {bad['image']}" in out
    assert f"BAD      val: mask size 48x16 differs from image size 48x32 (WxH): {bad['small']} (image " in out
    assert f"BAD      val: {bad['ids']}: label values not in the Cityscapes label table: 99" in out
    assert "4 problem(s) found" in out  # the three bad files, and the ids again from the sampled label check
    assert files_of(root) == before


@pytest.mark.slow
def test_prepare_mapillary_verify(tmp_path, capsys):
    labels = [{"readable": "a", "color": [1, 2, 3], "evaluate": True},
              {"readable": "void", "color": [0, 0, 0], "evaluate": False}]
    (tmp_path / "config.json").write_text(json.dumps({"labels": labels}))
    for split in ("training", "validation"):
        os.makedirs(tmp_path / split / "images")
        os.makedirs(tmp_path / split / "labels")
        for i in range(2):
            cv2.imwrite(str(tmp_path / split / "images" / f"i{i}.jpg"), np.full((8, 12, 3), 50, np.uint8))
            cv2.imwrite(str(tmp_path / split / "labels" / f"i{i}.png"), np.zeros((8, 12), np.uint8))
    check = runpy.run_path(os.path.join(REPO, "scripts", "prepare_mapillary.py"))["main"]
    assert check([str(tmp_path), "--verify"]) == 0
    assert "ok       validation: 2 samples decode, masks match their images" in capsys.readouterr().out
    wrong = tmp_path / "validation" / "labels" / "i1.png"
    cv2.imwrite(str(wrong), np.zeros((4, 12), np.uint8))
    assert check([str(tmp_path), "--verify"]) == 1
    assert f"BAD      validation: mask size 12x4 differs from image size 12x8 (WxH): {wrong}" in capsys.readouterr().out
