"""Class-uniform sampling: centroids on known blobs, the cache (reuse, staleness), epoch composition, crops."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from datasets import SampleRef, build_dataset, build_loader
from datasets.sampler import TrainSampler
from datasets.synthetic import generate_synthetic_cityscapes
from datasets.uniform import ClassUniform, compute_centroids, load_or_compute, tile_centroids
from utils.config import DataConfig


def test_centroids_of_known_blobs():
    mask = np.full((70, 70), 255, np.uint8)
    mask[10:15, 20:25] = 2  # one blob in tile (0, 0): centre (22, 12)
    mask[40:44, 36:40] = 3  # in tile (1, 1): centre (37, 41) after int() of 37.5, 41.5
    mask[0:5, 30:34] = 1  # straddles tiles (0,0) and (0,1): one centroid in each (x 30.5 and 32.5)
    mask[66:70, 0:4] = 4  # in the partial last row of tiles: not counted
    found = sorted(tile_centroids(mask, 5, 32))
    assert found == [(1, 30, 2), (1, 32, 2), (2, 22, 12), (3, 37, 41)]
    # Ignore (255) and ids >= K give no centroid.
    assert tile_centroids(np.full((32, 32), 255, np.uint8), 5, 32) == []


def test_centroid_moves_onto_its_class():
    mask = np.zeros((32, 32), np.uint8)
    cv2.circle(mask, (16, 16), 10, 1, 2)  # a ring: its mean position is the hole
    (c, x, y), = [t for t in tile_centroids(mask, 2, 32) if t[0] == 1]
    assert mask[y, x] == 1 and abs(x - 16) + abs(y - 16) <= 12


class Masks:
    """A stand-in dataset: masks from files, as SegmentationDataset.centroid_mask reads them."""

    def __init__(self, paths):
        self.samples = [type("S", (), {"mask": p})() for p in paths]

    def centroid_mask(self, index):
        return cv2.imread(self.samples[index].mask, cv2.IMREAD_UNCHANGED)


@pytest.fixture()
def mask_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        m = rng.integers(0, 4, (2, 4), dtype=np.uint8).repeat(16, 0).repeat(16, 1)  # 32x64, 16-px blocks
        p = str(tmp_path / f"m{i}.png")
        cv2.imwrite(p, m)
        paths.append(p)
    return paths


def test_parallel_equals_serial(mask_files):
    ds = Masks(mask_files)
    serial = compute_centroids(ds, range(len(mask_files)), 4, 16, workers=1, progress=False)
    parallel = compute_centroids(ds, range(len(mask_files)), 4, 16, workers=2, progress=False)
    assert serial == parallel and sum(len(v) for v in serial.values()) == 24 * 8


def test_cache_is_reused_and_rebuilt_when_stale(mask_files, tmp_path):
    ds = Masks(mask_files)
    cache = str(tmp_path / "cache")
    a, path = load_or_compute(ds, range(24), 4, 16, "toy/train", cache)
    stamp = os.stat(path).st_mtime_ns
    b, same = load_or_compute(ds, range(24), 4, 16, "toy/train", cache)
    assert same == path and os.stat(path).st_mtime_ns == stamp and a == b
    _, other_tile = load_or_compute(ds, range(24), 4, 32, "toy/train", cache)
    assert other_tile != path and "tile32" in other_tile
    _, fewer = load_or_compute(ds, range(23), 4, 16, "toy/train", cache)
    assert fewer != path
    cv2.imwrite(mask_files[0], np.zeros((32, 64), np.uint8))  # a changed mask: new key, recomputed
    c, changed = load_or_compute(ds, range(24), 4, 16, "toy/train", cache)
    assert changed != path and c != a
    assert [r for r in c[0] if r[0] == 0] == [[0, 7, 7], [0, 23, 7], [0, 39, 7], [0, 55, 7], [0, 7, 23], [0, 23, 23],
                                              [0, 39, 23], [0, 55, 23]]


def test_epoch_composition():
    centroids = {0: [[0, 1, 1], [1, 2, 2]], 1: [[2, 3, 3], [5, 4, 4]], 2: []}
    u = ClassUniform(centroids, 3, pct=0.5, num_main=4)  # image 5 is an extra (coarse) image
    items = u.build_epoch(np.random.default_rng(0), include_extra=True)
    assert len(items) == 4
    centred = [it for it in items if it[1] is not None]
    assert len(centred) == 2  # int(4 * 0.5 / 2 classes with centroids) = 1 per class
    again = u.build_epoch(np.random.default_rng(0), include_extra=True)
    assert items == again
    for seed in range(20):
        without = u.build_epoch(np.random.default_rng(seed), include_extra=False)
        assert all(i < 4 for i, _ in without)
    with pytest.raises(ValueError, match="fraction"):
        ClassUniform(centroids, 3, pct=0.0, num_main=4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic_cityscapes(str(tmp_path_factory.mktemp("u") / "s"), 12, 2, 64, 128, 1)


def test_class_centred_crops_contain_their_class(synth, tmp_path):
    cfg = DataConfig(root=synth, dataset="cityscapes", class_uniform_pct=1.0, class_uniform_tile=32,
                     centroid_dir=str(tmp_path), crop_size=(24, 24), scale_min=1.0, scale_max=1.0, num_workers=0,
                     batch_size=2)
    ds = build_dataset(cfg, "train", train=True)
    assert ds.uniform is not None
    items = ds.epoch_items(0, np.random.default_rng(0))
    centred = [(i, c) for i, c in items if c is not None]
    assert len(items) == 12 and len(centred) == 9  # one per class present (9 of them) = int(12 * 1.0 / 9)
    for k, (index, (x, y)) in enumerate(centred):
        cls = int(ds.load(index)[1][y, x])
        out = ds[SampleRef(index, k, (x, y))]
        assert (out["mask"] == cls).any(), f"class {cls} of centroid {(x, y)} missing from the crop"
    assert len(list(build_loader(ds, cfg, train=True))) == 6


def test_every_rank_draws_the_same_epoch(synth, tmp_path):
    cfg = DataConfig(root=synth, dataset="cityscapes", class_uniform_pct=0.5, class_uniform_tile=32,
                     centroid_dir=str(tmp_path), num_workers=0)
    ds = build_dataset(cfg, "train", train=True)
    ranks = [list(TrainSampler(ds, seed=4, rank=r, world_size=3)) for r in range(3)]
    items, seeds = TrainSampler(ds, seed=4).epoch_list(0)
    merged = [ranks[p % 3][p // 3] for p in range(12)]
    assert [(m.index, m.centroid) for m in merged] == items
    assert [m.seed for m in merged] == seeds.tolist()


def test_boost_class_draws_from_its_fine_and_coarse_centroids_alike():
    """The original's epoch (Cityscapes with coarse data): the random part from the main images only; each class's
    class-centred part uniformly from its centroid list, which for a boost class holds the fine and the coarse
    centroids together. Here n = 10 main images, pct 0.6, 2 classes: int(10 * 0.6 / 2) = 3 per class, 4 random."""
    fine_a, coarse_a = [[1, 5, 5]], [[10, 1, 1], [11, 2, 2]]  # class 0 (boost): 1 fine + 2 coarse centroids
    fine_b = [[2, 3, 3], [3, 4, 4], [4, 6, 6]]  # class 1: fine only
    cu = ClassUniform({0: fine_a + coarse_a, 1: fine_b}, 2, pct=0.6, num_main=10)
    for seed in range(5):
        items = cu.build_epoch(np.random.default_rng(seed), include_extra=True)
        random_part = [i for i, c in items if c is None]
        centred = sorted([i, *c] for i, c in items if c is not None)
        assert len(items) == 10 and len(random_part) == 4 == len(set(random_part))
        assert all(0 <= i < 10 for i in random_part)
        assert centred == sorted(fine_a + coarse_a + fine_b)  # 3 draws = one pass over each 3-centroid list
        fine_only = cu.build_epoch(np.random.default_rng(seed), include_extra=False)
        assert sorted([i, *c] for i, c in fine_only if c is not None) == sorted(fine_a * 3 + fine_b)
