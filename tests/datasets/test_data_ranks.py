"""Every rank with the same samples (datasets.agree): two gloo processes, each reading its own copy of the data, as
two nodes do, where one copy has a file the other cannot read, lacks a file, or holds a different mask. Each rank
decides alone what it can read; left alone, the ranks' epochs differ in length and the longer one waits for ever
at its end. After agree_on_samples both hold the same samples, or both stop with a one-line DataError naming the
file and the ranks, within the short process-group timeout used here."""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import time

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datasets import DataError, build_dataset
from datasets.agree import agree_on_samples
from datasets.sampler import TrainSampler
from datasets.synthetic import generate_synthetic_cityscapes
from utils.config import DataConfig
from utils.runtime.dist import all_gather_objects

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

H, W = 32, 48
NUM_TRAIN = 6
GROUP_TIMEOUT_S = 15  # a rank that waits longer for the other fails instead of hanging
WAIT_S = 120  # bound of the whole two-process run


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    return generate_synthetic_cityscapes(str(tmp_path_factory.mktemp("ranks") / "s"), NUM_TRAIN, 2, H, W, 0)


def copies(clean: str, tmp_path) -> list[str]:
    """Each rank's own copy of the data (two nodes' local copies)."""
    roots = [str(tmp_path / f"node{r}") for r in range(2)]
    for root in roots:
        shutil.copytree(clean, root)
    return roots


def train_file(root: str, index: int, kind: str) -> str:
    """The `index`-th training image or mask (sample order)."""
    folder, suffix = ("leftImg8bit", "_leftImg8bit.png") if kind == "image" else ("gtFine", "_gtFine_labelIds.png")
    found = sorted((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, folder, "train")) for f in fs
                    if f.endswith(suffix)), key=os.path.basename)
    return found[index]


def truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def worker(rank: int, port: int, roots: list[str], settings: dict, out: str) -> None:
    """Build the training set from this rank's copy, then agree; writes what it saw to out/<rank>.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("datasets").addHandler(handler)
    cfg = DataConfig.make(dataset="cityscapes", root=roots[rank], num_workers=0, crop_size=(16, 16), **settings)
    seen: dict = {}
    try:
        ds = build_dataset(cfg, "train", train=True)
        seen.update(length=len(ds), before=TrainSampler(ds, 0, rank, 2).num_samples)
        agree_on_samples(ds, all_gather_objects)
        sampler = TrainSampler(ds, 0, rank, 2)
        seen.update(after=sampler.num_samples, names=[s.name for s in ds.samples], num_main=ds.num_main)
        for _ in sampler:  # an epoch with a collective per sample, as training has per step: both ranks finish
            dist.all_reduce(torch.ones(1))
        seen["epoch"] = "done"
        seen["epoch_size"] = ds.epoch_length(0)
    except DataError as e:
        seen["error"] = str(e)
    finally:
        dist.destroy_process_group()
    seen["warnings"] = warnings
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(seen, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(roots: list[str], out, **settings) -> list[dict]:
    # fork: the children reuse the imported modules instead of importing torch again (seconds on a small CPU)
    context = mp.start_processes(worker, args=(free_port(), roots, settings, str(out)), nprocs=2,
                                 start_method="fork", join=False)
    deadline = time.monotonic() + WAIT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the two ranks did not finish within {WAIT_S} s")
    seen = []
    for rank in range(2):
        with open(out / f"{rank}.json") as f:
            seen.append(json.load(f))
    return seen


def test_a_file_one_rank_cannot_read_is_skipped_on_every_rank(clean, tmp_path):
    roots = copies(clean, tmp_path)
    bad = train_file(roots[1], 2, "mask")
    truncate(bad)  # rank 1's copy only
    rank0, rank1 = run_ranks(roots, tmp_path, verify=True, skip_bad=True)
    assert (rank0["length"], rank1["length"]) == (NUM_TRAIN, NUM_TRAIN - 1)  # each rank alone
    assert rank0["after"] == rank1["after"] == 3
    assert rank0["names"] == rank1["names"] and len(rank0["names"]) == NUM_TRAIN - 1
    assert os.path.basename(bad).replace("_gtFine_labelIds.png", "") not in rank0["names"]
    assert rank0["epoch"] == rank1["epoch"] == "done"
    assert any(w.startswith("data.skip_bad: sample ") and "skipped on every rank: rank 1 cannot read it" in w
               and bad in w for w in rank0["warnings"])


def test_a_shorter_epoch_on_one_rank_is_made_equal(clean, tmp_path):
    """Seven samples: 4 per rank; one unreadable on rank 1 only leaves it 6 samples, 3 per rank."""
    roots = copies(clean, tmp_path)
    for root in roots:
        for kind in ("image", "mask"):
            src = train_file(root, 0, kind)
            shutil.copy(src, src.replace("_000000_", "_000100_"))
    truncate(train_file(roots[1], 3, "image"))
    rank0, rank1 = run_ranks(roots, tmp_path, verify=True, skip_bad=True)
    assert (rank0["before"], rank1["before"]) == (4, 3)  # each rank alone: rank 0 would wait for ever at the end
    assert rank0["after"] == rank1["after"] == 3
    assert rank0["names"] == rank1["names"] and rank0["epoch"] == rank1["epoch"] == "done"


def test_class_uniform_centroids_agree_after_the_drop(clean, tmp_path):
    """Rank 0 computed centroids of every mask, rank 1 of all but the one it cannot read; after the drop rank 0's
    centroids, renumbered, are exactly rank 1's (agree_on_samples compares them), and so are the epochs."""
    roots = copies(clean, tmp_path)
    truncate(train_file(roots[1], 1, "mask"))
    settings = dict(verify=True, skip_bad=True, pct=0.5, tile=16)
    rank0, rank1 = run_ranks(roots, tmp_path, cache_dir=str(tmp_path / "cache"), **settings)
    assert "error" not in rank0 and "error" not in rank1
    assert rank0["names"] == rank1["names"] and rank0["epoch_size"] == rank1["epoch_size"]
    assert rank0["epoch"] == rank1["epoch"] == "done"


