"""Synthetic generation, Cityscapes layouts and id mapping, loaders and samplers, and bad-input errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from datasets import DataError, DataNotFoundError, SampleRef, build_dataset, build_loader
from datasets.base import LabelMap, read_image
from datasets.cityscapes import CityscapesDataset, cv_cities, label_map
from datasets.sampler import ShardSampler, TrainSampler
from datasets.synthetic import MANIFEST, MARKER, generate_synthetic_cityscapes, synthetic_scene
from transforms import build_transforms
from utils.config import DataConfig, SyntheticConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCENE_IDS = {0, 1, 7, 8, 11, 17, 20, 21, 23, 24, 26}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "synth")
    return generate_synthetic_cityscapes(root, num_train=8, num_val=4, height=48, width=96, seed=3)


def data_cfg(root: str, **kw) -> DataConfig:
    base = dict(dataset="cityscapes", root=root, crop_size=(32, 40), batch_size=2, val_batch_size=2, num_workers=0)
    base.update(kw)
    return DataConfig.make(**base)


def copy_tree(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def snapshot(root) -> dict[str, bytes | None]:
    """Every file (its bytes), link (its target) and folder (None) under `root`, by relative path."""
    out: dict[str, bytes | None] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = None
        for name in files:
            path = os.path.join(d, name)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = b"link to " + os.readlink(path).encode()
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_layout_and_ids(synth):
    images = sorted(os.path.relpath(os.path.join(d, f), synth)
                    for d, _, fs in os.walk(os.path.join(synth, "leftImg8bit")) for f in fs)
    assert len(images) == 12
    assert images[0] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    for rel in images:
        label = os.path.join(synth, rel.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds"))
        mask = cv2.imread(label, cv2.IMREAD_UNCHANGED)
        assert mask.shape == (48, 96) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= SCENE_IDS
        assert cv2.imread(os.path.join(synth, rel)).shape == (48, 96, 3)
    assert os.path.isdir(os.path.join(synth, "leftImg8bit", "val", "frankfurt"))
    assert json.load(open(os.path.join(synth, MARKER)))["num_train"] == 8


def test_synthetic_scenes_deterministic_and_varied():
    a, la = synthetic_scene(0, "train", 5, 64, 128)
    b, lb = synthetic_scene(0, "train", 5, 64, 128)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, lc = synthetic_scene(1, "train", 5, 64, 128)
    assert not np.array_equal(la, lc)
    counts = np.zeros(256)
    for i in range(20):
        counts += np.bincount(synthetic_scene(0, "train", i, 64, 128)[1].ravel(), minlength=256)
    assert set(np.nonzero(counts)[0]) == SCENE_IDS  # every class (and unlabelled pixels) occurs
    assert counts[7] > counts[17] > 0  # road is large, poles are thin


def test_synthetic_classes_not_a_colour_lookup():
    """Pixel colours of different classes overlap (noise, lighting), so context is needed."""
    img, lbl = synthetic_scene(0, "train", 0, 128, 256)
    road, building = img[lbl == 7].astype(float), img[lbl == 11].astype(float)
    assert road.std(axis=0).mean() > 8 and building.std(axis=0).mean() > 8


def test_synthetic_generation_is_idempotent_and_atomic(tmp_path):
    root = str(tmp_path / "s")
    generate_synthetic_cityscapes(root, 2, 1, 32, 48, 0)
    marker = os.path.join(root, MARKER)
    stamp = os.stat(marker).st_mtime_ns
    generate_synthetic_cityscapes(root, 2, 1, 32, 48, 0)
    assert os.stat(marker).st_mtime_ns == stamp  # reused, not rewritten
    # Other parameters: the old generated folder is replaced.
    generate_synthetic_cityscapes(root, 3, 1, 32, 48, 0)
    assert len(os.listdir(os.path.join(root, "leftImg8bit", "train", "aachen"))) == 1
    assert json.load(open(marker))["num_train"] == 3
    # An interrupted run leaves a partial folder, which the next run removes.
    os.makedirs(str(tmp_path / ".t.partial-xyz" / "leftImg8bit"))
    generate_synthetic_cityscapes(str(tmp_path / "t"), 1, 1, 32, 48, 0)
    assert sorted(p for p in os.listdir(tmp_path) if "partial" in p) == []
    # An empty folder is filled; one holding anything without the marker is not ours: never touched.
    os.makedirs(str(tmp_path / "empty"))
    generate_synthetic_cityscapes(str(tmp_path / "empty"), 1, 1, 32, 48, 0)
    assert os.path.isfile(str(tmp_path / "empty" / MARKER))
    mine = tmp_path / "mine"
    os.makedirs(mine / "leftImg8bit")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"mine exists and is not a generated dataset .*data.dataset=cityscapes"):
        generate_synthetic_cityscapes(str(mine), 1, 1, 32, 48, 0)
    assert snapshot(mine) == {"leftImg8bit/": None, "notes.txt": b"mine"}
    with pytest.raises(DataError, match=r"num_train.*data.synthetic"):
        generate_synthetic_cityscapes(str(tmp_path / "u"), 0, 1, 32, 48, 0)


def test_synthetic_manifest_lists_every_written_file(tmp_path):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 2, 1, 32, 48, 0)
    written = json.load(open(os.path.join(root, MANIFEST)))
    files = {k for k, v in snapshot(root).items() if v is not None}
    assert files == set(written) | {MARKER, MANIFEST} and len(written) == 6  # 3 images + 3 label maps
    assert all(hashlib.sha256(snapshot(root)[k]).hexdigest() == v for k, v in written.items())
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not a private temporary one


def test_regeneration_removes_only_the_generated_files(tmp_path):
    root = str(tmp_path / "s")
    generate_synthetic_cityscapes(root, 7, 2, 32, 48, 0)  # 7 train images: all six train cities, aachen twice
    generate_synthetic_cityscapes(root, 2, 1, 32, 48, 1)
    after = snapshot(root)
    assert sorted(k for k in after if k.startswith("leftImg8bit/train/") and after[k] is not None) == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png",
    ]
    assert "leftImg8bit/train/bremen/" not in after  # the old run's folders went with its files
    assert json.load(open(os.path.join(root, MARKER)))["seed"] == 1
    assert sorted(p for p in os.listdir(tmp_path) if "partial" in p) == []


@pytest.mark.parametrize("intruder", ["file", "changed", "folder", "link"])
def test_regeneration_refuses_when_the_folder_holds_other_files(tmp_path, intruder):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 2, 1, 32, 48, 0)
    city = os.path.join(root, "leftImg8bit", "train", "aachen")
    if intruder == "file":
        rel = "leftImg8bit/train/aachen/my_photo.png"
        open(os.path.join(root, rel), "wb").write(b"user data")
    elif intruder == "changed":
        rel = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
        cv2.imwrite(os.path.join(root, rel), np.zeros((32, 48, 3), np.uint8))  # the user's own image, same name
    elif intruder == "folder":
        rel = "autolabelled/"
        os.makedirs(os.path.join(root, "autolabelled"))
    else:
        rel = "leftImg8bit/train/aachen/link.png"
        os.symlink(str(tmp_path / "elsewhere.png"), os.path.join(city, "link.png"))
    before = snapshot(root)
    with pytest.raises(DataError, match=rf"holds 1 file\(s\) the synthetic generator did not write .*\({rel}\).*"
                                        r"move them out of that folder, or set data.root to a new folder"):
        generate_synthetic_cityscapes(root, 3, 1, 32, 48, 0)
    assert snapshot(root) == before  # nothing changed or deleted
    # The same parameters still reuse the folder as it is.
    assert generate_synthetic_cityscapes(root, 2, 1, 32, 48, 0) == root and snapshot(root) == before


def test_regeneration_of_a_folder_without_manifest_is_refused(tmp_path):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 2, 1, 32, 48, 0)
    os.remove(os.path.join(root, MANIFEST))  # as an earlier version wrote it
    before = snapshot(root)
    with pytest.raises(DataError, match="earlier version that did not record its files.*delete that folder yourself"):
        generate_synthetic_cityscapes(root, 3, 1, 32, 48, 0)
    assert snapshot(root) == before


def test_interrupted_replacement_is_finished_by_the_next_run(tmp_path):
    root = generate_synthetic_cityscapes(str(tmp_path / "s"), 2, 1, 32, 48, 0)
    # Stopped part-way through removing the old files: marker gone, some files gone, manifest kept.
    os.remove(os.path.join(root, MARKER))
    os.remove(os.path.join(root, "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"))
    generate_synthetic_cityscapes(root, 1, 1, 32, 48, 0)
    assert json.load(open(os.path.join(root, MARKER)))["num_train"] == 1
    assert len(json.load(open(os.path.join(root, MANIFEST)))) == 4


def test_build_dataset_generates_on_first_use(tmp_path):
    root = str(tmp_path / "gen")
    cfg = data_cfg(root, dataset="synthetic", synthetic=SyntheticConfig(num_train=3, num_val=2, height=32, width=64))
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 2 and os.path.isfile(os.path.join(root, MARKER)) and ds.num_classes == 19
    assert len(build_dataset(cfg, "train", train=True)) == 3
    # The folder is also an ordinary Cityscapes folder.
    assert [s.name for s in build_dataset(data_cfg(root), "val", False).samples] == [s.name for s in ds.samples]


def test_the_demo_uses_the_synthetic_dataset():
    assert DataConfig().dataset == "synthetic"
    demo = load_config(os.path.join(REPO, "configs", "demo", "default.yaml")).data
    assert (demo.dataset, demo.root) == ("synthetic", "data/synthetic_cityscapes")
    for name in ("cityscapes/hmsa_ocrnet_hrnet_w48_1024x2048.yaml", "cityscapes/eval_hmsa_ocrnet_hrnet_w48.yaml"):
        assert load_config(os.path.join(REPO, "configs", name)).data.dataset == "cityscapes"


def test_cityscapes_with_a_missing_root_is_an_error_not_a_generation(tmp_path):
    root = tmp_path / "cityscapes"
    with pytest.raises(DataNotFoundError, match=rf"Cityscapes folder not found: data.root={root}: download .*"
                                                rf"scripts.prepare_cityscapes {root}; .*data.dataset=synthetic"):
        build_dataset(data_cfg(str(root)), "train", True)
    assert not root.exists() and os.listdir(tmp_path) == []
    with pytest.raises(DataError):  # the one class for expected data failures
        build_dataset(data_cfg(str(root)), "val", False)


def test_synthetic_on_a_downloaded_folder_is_refused(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "real")
    os.remove(os.path.join(root, MARKER))
    os.remove(os.path.join(root, MANIFEST))
    before = snapshot(root)
    with pytest.raises(DataError, match="not a generated dataset.*use data.dataset=cityscapes"):
        build_dataset(data_cfg(root, dataset="synthetic"), "train", True)
    assert snapshot(root) == before


# ----------------------------------------------------------------------------------------------- cityscapes


def test_label_map_matches_the_table():
    lm = label_map()
    raw = np.arange(34, dtype=np.uint8).reshape(2, 17)
    out = lm(raw).ravel().tolist()
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert out == [expected.get(i, 255) for i in range(34)]
    with pytest.raises(DataError, match=r"m\.png.*34, 200"):
        lm(np.array([[7, 34, 200]], np.uint8), "m.png")
    assert LabelMap.identity(3, 255)(np.array([[0, 2, 255]], np.uint8)).tolist() == [[0, 2, 255]]
    with pytest.raises(DataError, match="3"):
        LabelMap.identity(3, 255)(np.array([[3]], np.uint16))


def test_cityscapes_items_and_mapping(synth):
    cfg = data_cfg(synth)
    val = build_dataset(cfg, "val", train=False)
    assert (val.num_classes, val.ignore_index, len(val.class_names)) == (19, 255, 19)
    assert val.palette.shape == (19, 3) and val.palette.dtype == np.uint8 and val.palette[0].tolist() == [128, 64, 128]
    item = val[0]
    assert set(item) == {"image", "mask", "name"} and item["name"] == "frankfurt_000000_000019"
    assert item["image"].shape == (3, 48, 96) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (48, 96) and item["mask"].dtype == torch.int64  # val: full size, no crop
    raw = cv2.imread(val.samples[0].mask, cv2.IMREAD_UNCHANGED)
    assert torch.equal(item["mask"], torch.from_numpy(label_map()(raw).astype(np.int64)))
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2, 5, 7, 8, 10, 11, 13, 255}
    train = build_dataset(cfg, "train", train=True)
    t = train[SampleRef(0, 123)]
    assert t["image"].shape == (3, 32, 40) and t["mask"].shape == (32, 40)
    again = train[SampleRef(0, 123)]
    assert torch.equal(t["image"], again["image"]) and torch.equal(t["mask"], again["mask"])


def test_zip_named_layout(synth, tmp_path):
    root = str(tmp_path / "zip")
    os.makedirs(os.path.join(root, "leftImg8bit_trainvaltest"))
    os.makedirs(os.path.join(root, "gtFine_trainvaltest"))
    shutil.copytree(os.path.join(synth, "leftImg8bit"), os.path.join(root, "leftImg8bit_trainvaltest", "leftImg8bit"))
    shutil.copytree(os.path.join(synth, "gtFine"), os.path.join(root, "gtFine_trainvaltest", "gtFine"))
    ds = CityscapesDataset(root, "train", build_transforms(data_cfg(root), False, 255))
    assert len(ds) == 8 and ds.samples[0].mask.endswith("gtFine_trainvaltest/gtFine/train/aachen/"
                                                         "aachen_000000_000019_gtFine_labelIds.png")


def test_cv_splits(tmp_path):
    train = ["aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
             "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich"]
    val = ["frankfurt", "lindau", "munster"]
    for split, cities in (("train", train), ("val", val)):
        for c in cities:
            os.makedirs(tmp_path / "leftImg8bit" / split / c)
    root = str(tmp_path / "leftImg8bit")
    assert [c for _, c in cv_cities(root, "val", 0)] == val
    assert [c for _, c in cv_cities(root, "val", 1)] == ["darmstadt", "dusseldorf", "erfurt"]
    assert [c for _, c in cv_cities(root, "val", 2)] == ["monchengladbach", "strasbourg", "stuttgart"]
    cv1_train = cv_cities(root, "train", 1)
    assert len(cv1_train) == 18 and ("val", "frankfurt") in cv1_train and ("train", "erfurt") not in cv1_train
    assert len(cv_cities(root, "train", 3)) == len(cv_cities(root, "val", 3)) == 21
    with pytest.raises(ValueError, match="cv"):
        cv_cities(root, "val", 4)


def test_test_split_is_unlabelled(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "c")
    shutil.copytree(os.path.join(root, "leftImg8bit", "val"), os.path.join(root, "leftImg8bit", "test"))
    ds = CityscapesDataset(root, "test", build_transforms(data_cfg(root), False, 255))
    assert len(ds) == 4 and not ds.has_labels and set(ds[0]) == {"image", "name"}


# ----------------------------------------------------------------------------------------------- loaders


def test_train_loader_batches_and_reproducibility(synth):
    cfg = data_cfg(synth, batch_size=3)
    ds = build_dataset(cfg, "train", train=True)
    loader = build_loader(ds, cfg, train=True, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 8 images, batches of 3, last partial batch dropped
    b = batches[0]
    assert b["image"].shape == (3, 3, 32, 40) and b["mask"].shape == (3, 32, 40) and len(b["name"]) == 3
    loader.sampler.set_epoch(0)
    again = list(loader)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))
    nxt = list(loader)  # no set_epoch: moves on to epoch 1 by itself
    assert [x["name"] for x in nxt] != [x["name"] for x in batches]


def test_workers_do_not_change_the_data(synth):
    cfg = data_cfg(synth)
    ds = build_dataset(cfg, "train", train=True)
    inline = list(build_loader(ds, cfg, train=True, seed=2))
    workers = list(build_loader(ds, cfg.updated(num_workers=2), train=True, seed=2))
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers):
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # ...and no two samples of an epoch share an augmentation stream.
    _, seeds = TrainSampler(ds, seed=2).epoch_list(0)
    assert len(set(seeds.tolist())) == len(seeds)


def test_train_sampler_ranks_split_the_epoch():
    data = list(range(10))
    parts = [list(TrainSampler(data, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    indices = [ref.index for p in parts for ref in p]
    assert set(indices) == set(range(10))  # 12 slots: all 10 images plus 2 wrapped around
    s = TrainSampler(data, seed=0)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start=4)
    assert list(s) == full[4:]
    state = s.state_dict()
    assert state["epoch"] == 6
    t = TrainSampler(data, seed=0)
    t.load_state_dict({"epoch": 5, "start": 4, "seed": 0})
    assert list(t) == full[4:]
    with pytest.raises(ValueError, match="seed"):
        t.load_state_dict({"epoch": 1, "seed": 9})


def test_train_sampler_keys_samples_by_their_global_position():
    """A step of G = batch x accumulation x ranks samples covers the same list entries in the same batches however
    G is split: 2 ranks x 2 images = 1 rank x 2 images x 2 accumulated batches; a resume from a global position
    continues there on any split that keeps the chunk boundary."""
    data = list(range(16))
    items, _ = TrainSampler(data, seed=3).epoch_list(0)
    ranks = [list(TrainSampler(data, seed=3, rank=r, world_size=2, batch_size=2)) for r in range(2)]
    one = list(TrainSampler(data, seed=3, world_size=1, batch_size=2))
    batches_two = [[ref.index for ref in ranks[r][b:b + 2]] for b in range(0, 8, 2) for r in range(2)]
    batches_one = [[ref.index for ref in one[b:b + 2]] for b in range(0, 16, 2)]
    assert batches_two == batches_one == [[i for i, _ in items[b:b + 2]] for b in range(0, 16, 2)]
    assert [ref.index for ref in ranks[1][:2]] == [items[2][0], items[3][0]]  # chunk 1 of the list: rank 1
    resumed = TrainSampler(data, seed=3, world_size=1, batch_size=2)
    resumed.set_epoch(0, start=8)  # 2 steps of 4 samples done on 2 ranks
    assert [ref.index for ref in resumed] == [i for i, _ in items[8:]]
    assert [ref.seed for ref in list(TrainSampler(data, seed=3, rank=1, world_size=2, batch_size=2))] == \
        [ref.seed for ref in one[2:4] + one[6:8] + one[10:12] + one[14:16]]
    with pytest.raises(ValueError, match="multiple of batch_size x world_size = 4"):
        TrainSampler(data, seed=3, world_size=2, batch_size=2).set_epoch(0, start=2)
    # 10 entries on 3 ranks: 4 per rank (padded to 12), two whole chunks of 2 each; 3 per batch: one chunk each
    assert [len(TrainSampler(list(range(10)), rank=r, world_size=3, batch_size=b)) for b in (2, 3) for r in range(3)] \
        == [4, 4, 4, 3, 3, 3]


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_sharding_covers_each_image_once(n, world):
    seen = [i for r in range(world) for i in ShardSampler(n, r, world)]
    assert sorted(seen) == list(range(n))


def test_val_loader_keeps_last_batch(synth):
    cfg = data_cfg(synth, val_batch_size=3)
    ds = build_dataset(cfg, "val", train=False)
    names = [n for r in range(2) for b in build_loader(ds, cfg, False, rank=r, world_size=2) for n in b["name"]]
    assert sorted(names) == sorted(s.name for s in ds.samples)


def test_batch_larger_than_split_is_an_error(synth):
    cfg = data_cfg(synth, batch_size=9)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(build_dataset(cfg, "train", True), cfg, train=True)


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_folder_and_empty_split(tmp_path, synth):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="nowhere.*leftImg8bit"):
        build_dataset(data_cfg(missing), "train", True)
    os.makedirs(tmp_path / "empty" / "leftImg8bit" / "train")
    with pytest.raises(DataNotFoundError, match="empty.*leftImg8bit/train"):
        build_dataset(data_cfg(str(tmp_path / "empty")), "train", True)
    with pytest.raises(DataNotFoundError, match="leftImg8bit/val"):
        build_dataset(data_cfg(str(tmp_path / "empty")), "val", True)
    os.makedirs(tmp_path / "other")
    with pytest.raises(DataNotFoundError, match="no Cityscapes image folder.*gtFine"):
        build_dataset(data_cfg(str(tmp_path / "other")), "train", True)
    with pytest.raises(ValueError, match="split"):
        build_dataset(data_cfg(synth), "training", True)
    with pytest.raises(ValueError, match="unknown data.dataset 'kitti'"):
        build_dataset(data_cfg(synth, dataset="kitti"), "train", True)


def test_image_without_mask_and_mask_without_image(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "a")
    os.remove(os.path.join(root, "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"))
    with pytest.raises(DataError, match="without a mask.*lindau_000001_000019_gtFine_labelIds.png"):
        build_dataset(data_cfg(root), "val", False)
    root = copy_tree(synth, tmp_path / "b")
    os.remove(os.path.join(root, "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png"))
    with pytest.raises(DataError, match="without an image.*lindau_000001_000019_gtFine_labelIds.png"):
        build_dataset(data_cfg(root), "val", False)


def test_corrupt_image_names_the_path(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "c")
    ds = build_dataset(data_cfg(root), "val", False)
    path = ds.samples[1].image
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])  # truncated PNG
    with pytest.raises(DataError, match=f"cannot decode image.*{os.path.basename(path)}"):
        ds[1]
    open(path, "wb").write(b"not an image")
    with pytest.raises(DataError, match=os.path.basename(path)):
        read_image(path)
    skipping = build_dataset(data_cfg(root, skip_bad=True), "val", False)
    # evaluation: logged and marked skipped (evaluate leaves it out; another image's pixels keep the batch whole)
    assert skipping[1]["name"] == skipping.samples[1].name and skipping[1]["skipped"]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_raises_a_workers_data_error_with_its_own_message(synth, tmp_path, workers):
    root = copy_tree(synth, tmp_path / "w")
    cfg = data_cfg(root, num_workers=workers, val_batch_size=1)
    ds = build_dataset(cfg, "val", False)
    path = ds.samples[2].image
    open(path, "wb").write(b"not an image")
    with pytest.raises(DataError) as e:
        list(build_loader(ds, cfg, train=False))
    assert str(e.value) == f"cannot decode image (corrupt, truncated or not an image): {path}"  # no traceback text


def test_mask_size_and_label_values(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "d")
    ds = build_dataset(data_cfg(root), "val", False)
    mask_path = ds.samples[0].mask
    cv2.imwrite(mask_path, np.full((10, 20), 7, np.uint8))
    with pytest.raises(DataError, match=r"mask size 20x10 differs from image size 96x48.*frankfurt_000000"):
        ds[0]
    bad = np.full((48, 96), 7, np.uint8)
    bad[0, :3] = (40, 41, 99)
    cv2.imwrite(mask_path, bad)
    with pytest.raises(DataError, match=r"frankfurt_000000_000019_gtFine_labelIds.png.*40, 41, 99"):
        ds[0]
    cv2.imwrite(mask_path, np.zeros((48, 96, 3), np.uint8))
    with pytest.raises(DataError, match="single-channel"):
        ds[0]


@pytest.mark.slow
def test_augmentation_differs_between_epochs_and_samples(synth):
    cfg = data_cfg(synth)
    ds = build_dataset(cfg, "train", train=True)
    sampler = TrainSampler(ds, seed=0)
    crops: dict[int, list[torch.Tensor]] = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for ref in sampler:
            crops.setdefault(ref.index, []).append(ds[ref]["image"])
    assert all(not torch.equal(a, b) for a, b in crops.values())  # same image, another epoch: another draw


@pytest.mark.parametrize("quality,subsampling", [(95, 0), (75, 2)])
def test_jpeg_images_decode_to_pillows_pixels_and_ignore_the_exif_orientation(tmp_path, quality, subsampling):
    """Mapillary ships JPEGs and the original decodes them with Pillow, which does not apply an EXIF orientation
    tag; OpenCV would by default (a 60x80 image tagged "rotate 90" would come out 80x60, away from its mask)."""
    from PIL import Image

    image, _ = synthetic_scene(7, "train", 0, 60, 80)
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-30, 30, image.shape), 0, 255)
    pil = Image.fromarray(noisy.astype(np.uint8))
    exif = pil.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "tagged.jpg")
    pil.save(path, quality=quality, subsampling=subsampling, exif=exif.tobytes())
    assert cv2.imread(path).shape == (80, 60, 3)  # what the flag prevents
    ours = read_image(path)
    assert ours.shape == (60, 80, 3)
    assert np.array_equal(ours, np.asarray(Image.open(path).convert("RGB")))
