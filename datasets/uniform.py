"""Class-uniform sampling (REFERENCE.md 7.5) with a centroid cache that cannot go stale.

Centroids: each mask is cut into non-overlapping tile x tile tiles (the configured size; partial tiles skipped, as
the original does); for every class present in a tile, the mean position of its pixels, moved to the nearest pixel
of that class when the mean falls outside it (a ring or two blobs), so a crop around it always shows the class.
They are computed in parallel processes and cached in a JSON file whose name carries a hash of the dataset, split,
tile size, class count and every mask's path, size and modification time: any change gives a new file.

Each epoch has n items (n = main images): `int(n * pct / K')` class-centred samples for each of the K' classes that
have centroids, and random images for the rest.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from .base import draw_cycled

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hmsa", "centroids")


def tile_centroids(mask: np.ndarray, num_classes: int, tile: int) -> list[tuple[int, int, int]]:
    """(class, x, y) for every class 0..K-1 present in every full tile of a train-id mask."""
    if tile < 1:
        raise ValueError(f"tile size must be positive, got {tile}")
    out = []
    h, w = mask.shape
    ys, xs = np.mgrid[0:tile, 0:tile]
    xs, ys = xs.ravel().astype(np.float64), ys.ravel().astype(np.float64)
    for ty in range(h // tile):
        for tx in range(w // tile):
            patch = mask[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
            flat = np.minimum(patch.ravel(), num_classes).astype(np.intp)  # bin K collects ignore and the rest
            count = np.bincount(flat, minlength=num_classes + 1)
            sum_x = np.bincount(flat, weights=xs, minlength=num_classes + 1)
            sum_y = np.bincount(flat, weights=ys, minlength=num_classes + 1)
            for c in np.nonzero(count[:num_classes])[0]:
                cx, cy = int(sum_x[c] / count[c]), int(sum_y[c] / count[c])
                if patch[cy, cx] != c:
                    py, px = np.nonzero(patch == c)
                    j = int(np.argmin((px - cx) ** 2 + (py - cy) ** 2))
                    cx, cy = int(px[j]), int(py[j])
                out.append((int(c), cx + tx * tile, cy + ty * tile))
    return out


_DATASET = None  # the dataset inherited by forked centroid workers


def _init_worker(dataset) -> None:
    global _DATASET
    _DATASET = dataset


def _image_centroids(job: tuple[int, int, int]) -> tuple[int, list[tuple[int, int, int]]]:
    index, num_classes, tile = job
    return index, tile_centroids(_DATASET.centroid_mask(index), num_classes, tile)


class _Progress:
    """A one-line progress bar on stderr (the centroid build takes minutes on Cityscapes)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start, self.last = total, label, 0, time.time(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last > 0.5 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            bar = "#" * int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:.1f} img/s eta {eta:.0f}s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def compute_centroids(
    dataset, indices: Sequence[int], num_classes: int, tile: int, workers: int = 0, progress: bool = True
) -> dict[int, list[list[int]]]:
    """{class: [[image index, x, y], ...]} over `indices` of `dataset` (which must offer centroid_mask(index))."""
    jobs = [(int(i), num_classes, tile) for i in indices]
    result: dict[int, list[list[int]]] = {c: [] for c in range(num_classes)}
    bar = _Progress(len(jobs), f"centroids (tile {tile})") if progress and jobs else None
    workers = min(workers if workers > 0 else (os.cpu_count() or 1), max(len(jobs) // 8, 1))
    if workers <= 1:
        _init_worker(dataset)
        pairs = map(_image_centroids, jobs)
        pool = None
    else:
        # fork: workers inherit the dataset; they only decode PNGs and run numpy (no OpenCV thread pool use).
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_init_worker, initargs=(dataset,))
        pairs = pool.map(_image_centroids, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
    try:
        for index, found in pairs:
            for c, x, y in found:
                result[c].append([index, x, y])
            if bar:
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown()
    return result


def cache_key(name: str, mask_paths: Sequence[str], num_classes: int, tile: int, extra: str = "") -> str:
    """A hash of everything the centroids depend on: dataset/split name, class count, tile, label handling
    (`extra`), and each mask file's path, size and modification time."""
    h = hashlib.sha1(f"{name}|{num_classes}|{tile}|{extra}".encode())
    for p in mask_paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_or_compute(
    dataset, indices: Sequence[int], num_classes: int, tile: int, name: str, cache_dir: str = "",
    extra: str = "", workers: int = 0,
) -> tuple[dict[int, list[list[int]]], str]:
    """Centroids of `indices` from the cache (built first when absent or stale); returns (centroids, cache file).

    One process builds while the others wait on a file lock, then read; no process group is needed.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    paths = [dataset.samples[i].mask for i in indices]
    key = cache_key(name, paths, num_classes, tile, extra)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    path = os.path.join(cache_dir, f"{safe}_tile{tile}_{key}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(path):
                with open(path) as f:
                    data = json.load(f)
                if data.get("key") == key and data.get("num_images") == len(paths):
                    return {int(c): v for c, v in data["centroids"].items()}, path
            start = time.time()
            centroids = compute_centroids(dataset, indices, num_classes, tile, workers)
            log.info("centroids of %d images (tile %d) in %.1fs -> %s", len(paths), tile, time.time() - start, path)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"key": key, "name": name, "tile": tile, "num_images": len(paths),
                           "centroids": {str(c): v for c, v in centroids.items()}}, f)
            os.replace(tmp, path)
            return centroids, path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ClassUniform:
    """Per-epoch mix of random images and class-centred samples.

    `centroids[c]` holds [image index, x, y] rows; indices >= `num_main` belong to extra images (coarse data),
    used only while the caller says they are active.
    """

    def __init__(self, centroids: dict[int, list[list[int]]], num_classes: int, pct: float, num_main: int):
        if not 0 < pct <= 1:
            raise ValueError(f"class-uniform fraction must be in (0, 1], got {pct}")
        self.num_classes, self.pct, self.num_main = num_classes, pct, num_main
        self.centroids = {c: np.asarray(centroids.get(c, []), np.int64).reshape(-1, 3) for c in range(num_classes)}

    def __repr__(self) -> str:
        sizes = {c: len(v) for c, v in self.centroids.items()}
        return f"ClassUniform(pct={self.pct}, centroids per class={sizes})"

    def pool(self, c: int, include_extra: bool) -> np.ndarray:
        rows = self.centroids[c]
        return rows if include_extra else rows[rows[:, 0] < self.num_main]

    def build_epoch(self, rng: np.random.Generator, include_extra: bool) -> list[tuple[int, tuple[int, int] | None]]:
        pools = [self.pool(c, include_extra) for c in range(self.num_classes)]
        present = [rows for rows in pools if len(rows)]
        # The class-centred share is split between the classes that have centroids (the original divides by
        # all K and lets the epoch shrink when a class has none); random images fill the rest.
        per_class = int(self.num_main * self.pct / max(len(present), 1))
        n_random = self.num_main - per_class * len(present)
        items: list[tuple[int, tuple[int, int] | None]] = [(int(i), None) for i in draw_cycled(rng, self.num_main, n_random)]
        for rows in present:
            for j in draw_cycled(rng, len(rows), per_class):
                items.append((int(rows[j, 0]), (int(rows[j, 1]), int(rows[j, 2]))))
        return [items[i] for i in rng.permutation(len(items))]
