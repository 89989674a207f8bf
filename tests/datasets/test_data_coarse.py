"""Cityscapes coarse data: boost classes, autolabels (probability threshold, dropout union, mask-out), max_cu_epoch."""
from __future__ import annotations

import os
import runpy
import shutil

import cv2
import numpy as np
import pytest

from datasets import DataError, DataNotFoundError, build_dataset
from datasets.synthetic import generate_synthetic_cityscapes, synthetic_scene
from utils.config import ConfigError, DataConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, W = 32, 64
ROAD, CAR, TRUCK, BUS = 7, 26, 27, 28  # label ids; train ids 0, 13, 14, 15


def autolabel_mask() -> np.ndarray:
    m = np.full((H, W), ROAD, np.uint8)
    m[:, W // 2 :] = CAR
    m[24:, 56:] = BUS
    return m


def human_coarse() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[0:8, 40:50] = TRUCK
    m[0:8, 0:10] = BUS  # inside the low-probability corner
    return m


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("coarse")
    fine = generate_synthetic_cityscapes(str(base / "fine"), 6, 2, H, W, 0)
    root = str(base / "cs")
    shutil.copytree(fine, root)
    for i in range(4):
        city = "augsburg" if i < 2 else "bamberg"
        stem = f"{city}_{i:06d}_000001"
        for d in ("leftImg8bit/train_extra", "gtCoarse/train_extra", "autolabelled/train_extra"):
            os.makedirs(os.path.join(root, d, city), exist_ok=True)
        image, _ = synthetic_scene(9, "train", i, H, W)
        cv2.imwrite(os.path.join(root, "leftImg8bit/train_extra", city, stem + "_leftImg8bit.png"), image)
        cv2.imwrite(os.path.join(root, "gtCoarse/train_extra", city, stem + "_gtCoarse_labelIds.png"), human_coarse())
        auto = os.path.join(root, "autolabelled/train_extra", city, stem)
        cv2.imwrite(auto + "_leftImg8bit.png", autolabel_mask())
        prob = np.full((H, W), 255, np.uint8)
        prob[:16, :16] = 50  # 0.2: below a 0.5 threshold
        cv2.imwrite(auto + "_leftImg8bit_prob.png", prob)
    return root


def cfg(root: str, **kw) -> DataConfig:
    base = dict(root=root, dataset="cityscapes", num_workers=0, crop_size=(16, 16), boost_classes=(13, 14, 15),
                last_epoch=3)
    base.update(kw)
    return DataConfig.make(**base)


def test_coarse_images_follow_the_fine_ones_until_max_cu_epoch(root):
    ds = build_dataset(cfg(root), "train", train=True)
    assert ds.num_main == 6 and len(ds) == 10
    assert ds.samples[6].mask.endswith("gtCoarse/train_extra/augsburg/augsburg_000000_000001_gtCoarse_labelIds.png")
    assert ds.epoch_length(0) == ds.epoch_length(3) == 10  # constant: a loop may count its steps once
    rng = np.random.default_rng(0)
    assert sorted(i for i, _ in ds.epoch_items(2, rng)) == list(range(10))
    late = sorted(i for i, _ in ds.epoch_items(3, rng))
    assert set(late) == set(range(6)) and len(late) == 10  # really switched off: fine images fill the epoch
    m = ds.load_mask(6)
    assert m[0, 45] == 14 and m[0, 5] == 15 and m[20, 20] == 255  # human coarse ids mapped; id 0 ignored
    assert len(build_dataset(cfg(root), "val", train=False)) == 2  # no coarse data outside training
    assert len(build_dataset(cfg(root), "train", train=False)) == 6


def test_autolabel_threshold_dropout_and_mask_out(root):
    ds = build_dataset(cfg(root, autolabel_threshold=0.5, dropout_classes=(14, 15)), "train", True)
    assert ds.samples[6].mask.endswith("autolabelled/train_extra/augsburg/augsburg_000000_000001_leftImg8bit.png")
    m = ds.load_mask(6)
    assert (m[16:, :32] == 0).all() and (m[:24, 32:] == 13).all()  # road, car
    assert (m[24:, 56:] == 15).all()  # bus (autolabel)
    assert (m[8:16, :16] == 255).all()  # probability 0.2 < 0.5: ignore
    assert (m[0:8, 0:10] == 255).all()  # bus is in the autolabel: human bus pixels unioned in, then thresholded
    assert (m[0:8, 40:50] == 13).all()  # truck is not in the autolabel: the human truck pixels are not added
    ours = build_dataset(cfg(root, autolabel_threshold=0.5, dropout_classes=(14, 15),
                             order="threshold_first"), "train", True).load_mask(6)
    assert (ours[0:8, 0:10] == 15).all()  # human bus pixels on top of the threshold: kept at low probability
    assert (ours[0:8, 40:50] == 13).all()
    plain = build_dataset(cfg(root, autolabel_threshold=0.5), "train", True).load_mask(6)
    assert (plain[0:8, 0:10] == 255).all()  # without dropout classes the low-probability corner stays ignored
    out = build_dataset(cfg(root, autolabel_threshold=0.5, mask_out=True), "train", True).load_mask(6)
    rows = round(840 / 1024 * H)
    assert (out[rows:] == 255).all() and (out[16:rows, 16:32] == 0).all()


def test_dropping_samples_keeps_each_autolabel_with_its_image(root):
    """data.skip_bad drops unreadable samples (datasets.verify, datasets.agree): the autolabel table, keyed by
    sample index, moves with the samples after them."""
    ds = build_dataset(cfg(root, autolabel_threshold=0.5, dropout_classes=(14, 15)), "train", True)
    fine_mask = ds.load_mask(3)
    ds.drop_samples({2: "unreadable", 7: "unreadable"})  # a fine image and an autolabelled coarse one
    assert ds.num_main == 5 and len(ds) == 8 and sorted(ds.autolabel) == [5, 6, 7]
    for i in sorted(ds.autolabel):
        prob, human = ds.autolabel[i]
        assert os.path.basename(prob).startswith(ds.samples[i].name + "_")
        assert os.path.basename(human).startswith(ds.samples[i].name + "_")
    assert np.array_equal(ds.load_mask(2), fine_mask)  # the former sample 3


# A hand-built 8x8 autolabel, one case per column (label ids; the human gtCoarse and the probability alike):
#   col:        0      1      2      3      4      5      6      7
#   autolabel   road   road   bus    car    truck  road   car    road
#   human       truck  truck  truck  truck  -      train  -      -
#   probability 255    100    255    255    255    255    100    255
# Dropout classes truck (14) and train (16): truck is in the autolabel, train is not. Mask-out keeps rows 0..6
# (row 7 is outside round(840/1024 * 8) = 7).
AUTO_COLS = [ROAD, ROAD, BUS, CAR, TRUCK, ROAD, CAR, ROAD]
HUMAN_COLS = [TRUCK, TRUCK, TRUCK, TRUCK, 0, 31, 0, 0]
PROB_COLS = [255, 100, 255, 255, 255, 255, 100, 255]
# Expected train ids, rows 0..6 and row 7, worked out by hand from the two rules:
EXPECTED = {
    # union while mapping ids in ascending order (bus 28 > truck 27: the autolabel's bus stays; car 26 < 27:
    # the human truck wins), then the threshold (column 1's human truck at probability 100 becomes ignore);
    # row 7: the autolabel is masked out (id 0) but the human truck is not, and the threshold still applies.
    "original": ([14, 255, 15, 14, 14, 0, 255, 0], [14, 255, 14, 14, 255, 255, 255, 255]),
    # threshold first, then the human truck on top everywhere (at any probability, inside or outside the box)
    "threshold_first": ([14, 14, 14, 14, 14, 0, 255, 0], [14, 14, 14, 14, 255, 255, 255, 255]),
}
# Centroid masks: original: the raw autolabel with the union (no mask-out, no threshold); ours: the training mask.
CENTROID_ROWS = {"original": [14, 14, 15, 14, 14, 0, 13, 0]}


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("cases")
    root = generate_synthetic_cityscapes(str(base / "cs"), 6, 2, H, W, 0)
    stem = "augsburg_000000_000001"
    for d in ("leftImg8bit/train_extra", "gtCoarse/train_extra", "autolabelled/train_extra"):
        os.makedirs(os.path.join(root, d, "augsburg"), exist_ok=True)
    cols = lambda values: np.tile(np.array(values, np.uint8), (8, 1))  # noqa: E731
    cv2.imwrite(os.path.join(root, "leftImg8bit/train_extra/augsburg", stem + "_leftImg8bit.png"),
                np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(os.path.join(root, "gtCoarse/train_extra/augsburg", stem + "_gtCoarse_labelIds.png"), cols(HUMAN_COLS))
    auto = os.path.join(root, "autolabelled/train_extra/augsburg", stem)
    cv2.imwrite(auto + "_leftImg8bit.png", cols(AUTO_COLS))
    cv2.imwrite(auto + "_leftImg8bit_prob.png", cols(PROB_COLS))
    return root


@pytest.mark.parametrize("order", sorted(EXPECTED))
def test_autolabel_order_on_hand_built_cases(cases_root, tmp_path, order):
    c = cfg(cases_root, boost_classes=(13, 14, 15), autolabel_threshold=0.5,
            dropout_classes=(14, 16), mask_out=True, order=order,
            pct=0.5, tile=8, cache_dir=str(tmp_path))
    ds = build_dataset(c, "train", True)
    inside, row7 = EXPECTED[order]
    want = np.array([inside] * 7 + [row7], np.uint8)
    np.testing.assert_array_equal(ds.load_mask(6), want)
    want_centroids = np.array([CENTROID_ROWS[order]] * 8, np.uint8) if order in CENTROID_ROWS else want
    np.testing.assert_array_equal(ds.centroid_mask(6), want_centroids)
    # the coarse centroids (boost classes car, truck, bus) come from that mask: the original's include the bus
    # and the low-probability car that training never sees labelled; ours only the truck
    coarse = {k for k in range(19) if (ds.uniform.centroids[k][:, 0] == 6).any()}
    assert coarse == ({13, 14, 15} if order == "original" else {14})


def test_autolabel_order_is_checked():
    with pytest.raises(ConfigError, match=r"data.coarse.order: expected one of \['original', 'threshold_first'\]"):
        load_config(None, ["data.coarse.order=human_last"])


def test_autolabels_written_flat_by_eval(root, tmp_path):
    """eval.py --autolabel over a folder writes <name>_leftImg8bit.png + _prob.png side by side, no city folders."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for d, _, files in os.walk(os.path.join(root, "autolabelled")):
        for f in files:
            shutil.copy(os.path.join(d, f), flat / f)
    ds = build_dataset(cfg(root, autolabel_threshold=0.5, autolabel_dir=str(flat)), "train", True)
    assert ds.samples[6].mask == str(flat / "augsburg_000000_000001_leftImg8bit.png")
    assert (ds.load_mask(6)[8:16, :16] == 255).all()


def test_coarse_centroids_only_for_boost_classes_and_only_before_max_cu_epoch(root, tmp_path):
    c = cfg(root, boost_classes=(14,), pct=0.5, tile=16, cache_dir=str(tmp_path))
    ds = build_dataset(c, "train", train=True)
    coarse_rows = {k: [r for r in v if r[0] >= 6] for k, v in ((k, ds.uniform.centroids[k].tolist())
                                                                for k in range(19))}
    assert {k for k, v in coarse_rows.items() if v} == {14}  # truck (boost class) only, not road or bus
    assert ds.epoch_length(0) == 6  # with class-uniform sampling, coarse data enters through centroids only
    assert ds.extra_active(2) and not ds.extra_active(3)
    assert (ds.uniform.pool(14, include_extra=True)[:, 0] >= 6).any()
    assert not (ds.uniform.pool(14, include_extra=False)[:, 0] >= 6).any()


def test_missing_coarse_folders(root, tmp_path):
    bare = generate_synthetic_cityscapes(str(tmp_path / "bare"), 2, 1, H, W, 0)
    with pytest.raises(DataNotFoundError, match="train_extra"):
        build_dataset(cfg(bare), "train", True)
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    os.remove(os.path.join(broken, "autolabelled/train_extra/bamberg/bamberg_000003_000001_leftImg8bit_prob.png"))
    with pytest.raises(DataError, match="without an autolabel.*: bamberg_000003_000001 "):
        build_dataset(cfg(broken, autolabel_threshold=0.5), "train", True)
    with pytest.raises(ValueError, match="train ids"):
        build_dataset(cfg(root, boost_classes=(19,)), "train", True)


def test_prepare_cityscapes_script(root, tmp_path, capsys):
    check = runpy.run_path(os.path.join(REPO, "scripts", "prepare_cityscapes.py"))["main"]
    assert check([root, "--coarse", "--autolabel", os.path.join(root, "autolabelled")]) == 0
    out = capsys.readouterr().out
    assert "train_extra: 2 cities, 4 images" in out and "autolabel: 4 masks with their probability maps" in out
    broken = str(tmp_path / "b")
    shutil.copytree(root, broken)
    os.remove(os.path.join(broken, "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"))
    assert check([broken]) == 1
    assert "lindau_000001_000019_gtFine_labelIds.png" in capsys.readouterr().out
    assert check([str(tmp_path / "nowhere")]) == 1
    assert "Cityscapes folder not found" in capsys.readouterr().out


SOTA = os.path.join(REPO, "configs", "cityscapes", "hmsa_ocrnet_hrnet_w48_1024x2048_sota.yaml")


def test_sota_recipe_uses_coarse_crops_in_every_epoch(root, tmp_path):
    """The published SOTA run drew class-uniform crops of the boost classes from fine + coarse centroids in all
    175 epochs (its max_cu_epoch switch-off was a no-op); data.coarse.last_epoch=150 switches them off as intended."""
    small = [f"data.root={root}", "data.class_uniform.tile=16", f"data.class_uniform.cache_dir={tmp_path}", "data.num_workers=0"]
    cfg = load_config(SOTA, small)
    ds = build_dataset(cfg.data, "train", train=True)
    boost = set(cfg.data.coarse.boost_classes)
    with_coarse = {c for c in range(19) if (ds.uniform.centroids[c][:, 0] >= ds.num_main).any()}
    assert with_coarse and with_coarse <= boost  # car and bus of the autolabels; road (not boosted) has none
    assert all(ds.extra_active(epoch) for epoch in range(cfg.train.max_epoch))
    last = cfg.train.max_epoch - 1
    for c in with_coarse:  # the last epoch still draws them from the fine and coarse centroids together
        assert len(ds.uniform.pool(c, ds.extra_active(last))) == len(ds.uniform.centroids[c])
    intended = build_dataset(load_config(SOTA, small + ["data.coarse.last_epoch=150"]).data, "train", train=True)
    assert intended.extra_active(149) and not intended.extra_active(150)
    late = [intended.uniform.pool(c, intended.extra_active(150)) for c in with_coarse]
    assert not any((rows[:, 0] >= intended.num_main).any() for rows in late)
