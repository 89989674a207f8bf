"""Samplers: the training sampler owns every random draw of an epoch; the evaluation sampler shards without loss.

Training: each epoch's list (a permutation, or the class-uniform mix of datasets/uniform.py) and each sample's
augmentation seed come from a generator seeded with (seed, epoch), identical on every rank; rank r takes every
world_size-th entry. Augmentation thus depends on neither the worker count nor worker scheduling, two workers never
share a stream, and a run is reproducible and resumable mid-epoch (`set_epoch(epoch, skip)`).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from .base import SampleRef


class TrainSampler(Sampler[SampleRef]):
    """Yields SampleRef(index, augmentation seed, centroid) for this rank; every rank gets the same count.

    Call `set_epoch(epoch)` before each epoch (an iteration without it moves to the next epoch by itself).
    The list is padded by wrapping around so that it divides evenly between ranks, as DistributedSampler does.
    A dataset with `epoch_items(epoch, rng) -> list[(index, centroid or None)]` and `epoch_length(epoch)` methods
    (SegmentationDataset: class-uniform sampling, coarse data until max_cu_epoch) chooses the epoch's samples.
    """

    def __init__(self, dataset, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.dataset = dataset
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw epoch `epoch` next, starting after this rank's first `skip` samples (mid-epoch resume:
        skip = batches done in the epoch * batch size)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.set_epoch(state["epoch"], state.get("skip", 0))

    def epoch_list(self, epoch: int) -> tuple[list[tuple[int, tuple[int, int] | None]], np.ndarray]:
        """All ranks' samples of `epoch` and their augmentation seeds, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        build = getattr(self.dataset, "epoch_items", None)
        items = build(epoch, rng) if build is not None else [(int(i), None) for i in rng.permutation(len(self.dataset))]
        total = self._per_rank(epoch) * self.world_size
        items = (items * math.ceil(total / max(len(items), 1)))[:total]
        seeds = rng.integers(0, 2**62, size=total)
        return items, seeds

    def _per_rank(self, epoch: int) -> int:
        length = getattr(self.dataset, "epoch_length", None)
        return math.ceil((length(epoch) if length is not None else len(self.dataset)) / self.world_size)

    @property
    def num_samples(self) -> int:
        """Samples per rank and epoch."""
        return self._per_rank(self.epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[SampleRef]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        items, seeds = self.epoch_list(epoch)
        for pos in range(self.rank + skip * self.world_size, len(items), self.world_size):
            index, centroid = items[pos]
            yield SampleRef(index, int(seeds[pos]), centroid)


class ShardSampler(Sampler[int]):
    """Evaluation: rank r gets the contiguous block [r*n//W, (r+1)*n//W): every index exactly once overall,
    no padding and no duplicates (ranks may differ by one image)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.start = rank * length // world_size
        self.stop = (rank + 1) * length // world_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))
