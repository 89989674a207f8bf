"""The synthetic generator's unlabelled train_extra split and its coarse polygon labels (gtCoarse)."""
from __future__ import annotations

import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from datasets import DataError
from datasets.cityscapes import CityscapesDataset, CoarseOptions
from datasets.synthetic import MANIFEST, MARKER, coarse_polygons, generate_synthetic_cityscapes, synthetic_scene

H, W = 32, 64


def files(root: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `root`."""
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.slow
def test_extra_split_layout_and_manifest(tmp_path):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 2, 1, H, W, 0, num_extra=4)
    found = files(root)
    extra = sorted(k for k in found if "train_extra" in k)
    assert extra == [
        "gtCoarse/train_extra/augsburg/augsburg_000000_000019_gtCoarse_labelIds.png",
        "gtCoarse/train_extra/augsburg/augsburg_000003_000019_gtCoarse_labelIds.png",
        "gtCoarse/train_extra/bamberg/bamberg_000001_000019_gtCoarse_labelIds.png",
        "gtCoarse/train_extra/dortmund/dortmund_000002_000019_gtCoarse_labelIds.png",
        "leftImg8bit/train_extra/augsburg/augsburg_000000_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/augsburg/augsburg_000003_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/bamberg/bamberg_000001_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/dortmund/dortmund_000002_000019_leftImg8bit.png",
    ]
    assert not any(k.startswith("gtFine/train_extra") for k in found)  # unlabelled: no fine labels
    manifest = json.load(open(os.path.join(root, MANIFEST)))
    assert set(manifest) == set(found) - {MARKER, MANIFEST} and all(manifest[k] == found[k] for k in manifest)
    assert json.load(open(os.path.join(root, MARKER)))["num_extra"] == 4
    # The extra images are their own scenes (a stream of their own), and their coarse label is that of the scene.
    image, label = synthetic_scene(0, "train_extra", 1, H, W)
    stored = cv2.imread(os.path.join(root, "leftImg8bit/train_extra/bamberg/bamberg_000001_000019_leftImg8bit.png"))
    np.testing.assert_array_equal(stored[..., ::-1], image)
    assert not np.array_equal(image, synthetic_scene(0, "train", 1, H, W)[0])
    assert not np.array_equal(image, synthetic_scene(0, "val", 1, H, W)[0])
    coarse = cv2.imread(os.path.join(root, "gtCoarse/train_extra/bamberg/bamberg_000001_000019_gtCoarse_labelIds.png"),
                        cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(coarse, coarse_polygons(label))


def test_train_and_val_files_do_not_depend_on_the_extra_split(tmp_path):
    plain = files(generate_synthetic_cityscapes(str(tmp_path / "a"), 3, 2, H, W, 5))
    with_extra = files(generate_synthetic_cityscapes(str(tmp_path / "b"), 3, 2, H, W, 5, num_extra=3))
    shared = {k: v for k, v in plain.items() if k not in (MARKER, MANIFEST)}
    assert {k: with_extra[k] for k in shared} == shared
    # A marker without num_extra (data generated before the split existed) is the same marker as before.
    assert json.load(open(tmp_path / "a" / MARKER)) == {"version": 1, "num_train": 3, "num_val": 2, "height": H,
                                                         "width": W, "seed": 5}


def test_requests_without_extra_reuse_data_with_it_and_other_counts_regenerate(tmp_path):
    root = str(tmp_path / "s")
    generate_synthetic_cityscapes(root, 2, 1, H, W, 0, num_extra=3)
    marker = os.path.join(root, MARKER)
    stamp = os.stat(marker).st_mtime_ns
    generate_synthetic_cityscapes(root, 2, 1, H, W, 0)  # the demo's request: served by the same files
    assert os.stat(marker).st_mtime_ns == stamp
    generate_synthetic_cityscapes(root, 2, 1, H, W, 0, num_extra=1)
    assert json.load(open(marker))["num_extra"] == 1
    assert sum(len(fs) for _, _, fs in os.walk(os.path.join(root, "leftImg8bit", "train_extra"))) == 1
    generate_synthetic_cityscapes(root, 3, 1, H, W, 0)  # other train/val parameters: the extra split goes too
    assert "num_extra" not in json.load(open(marker)) and not os.path.exists(os.path.join(root, "gtCoarse"))
    with pytest.raises(DataError, match=r"data.synthetic.num_extra must be >= 0.*got -1"):
        generate_synthetic_cityscapes(root, 3, 1, H, W, 0, num_extra=-1)


def test_coarse_polygons_on_a_hand_made_label():
    road, car, person, ego = 7, 26, 24, 1
    label = np.full((64, 64), road, np.uint8)
    label[10:40, 10:50] = car  # a 40x30 box
    label[50:52, 50:52] = person  # 2x2: gone under the 1-pixel erosion (64 / 64)
    label[60:, :] = ego
    out = coarse_polygons(label)
    assert out.dtype == np.uint8 and out.shape == label.shape
    # The car: its outline eroded by one pixel (a rectangle simplifies to itself).
    expected_car = np.zeros_like(label, bool)
    expected_car[11:39, 11:49] = True
    np.testing.assert_array_equal(out == car, expected_car)
    assert not (out == person).any() and (out[60:] == 0).all()  # small objects and the ego vehicle unlabelled
    assert (out[label != road] != road).all()  # road polygons stay inside the road (drawn under the car)
    # the road's outer border is the image's: it is not eroded there, only along the car, the person and the ego
    assert out[0, 0] == road and out[9, 30] == 0 and out[59, 30] == 0 and out[58, 30] == road and out[45, 0] == road
    assert (out[49:53, 49:53] == 0).all() and out[48, 48] == road  # the hole of the person, grown by the erosion


def test_cityscapes_reads_the_generated_extra_split_as_coarse_data(tmp_path):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 3, 1, H, W, 0, num_extra=3)
    ds = CityscapesDataset(root, "train", lambda img, mask, rng, c: (img, mask),
                           coarse=CoarseOptions(boost_classes=(0, 13)))
    assert ds.num_main == 3 and len(ds) == 6
    assert ds.samples[3].mask.endswith("gtCoarse/train_extra/augsburg/augsburg_000000_000019_gtCoarse_labelIds.png")
    mask = ds.load_mask(3)
    _, label = synthetic_scene(0, "train_extra", 0, H, W)
    coarse = coarse_polygons(label)
    assert (mask[coarse == 0] == 255).all() and (mask[coarse == 7] == 0).all()  # unlabelled -> ignore, road -> 0
