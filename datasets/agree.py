"""Every rank with the same samples: the check train.py runs on each dataset it builds, before any collective.

Each rank lists data.root itself, verifies the files itself (data.verify) and, with data.skip_bad, drops the files
it cannot read; a file one node's copy lacks, or that one node cannot read (a truncated copy, a flaky network file
system), would give that rank a shorter epoch, and the others would wait for it at the end of theirs until the
collective timeout. `agree_on_samples` makes the ranks agree: a file any rank dropped is dropped on every rank,
and any difference left (the listing, the class-uniform centroids) stops every rank with a DataError naming the
file and the ranks, instead of a hang. The collective is passed in (utils.runtime.dist.all_gather_objects), so
that datasets never touch process-group state.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Sequence

from .base import DataError, Sample, SegmentationDataset

log = logging.getLogger(__name__)

AllGather = Callable[[Any], list[Any]]


def _root(samples: Sequence[Sample]) -> str:
    """The folder every file of `samples` is under (data.root, as a rank sees it)."""
    folders = [os.path.dirname(os.path.abspath(p)) for s in samples for p in (s.image, s.mask) if p is not None]
    return os.path.commonpath(folders) if folders else ""


def _relative(samples: Sequence[Sample], root: str) -> list[tuple[str, str | None]]:
    """(image, mask) of each sample relative to `root`: two nodes may mount the same data in different places."""
    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(os.path.abspath(p), root)

    return [(rel(s.image), rel(s.mask)) for s in samples]


def _digest(value: Any) -> str:
    return hashlib.sha1(repr(value).encode()).hexdigest()


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _centroid_rows(dataset: SegmentationDataset) -> list[str]:
    """A digest of the class-uniform centroid rows of each sample (empty without class-uniform sampling)."""
    if dataset.uniform is None:
        return []
    rows = [[] for _ in dataset.samples]
    for c, table in dataset.uniform.centroids.items():
        for index, x, y in table.tolist():
            rows[index].append((c, x, y))
    return [_digest(r) for r in rows]


def _state(dataset: SegmentationDataset) -> tuple[Any, ...]:
    """What an epoch's sample list depends on besides the listing (the same on every rank by then)."""
    return len(dataset.samples), dataset.num_main, _centroid_rows(dataset)


def _listing_difference(dataset: SegmentationDataset, tables: list[tuple[str, list]]) -> str:
    """One line naming a file that the ranks list differently, and the ranks."""
    where = f"{dataset.description}: the ranks list different files under data.root"
    fix = "every node must see the same files (an incomplete or stale copy on one node?)"
    files = [[p for pair in rel for p in pair if p is not None] for _, rel in tables]
    present = [set(f) for f in files]
    for rank_files in files:
        for f in rank_files:
            have = [r for r, s in enumerate(present) if f in s]
            if len(have) < len(files):
                lack = [r for r in range(len(files)) if r not in have]
                return (f"{where}: {os.path.join(tables[have[0]][0], f)} is listed on {_ranks(have)} but not on "
                        f"{_ranks(lack)}; {fix}")
    return f"{where} (the same files, paired or ordered differently); {fix}"


def _state_difference(dataset: SegmentationDataset, states: list[tuple[Any, ...]]) -> str:
    """One line naming the mask whose class-uniform centroids differ between ranks, and the ranks."""
    for i, per_rank in enumerate(zip(*(s[2] for s in states))):
        if len(set(per_rank)) > 1:
            odd = [r for r in range(len(states)) if per_rank[r] != per_rank[0]]
            return (f"{dataset.description}: the ranks disagree on their samples: the class-uniform centroids of "
                    f"{dataset.samples[i].mask} differ between rank 0 and {_ranks(odd)} (the file differs between "
                    "the nodes' copies, or a centroid cache in data.class_uniform.cache_dir is stale: make the "
                    "copies identical or delete the cache files)")
    sizes = ", ".join(f"rank {r}: {s[0]} samples, {s[1]} main" for r, s in enumerate(states))
    return f"{dataset.description}: the ranks disagree on their samples ({sizes})"


def agree_on_samples(dataset: Any, all_gather: AllGather) -> None:
    """Make every rank's `dataset` hold the same samples (a collective: every rank calls it, at the same point).

    `all_gather(obj)` returns every rank's `obj` in rank order (utils.runtime.dist.all_gather_objects). Files
    that any rank dropped (data.verify with data.skip_bad) are dropped on every rank; a listing that differs
    between ranks, or samples and centroids that still do, raise DataError on every rank naming a file and the
    ranks. One process: nothing to agree on, nothing changes.
    """
    if not isinstance(dataset, SegmentationDataset):  # a registered dataset of another kind: lengths only
        lengths = all_gather(len(dataset))
        if len(set(lengths)) > 1:
            raise DataError(f"{dataset!r}: the ranks hold different numbers of samples: {lengths}")
        return
    listed = dataset.listed()
    root = _root(listed)
    relative = _relative(listed, root)
    gathered = all_gather((_digest(relative), dict(dataset.dropped)))
    if len({digest for digest, _ in gathered}) > 1:
        raise DataError(_listing_difference(dataset, all_gather((root, relative))))
    # Same listing everywhere: a listing index names one file on every rank.
    dropped_by: dict[int, list[int]] = {}
    for r, (_, dropped) in enumerate(gathered):
        for index in dropped:
            dropped_by.setdefault(index, []).append(r)
    here = {index: position for position, index in enumerate(dataset.listing_indices())}
    more = {}
    for index, ranks in sorted(dropped_by.items()):
        if index in here:
            why = gathered[ranks[0]][1][index]
            log.warning("data.skip_bad: sample %s skipped on every rank: %s cannot read it: %s", listed[index].name,
                        _ranks(ranks), why)
            more[here[index]] = f"unreadable on {_ranks(ranks)}: {why}"
    if len(more) == len(dataset.samples):
        raise DataError(f"{dataset.description}: every sample is unreadable on some rank (data.skip_bad=true); check "
                        "data.root on every node")
    dataset.drop_samples(more)
    state = _state(dataset)
    states = all_gather(_digest(state))
    if len(set(states)) > 1:
        raise DataError(_state_difference(dataset, all_gather(state)))