def test_a_file_missing_on_one_rank_stops_both_with_its_name(clean, tmp_path):
    roots = copies(clean, tmp_path)
    image, mask = train_file(roots[1], 4, "image"), train_file(roots[1], 4, "mask")
    os.remove(image)
    os.remove(mask)
    rank0, rank1 = run_ranks(roots, tmp_path)
    assert (rank0["length"], rank1["length"]) == (6, 5)
    assert (rank0["before"], rank1["before"]) == (3, 3)  # equal per-rank counts by chance, different lists ...
    assert rank0["error"] == rank1["error"]  # ... both stop, with one line
    relative = os.path.relpath(image, roots[1])
    assert rank0["error"] == (f"cityscapes/train/cv0: the ranks list different files under data.root: "
                              f"{os.path.join(roots[0], relative)} is listed on rank 0 but not on rank 1; every node "
                              f"must see the same files (an incomplete or stale copy on one node?)")


def test_a_mask_that_differs_between_copies_stops_both_with_its_name(clean, tmp_path):
    roots = copies(clean, tmp_path)
    mask = train_file(roots[1], 3, "mask")
    cv2.imwrite(mask, np.full((H, W), 7, np.uint8))  # decodable, but other classes than rank 0's copy
    rank0, rank1 = run_ranks(roots, tmp_path, pct=0.5, tile=16, cache_dir=str(tmp_path / "cache"))
    for rank, seen in enumerate((rank0, rank1)):  # each names the file in its own copy
        assert seen["error"] == (
            f"cityscapes/train/cv0: the ranks disagree on their samples: the class-uniform centroids of "
            f"{train_file(roots[rank], 3, 'mask')} differ between rank 0 and rank 1 (the file differs between the "
            "nodes' copies, or a centroid cache in data.class_uniform.cache_dir is stale: make the copies identical "
            "or delete the cache files)")


# ----------------------------------------------------------------------------------------------- one process


def test_one_process_agrees_with_itself(clean):
    ds = build_dataset(DataConfig.make(dataset="cityscapes", root=clean, num_workers=0, crop_size=(16, 16)), "train",
                       True)
    agree_on_samples(ds, all_gather_objects)  # no process group: [obj]
    assert len(ds) == NUM_TRAIN and ds.listing is None


def test_every_sample_unreadable_on_some_rank_is_one_line(clean):
    ds = build_dataset(DataConfig.make(dataset="cityscapes", root=clean, num_workers=0, crop_size=(16, 16)), "train",
                       True)
    listing = ds.listed()

    def two_ranks(obj):  # rank 1 dropped every sample: what its all_gather would bring back
        if isinstance(obj, tuple) and isinstance(obj[1], dict):
            return [obj, (obj[0], {i: "unreadable" for i in range(len(listing))})]
        return [obj, obj]

    with pytest.raises(DataError) as e:
        agree_on_samples(ds, two_ranks)
    assert str(e.value) == ("cityscapes/train/cv0: every sample is unreadable on some rank (data.skip_bad=true); "
                            "check data.root on every node")


def test_other_datasets_compare_their_lengths():
    with pytest.raises(DataError, match=r"the ranks hold different numbers of samples: \[3, 4\]$"):
        agree_on_samples([1, 2, 3], lambda n: [n, n + 1])
    agree_on_samples([1, 2, 3], lambda n: [n, n])
