"""Dataset registry, build_dataset(cfg, split, train) and build_loader(dataset, cfg, train, rank, world_size, seed).

Items are dicts {'image': float32 [3,H,W], 'mask': int64 [H,W], 'name': str} ('mask' absent when unlabelled);
datasets expose num_classes, ignore_index, class_names and palette. Every expected data failure (missing folder,
unreadable file, mismatched sizes, empty split) raises DataError (DataNotFoundError is one) with a one-line message
naming the file or folder and what to do.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from transforms import build_transforms
from utils.runtime.preempt import DEFAULT_SIGNALS as STOP_SIGNALS

from .base import DataError, DataNotFoundError, SampleRef, SegmentationDataset
from .cityscapes import CityscapesDataset, CoarseOptions
from .custom import CustomDataset, read_class_list
from .folder import FolderDataset, class_info
from .mapillary import MapillaryDataset
from .mapillary import read_config as read_mapillary_config
from .sampler import ShardSampler, TrainSampler
from .synthetic import generate_synthetic_cityscapes
from .verify import verify_dataset

__all__ = [
    "DATASETS",
    "DataError",
    "DataNotFoundError",
    "SampleRef",
    "SegmentationDataset",
    "TrainSampler",
    "ShardSampler",
    "build_dataset",
    "build_loader",
    "register_dataset",
    "list_datasets",
    "generate_synthetic_cityscapes",
    "verify_dataset",
]

Factory = Callable[..., Dataset]
DATASETS: dict[str, Factory] = {}


def register_dataset(name: str) -> Callable[[Factory], Factory]:
    """Register `factory(cfg, split, train) -> Dataset` under `name` (the value of data.dataset)."""

    def wrap(factory: Factory) -> Factory:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = factory
        return factory

    return wrap


def list_datasets() -> list[str]:
    return sorted(DATASETS)


@register_dataset("cityscapes")
def _cityscapes(cfg, split: str, train: bool) -> Dataset:
    if not os.path.exists(cfg.root):
        raise DataNotFoundError(
            f"Cityscapes folder not found: data.root={cfg.root}: download leftImg8bit_trainvaltest.zip and "
            f"gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/, unpack them there and "
            f"check with python -m scripts.prepare_cityscapes {cfg.root}; for the generated demo data use "
            "data.dataset=synthetic"
        )
    return _cityscapes_layout(cfg, split, train)


@register_dataset("synthetic")
def _synthetic(cfg, split: str, train: bool) -> Dataset:
    # Generated on first use (and when data.synthetic.* changes) at data.root, then read as Cityscapes.
    s = cfg.synthetic
    generate_synthetic_cityscapes(cfg.root, s.num_train, s.num_val, s.height, s.width, s.seed, s.num_extra)
    return _cityscapes_layout(cfg, split, train)


def _cityscapes_layout(cfg, split: str, train: bool) -> Dataset:
    transform = build_transforms(cfg, train, ignore_index=255)
    ds = CityscapesDataset(cfg.root, split, transform, cv=cfg.cv, skip_bad=cfg.skip_bad,
                           coarse=_coarse_options(cfg, train))
    return _prepared(ds, cfg, train)


def _coarse_options(cfg, train: bool) -> CoarseOptions | None:
    """data.coarse.* for a training set that uses coarse data (boost classes given); None otherwise."""
    c = cfg.coarse
    if not (train and c.boost_classes):
        return None
    return CoarseOptions(c.boost_classes, c.autolabel_threshold, c.dropout_classes, c.mask_out, c.autolabel_dir,
                         c.last_epoch, c.order)


@register_dataset("mapillary")
def _mapillary(cfg, split: str, train: bool) -> Dataset:
    ignore = read_mapillary_config(os.path.join(cfg.root, "config.json"))[0].ignore_index
    ds = MapillaryDataset(cfg.root, split, build_transforms(cfg, train, ignore), skip_bad=cfg.skip_bad)
    return _prepared(ds, cfg, train)


@register_dataset("custom")
def _custom(cfg, split: str, train: bool) -> Dataset:
    c = cfg.custom
    ignore = read_class_list(c.classes)[0].ignore_index
    ds = CustomDataset(cfg.root, split, c.classes, build_transforms(cfg, train, ignore), c.image_dir, c.mask_dir,
                       c.mask_suffix, cfg.skip_bad, _coarse_options(cfg, train))
    return _prepared(ds, cfg, train)


@register_dataset("folder")
def _folder(cfg, split: str, train: bool) -> Dataset:
    # Unlabelled: evaluation transforms only, whatever `train` says; the split names nothing here.
    classes = cfg.custom.classes
    ds = FolderDataset(cfg.root, build_transforms(cfg, False, class_info(classes).ignore_index), classes, cfg.skip_bad)
    return _prepared(ds, cfg, False)


def _prepared(ds: SegmentationDataset, cfg, train: bool) -> SegmentationDataset:
    """With data.verify, every file decoded first (before the class-uniform centroids, which read every mask)."""
    if cfg.verify:
        verify_dataset(ds, cfg.num_workers, cfg.skip_bad)
    u = cfg.class_uniform
    if train and u.pct > 0:
        ds.enable_class_uniform(u.pct, u.tile, u.cache_dir, snap=u.snap, share=u.share)
    return ds


def build_dataset(cfg, split: str, train: bool) -> Dataset:
    """The dataset `cfg.dataset` (a DataConfig) for `split`, with training or evaluation transforms."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown data.dataset {cfg.dataset!r}; registered: {', '.join(list_datasets())}")
    return DATASETS[cfg.dataset](cfg, split, train)


