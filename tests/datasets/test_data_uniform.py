"""Class-uniform sampling: centroids (against scipy's center_of_mass, snapping), the cache (reuse, staleness, one
file per centroid mode), epoch composition under both shares, epoch length through the sampler, crops."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from scipy import ndimage

from datasets import SampleRef, build_dataset, build_loader
from datasets.base import ClassInfo, Sample, SegmentationDataset
from datasets.sampler import TrainSampler
from datasets.synthetic import generate_synthetic_cityscapes
from datasets.uniform import ClassUniform, compute_centroids, draw_cycled, load_or_compute, tile_centroids
from utils.config import ConfigError, DataConfig, load_config


def scipy_centroids(mask: np.ndarray, num_classes: int, tile: int) -> list[tuple[int, int, int]]:
    """The original's centroids: int() of center_of_mass(patch == c) per full tile and class present."""
    out = []
    for ty in range(mask.shape[0] // tile):
        for tx in range(mask.shape[1] // tile):
            patch = mask[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
            for c in range(num_classes):
                if (patch == c).any():
                    row, col = ndimage.center_of_mass((patch == c).astype(int))
                    out.append((c, int(col) + tx * tile, int(row) + ty * tile))
    return out


def test_centroids_of_known_blobs():
    mask = np.full((70, 70), 255, np.uint8)
    mask[10:15, 20:25] = 2  # one blob in tile (0, 0): centre (22, 12)
    mask[40:44, 36:40] = 3  # in tile (1, 1): centre (37, 41) after int() of 37.5, 41.5
    mask[0:5, 30:34] = 1  # straddles tiles (0,0) and (0,1): one centroid in each (x 30.5 and 32.5)
    mask[66:70, 0:4] = 4  # in the partial last row of tiles: not counted
    for snap in (False, True):  # convex blobs: the mean is a pixel of its class, both modes agree
        found = sorted(tile_centroids(mask, 5, 32, snap))
        assert found == [(1, 30, 2), (1, 32, 2), (2, 22, 12), (3, 37, 41)]
    # Ignore (255) and ids >= K give no centroid.
    assert tile_centroids(np.full((32, 32), 255, np.uint8), 5, 32) == []


@pytest.mark.parametrize("seed", range(6))
def test_centroids_are_scipy_center_of_mass_truncated(seed):
    rng = np.random.default_rng(seed)
    k, tile = 6, 64
    # Scattered pixels, blocky regions and a sparse class: means anywhere in the tile; partial tiles at the edges.
    mask = rng.integers(0, k + 1, (150, 200)).astype(np.uint8)
    mask[mask == k] = 255
    blocks = rng.integers(0, k, (10, 13)).astype(np.uint8).repeat(16, 0).repeat(16, 1)[:150, :200]
    mask = np.where(rng.random((150, 200)) < 0.5, mask, blocks)
    sparse = (mask == 5) & (rng.random((150, 200)) < 0.97)
    mask[sparse] = 255  # class 5: a few scattered pixels per tile
    assert tile_centroids(mask, k, tile) == scipy_centroids(mask, k, tile)


@pytest.mark.slow
def test_centroid_truncation_at_integer_boundaries():
    """Means exactly on an integer, just below one (x.999...) and just above one, where a summation that rounds
    differently would change the truncated value: ours equals scipy's in every case."""
    tile = 1024
    masks = []
    m = np.zeros((tile, tile), np.uint8)
    m[:, 0] = 1
    m[:, 1023] = 1  # two columns: mean x exactly 511.5, mean y exactly 511.5
    masks.append(m)
    m = np.zeros((tile, tile), np.uint8)
    m[100, 200], m[300, 600] = 1, 1  # mean exactly (400, 200)
    masks.append(m)
    m = np.zeros((tile, tile), np.uint8)
    m[:, 7] = 1
    m[:, 9] = 1
    m[0, 9] = 0  # sum_x = 7 * 1024 + 9 * 1023 = 16375, count 2047: mean 7.9995 (truncates to 7)
    masks.append(m)
    m = np.zeros((tile, tile), np.uint8)
    m[:, 7] = 1
    m[:, 9] = 1
    m[0, 7] = 0  # 16377 / 2047 = 8.0005 (truncates to 8)
    masks.append(m)
    m = np.full((tile, tile), 1, np.uint8)
    m[1023, 1023] = 0  # nearly the whole tile: sums near 2**29, mean 511.4997... just below 511.5
    masks.append(m)
    rng = np.random.default_rng(7)
    for _ in range(4):  # large random masks on the original's 1024 tile: sums up to ~1e9
        masks.append((rng.random((tile, 2 * tile)) < rng.uniform(0.01, 0.99)).astype(np.uint8))
    for m in masks:
        assert tile_centroids(m, 2, tile) == scipy_centroids(m, 2, tile)
    assert tile_centroids(masks[2], 2, tile)[1][1] == 7 and tile_centroids(masks[3], 2, tile)[1][1] == 8


def test_centroid_of_a_ring_is_its_mean_unless_snapped():
    mask = np.zeros((32, 32), np.uint8)
    cv2.circle(mask, (16, 16), 10, 1, 2)  # a ring: its mean position is the hole
    (_, x, y), = [t for t in tile_centroids(mask, 2, 32) if t[0] == 1]
    assert (1, x, y) == scipy_centroids(mask, 2, 32)[1] and mask[y, x] == 0  # the original's: not on the ring
    (_, sx, sy), = [t for t in tile_centroids(mask, 2, 32, snap=True) if t[0] == 1]
    assert mask[sy, sx] == 1 and abs(sx - x) + abs(sy - y) <= 12  # snapped: the nearest ring pixel
    blobs = np.zeros((32, 32), np.uint8)
    blobs[2:6, 2:6] = blobs[26:30, 26:30] = 3  # two blobs: the mean (15, 15) lies between them
    assert [t for t in tile_centroids(blobs, 4, 32) if t[0] == 3] == [(3, 15, 15)]
    (_, bx, by), = [t for t in tile_centroids(blobs, 4, 32, snap=True) if t[0] == 3]
    assert blobs[by, bx] == 3


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


def test_cache_files_differ_between_centroid_modes(tmp_path):
    ring = np.zeros((32, 32), np.uint8)
    cv2.circle(ring, (16, 16), 10, 1, 2)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"r{i}.png"))
        cv2.imwrite(paths[-1], ring)
    ds = Masks(paths)
    cache = str(tmp_path / "cache")
    mean, mean_path = load_or_compute(ds, range(3), 2, 32, "toy/train", cache)
    snap, snap_path = load_or_compute(ds, range(3), 2, 32, "toy/train", cache, snap=True)
    assert mean_path != snap_path and "_mean_" in mean_path and "_snap_" in snap_path
    assert sorted(os.path.basename(f) for f in os.listdir(cache) if f.endswith(".json")) == sorted(
        os.path.basename(p) for p in (mean_path, snap_path))
    (_, x, y), (_, sx, sy) = mean[1][0], snap[1][0]
    assert ring[y, x] == 0 and ring[sy, sx] == 1  # each file holds its own mode's centroids
    # Reading back: each mode gets its own file, unchanged.
    stamps = os.stat(mean_path).st_mtime_ns, os.stat(snap_path).st_mtime_ns
    assert load_or_compute(ds, range(3), 2, 32, "toy/train", cache) == (mean, mean_path)
    assert load_or_compute(ds, range(3), 2, 32, "toy/train", cache, snap=True) == (snap, snap_path)
    assert (os.stat(mean_path).st_mtime_ns, os.stat(snap_path).st_mtime_ns) == stamps


def test_build_dataset_defaults_to_the_originals_sampling(synth, tmp_path):
    cfg = DataConfig.make(root=synth, dataset="cityscapes", pct=0.5, tile=32,
                     cache_dir=str(tmp_path), num_workers=0)
    assert cfg.class_uniform.share == "all_classes" and cfg.class_uniform.snap is False
    ds = build_dataset(cfg, "train", train=True)
    assert ds.uniform.share == "all_classes"
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")][0].startswith("cityscapes_train_cv0_tile32_mean_")
    # 12 images, 19 classes: int(12 * 0.5 / 19) = 0 class-centred samples, 12 random ones.
    assert ds.epoch_length(0) == 12 and all(c is None for _, c in ds.epoch_items(0, np.random.default_rng(0)))


# Hand-built: 20 main images (0..19) and two extra ones (20, 21); 4 classes. Classes 0 and 1 have fine centroids,
# class 2 has centroids in the extra images only, class 3 has none.
HAND = {0: [[0, 1, 1], [1, 2, 2], [2, 3, 3]], 1: [[3, 4, 4]], 2: [[20, 5, 5], [21, 6, 6]], 3: []}


def composition(items):
    """{class-centred row: times drawn}, and the random part."""
    centred: dict[tuple[int, int, int], int] = {}
    for i, c in items:
        if c is not None:
            centred[(i, *c)] = centred.get((i, *c), 0) + 1
    return centred, [i for i, c in items if c is None]


@pytest.mark.parametrize("seed", range(4))
def test_epoch_composition_all_classes(seed):
    """The original: per_class = int(20 * 0.5 / 4) = 2 for each of the 4 classes, 20 - 2 * 4 = 12 random images;
    the classes with centroids (3 with the extra images, 2 without) get 2 each: 18 samples, then 16."""
    u = ClassUniform(HAND, 4, pct=0.5, num_main=20)
    assert u.share == "all_classes"
    items = u.build_epoch(np.random.default_rng(seed), include_extra=True)
    centred, rand = composition(items)
    assert len(items) == u.epoch_size(include_extra=True) == 18
    assert len(rand) == 12 == len(set(rand)) and all(0 <= i < 20 for i in rand)  # distinct main images
    per = {k: sum(n for r, n in centred.items() if list(r) in HAND[k]) for k in HAND}
    assert per == {0: 2, 1: 2, 2: 2, 3: 0}
    assert centred[(3, 4, 4)] == 2  # class 1's single centroid, drawn twice (wrap-around)
    assert all(n == 1 for r, n in centred.items() if r[0] in (20, 21))  # 2 draws = one pass over class 2's list
    assert max(n for r, n in centred.items() if list(r) in HAND[0]) == 1  # 2 draws from 3: no repeat
    late = u.build_epoch(np.random.default_rng(seed), include_extra=False)
    centred, rand = composition(late)
    assert len(late) == u.epoch_size(include_extra=False) == 16 and len(rand) == 12
    assert sorted(sum(n for r, n in centred.items() if list(r) in HAND[k]) for k in HAND) == [0, 0, 2, 2]
    assert items == u.build_epoch(np.random.default_rng(seed), include_extra=True)  # a function of the generator


@pytest.mark.parametrize("seed", range(4))
def test_epoch_composition_present_classes(seed):
    """Ours: the share is divided between the classes that have centroids. With the extra images, 3 classes:
    int(10 / 3) = 3 each, 20 - 9 = 11 random; without them, 2 classes: 5 each, 10 random. Always 20 samples."""
    u = ClassUniform(HAND, 4, pct=0.5, num_main=20, share="present_classes")
    items = u.build_epoch(np.random.default_rng(seed), include_extra=True)
    centred, rand = composition(items)
    assert len(items) == u.epoch_size(True) == 20 and len(rand) == 11 == len(set(rand))
    assert {k: sum(n for r, n in centred.items() if list(r) in HAND[k]) for k in HAND} == {0: 3, 1: 3, 2: 3, 3: 0}
    assert sorted(centred[tuple(r)] for r in HAND[0]) == [1, 1, 1] and centred[(3, 4, 4)] == 3
    late = u.build_epoch(np.random.default_rng(seed), include_extra=False)
    centred, rand = composition(late)
    assert len(late) == u.epoch_size(False) == 20 and len(rand) == 10
    assert {k: sum(n for r, n in centred.items() if list(r) in HAND[k]) for k in HAND} == {0: 5, 1: 5, 2: 0, 3: 0}
    assert sorted(centred[tuple(r)] for r in HAND[0]) == [1, 2, 2]  # 5 draws from 3: one pass, then 2 more


def test_epoch_composition_bad_values():
    with pytest.raises(ValueError, match="fraction"):
        ClassUniform(HAND, 4, pct=0.0, num_main=20)
    with pytest.raises(ValueError, match="data.class_uniform.share must be one of all_classes, present_classes"):
        ClassUniform(HAND, 4, pct=0.5, num_main=20, share="some")
    with pytest.raises(ConfigError, match=r"data.class_uniform.share: expected one of \['all_classes', 'present"):
        load_config(None, ["data.class_uniform.share=some"])


@pytest.mark.parametrize("n,k", [(3, 3), (3, 7), (5, 12), (1, 4)])
def test_draw_cycled_has_the_originals_multiset_law(n, k):
    """The original's random_sampling shuffles once and wraps around (item i % n of one permutation); ours draws a
    fresh permutation per pass. Either way every item comes k // n times, and k % n distinct items (a uniformly
    random subset: the first k % n of a permutation) once more; the epoch is shuffled after, so the two agree."""
    for seed in range(10):
        counts = np.bincount(draw_cycled(np.random.default_rng(seed), n, k), minlength=n)
        assert sorted(counts) == [k // n] * (n - k % n) + [k // n + 1] * (k % n)


class HandDataset(SegmentationDataset):
    """20 main and 2 extra images (never read), with HAND's centroids; the extra images take part in epochs < 2."""

    def __init__(self, share: str):
        samples = [Sample(f"{i}.png", f"{i}_m.png", str(i)) for i in range(22)]
        classes = ClassInfo(tuple("abcd"), np.zeros((4, 3), np.uint8))
        super().__init__(samples, classes, None, lambda *a: None)
        self.num_main = 20
        self.uniform = ClassUniform(HAND, 4, 0.5, 20, share)

    def extra_active(self, epoch: int) -> bool:
        return epoch < 2


@pytest.mark.parametrize("share,lengths", [("all_classes", [18, 18, 16, 16]), ("present_classes", [20] * 4)])
def test_epoch_length_is_the_size_of_each_epoch(share, lengths, caplog):
    """What the training sampler (and so len(train_loader)) gives per epoch equals the epoch's own size. Under
    all_classes it changes when the extra images are switched off and class 2 loses its only centroids (a warning
    says so when sampling is set up)."""
    with caplog.at_level("WARNING", logger="datasets.uniform"):
        ds = HandDataset(share)
    warned = "class-uniform epochs have 18 samples while the extra (coarse) images take part and 16 after " \
             "(class(es) [2] have centroids in them only"
    assert (warned in caplog.text) == (share == "all_classes")
    assert [ds.epoch_length(e) for e in range(4)] == lengths
    sampler = TrainSampler(ds, seed=3, world_size=2)
    for epoch, length in enumerate(lengths):
        sampler.set_epoch(epoch)
        assert len(sampler) == length // 2
        items, _ = sampler.epoch_list(epoch)
        assert items == ds.epoch_items(epoch, np.random.default_rng([3, epoch]))  # no padding, no truncation
        assert len(list(sampler)) == length // 2


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic_cityscapes(str(tmp_path_factory.mktemp("u") / "s"), 12, 2, 64, 128, 1)


def test_class_centred_crops_contain_their_class(synth, tmp_path):
    cfg = DataConfig.make(root=synth, dataset="cityscapes", pct=1.0, tile=32,
                     cache_dir=str(tmp_path), crop_size=(24, 24), scale_min=1.0, scale_max=1.0, num_workers=0,
                     batch_size=2, snap=True, share="present_classes")
    ds = build_dataset(cfg, "train", train=True)
    assert ds.uniform is not None and ds.uniform.share == "present_classes"
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")][0].startswith("cityscapes_train_cv0_tile32_snap_")
    items = ds.epoch_items(0, np.random.default_rng(0))
    centred = [(i, c) for i, c in items if c is not None]
    assert len(items) == 12 and len(centred) == 9  # one per class present (9 of them) = int(12 * 1.0 / 9)
    for k, (index, (x, y)) in enumerate(centred):
        cls = int(ds.load(index)[1][y, x])
        out = ds[SampleRef(index, k, (x, y))]
        assert (out["mask"] == cls).any(), f"class {cls} of centroid {(x, y)} missing from the crop"
    assert len(list(build_loader(ds, cfg, train=True))) == 6


def test_every_rank_draws_the_same_epoch(synth, tmp_path):
    cfg = DataConfig.make(root=synth, dataset="cityscapes", pct=0.5, tile=32,
                     cache_dir=str(tmp_path), num_workers=0)
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
