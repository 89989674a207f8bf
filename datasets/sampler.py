"""Samplers: the training sampler owns every random draw of an epoch; the evaluation sampler shards without loss.

Training: each epoch's list (a permutation, or the class-uniform mix of datasets/uniform.py) and each sample's
augmentation seed come from a generator seeded with (seed, epoch), identical on every rank. The list is cut into
chunks of one batch (data.batch_size entries) and rank r takes chunks r, r + world_size, ...: a sample's place is
its global index in the list, so a step of G = batch x accumulation x ranks samples covers the same G entries, in
the same batches, whatever the split between ranks and accumulation. Augmentation depends on neither the worker
count nor worker scheduling, two workers never share a stream, and a run is reproducible and resumable mid-epoch
(`set_epoch(epoch, start)`), also on another number of ranks that keeps the global batch.
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
    The list is padded by wrapping around so that it divides evenly between ranks, as DistributedSampler does;
    each rank yields whole chunks of `batch_size` entries (a loader dropping its last partial batch drops nothing
    more). With batch_size=1 rank r takes every world_size-th entry.
    A dataset with `epoch_items(epoch, rng) -> list[(index, centroid or None)]` and `epoch_length(epoch)` methods
    (SegmentationDataset: class-uniform sampling, coarse data until max_cu_epoch) chooses the epoch's samples.
    """

    def __init__(self, dataset, seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) == 0:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.seed, self.rank, self.world_size, self.batch_size = int(seed), rank, world_size, int(batch_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch `epoch` next, from the global position `start` (samples of the epoch that all ranks
        together have consumed: mid-epoch resume). `start` must fall on a chunk boundary of every rank: a multiple
        of batch_size x world_size, which a whole number of steps is."""
        chunk = self.batch_size * self.world_size
        if start % chunk:
            raise ValueError(f"start position {start} is not a multiple of batch_size x world_size = {chunk}")
        self.epoch, self.start = int(epoch), int(start)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.set_epoch(state["epoch"], state.get("start", 0))

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
        """Samples per rank and epoch: whole chunks only."""
        return self._per_rank(self.epoch) // self.batch_size * self.batch_size

    def __len__(self) -> int:
        return self.num_samples

    def positions(self, epoch: int, start: int = 0) -> Iterator[int]:
        """This rank's global positions in `epoch`'s list, from the global position `start` on."""
        chunks = self._per_rank(epoch) // self.batch_size
        first = start // (self.batch_size * self.world_size)
        for j in range(first, chunks):
            base = (j * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)

    def __iter__(self) -> Iterator[SampleRef]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        items, seeds = self.epoch_list(epoch)
        for pos in self.positions(epoch, start):
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