def _seed_worker(worker_id: int) -> None:
    # Augmentation is seeded per sample by the sampler; this covers any other use of the global RNGs, with a
    # stream distinct per worker, rank and loader (torch's worker seed already differs across all of them).
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    # The stop signals are the main process's to act on (utils/runtime/preempt.py), but SLURM sends them to every
    # process of the step (a terminal sends Ctrl-C's SIGINT to every process of the job alike), and torch's
    # handlers in a worker die of them (SIGTERM not sent by the parent; SIGINT ends its loop): the main process
    # would fail ("DataLoader worker ... killed by signal") before its checkpoint. They stay blocked here (the mask
    # Loader.__iter__ forked the worker with) and one thread takes them: a SIGTERM from the main process
    # (multiprocessing ends its workers so at exit) ends the worker as torch's handler would, any other is
    # dropped. The worker still ends when the main process stops it or dies, and on SIGKILL.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # in every thread of the worker, so the taker gets them
    threading.Thread(target=_take_stop_signals, name="stop-signals", daemon=True).start()


def _take_stop_signals() -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
            os._exit(0)


def _collate(batch: list[dict]) -> dict:
    try:
        return default_collate(batch)
    except RuntimeError as e:
        sizes = sorted({tuple(item["image"].shape[1:]) for item in batch})
        if len(sizes) > 1:
            names = [item["name"] for item in batch]
            raise DataError(f"images of different sizes {sizes} in one batch ({names}); use a batch size of 1 "
                            "(data.val_batch_size=1) or a resize (data.eval_size)") from e
        raise


def _unwrapped(e: DataError) -> DataError:
    """The DataError a loader worker raised, with its own message: torch re-raises it in the main process with
    "Caught DataError in DataLoader worker process N." and the worker's whole traceback as the message."""
    text = str(e)
    name = f"\n{type(e).__module__}.{type(e).__qualname__}: "  # the traceback's last line: the exception itself
    at = text.rfind(name)
    if not text.startswith("Caught ") or at < 0:
        return e
    return type(e)(text[at + len(name):].strip())


class _Batches:
    """A loader's iterator whose worker DataErrors come out with their one-line message (the traceback stays
    available as the cause, e.g. under --debug)."""

    def __init__(self, it: Iterator) -> None:
        self.it = it

    def __iter__(self) -> "_Batches":
        return self

    def __next__(self):
        try:
            return next(self.it)
        except DataError as e:
            raise _unwrapped(e) from e

    def __len__(self) -> int:
        return len(self.it)


class Loader(DataLoader):
    """DataLoader whose iterators raise a worker's DataError as the main process would have (see _Batches)."""

    def __iter__(self) -> _Batches:
        # Workers are forked here (the first time, with persistent workers) and inherit this signal mask: a stop
        # signal sent to the whole step stays pending in a new worker until _seed_worker ignores it, instead of
        # reaching torch's handler, which kills the worker. The main process gets its own once unblocked.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return _Batches(super().__iter__())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def build_loader(
    dataset: Dataset, cfg, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0
) -> DataLoader:
    """Training: shuffled per epoch (`loader.sampler.set_epoch(epoch)`), sharded by rank, full batches only.
    Evaluation: every image exactly once across ranks, in order, last batch kept."""
    workers = cfg.num_workers
    if workers > 0:
        # OpenCV's pthread pool is not fork-safe: a worker forked while the parent's pool is busy can deadlock
        # at its first OpenCV call (opencv/opencv#5150). Workers are the parallelism, so run OpenCV serially.
        cv2.setNumThreads(0)
    common = dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed * 1009 + rank * 7 + (0 if train else 1)),
    )
    if train:
        sampler = TrainSampler(dataset, seed=seed, rank=rank, world_size=world_size, batch_size=cfg.batch_size)
        if len(sampler) < cfg.batch_size:
            raise ValueError(f"{dataset!r} gives {len(sampler)} images per process, fewer than data.batch_size="
                             f"{cfg.batch_size}: no full batch can be formed")
        return Loader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    sampler = ShardSampler(len(dataset), rank, world_size)
    return Loader(dataset, batch_size=cfg.val_batch_size, sampler=sampler, drop_last=False, **common)
