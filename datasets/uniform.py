"""Class-uniform sampling with a centroid cache that cannot go stale.

Centroids: each mask is cut into non-overlapping tile x tile tiles (the configured size; partial tiles and images
smaller than a tile give none, as in the original). For every class present in a tile the point recorded is the
mean position of its pixels, each coordinate truncated to an integer: the original's
`int(scipy.ndimage.center_of_mass(patch == c))`, even where that point is not a pixel of the class (a ring, two
blobs). With `snap` (data.class_uniform.snap) such a point moves to the nearest pixel of the class, so that a crop around
it always shows the class. Centroids are computed in parallel processes and cached in a JSON file whose name carries
a hash of the dataset, split, tile size, class count, centroid mode and every mask's path, size and modification
time: any change gives a new file.

Each epoch, with n main images and K classes (data.class_uniform.share):
  all_classes (the original): per_class = int(n * pct / K) class-centred samples for each class that has
    centroids, and n - per_class * K random images; the epoch is shorter than n when a class has no centroids.
  present_classes: the same with K the number of classes that have centroids, so every epoch has n samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from utils.files import atomic_write_text, file_lock
from utils.log import Progress


log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hmsa", "centroids")


def tile_centroids(mask: np.ndarray, num_classes: int, tile: int, snap: bool = False) -> list[tuple[int, int, int]]:
    """(class, x, y) for every class 0..K-1 present in every full tile of a train-id mask (tile-major order).

    (x, y) is the truncated mean position of the class's pixels in the tile, the original's
    `int(center_of_mass(patch == c))`; with `snap`, the nearest pixel of the class when that point is not one.
    """
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
            # Sums of integer coordinates stay below 2**53 (tile**3), so they are exact whatever the summation
            # order, and one float division then gives the very value center_of_mass returns: same truncation.
            sum_x = np.bincount(flat, weights=xs, minlength=num_classes + 1)
            sum_y = np.bincount(flat, weights=ys, minlength=num_classes + 1)
            for c in np.nonzero(count[:num_classes])[0]:
                cx, cy = int(sum_x[c] / count[c]), int(sum_y[c] / count[c])
                if snap and patch[cy, cx] != c:
                    py, px = np.nonzero(patch == c)
                    j = int(np.argmin((px - cx) ** 2 + (py - cy) ** 2))
                    cx, cy = int(px[j]), int(py[j])
                out.append((int(c), cx + tx * tile, cy + ty * tile))
    return out


_DATASET = None  # the dataset inherited by forked centroid workers


def _init_worker(dataset) -> None:
    global _DATASET
    _DATASET = dataset


def _image_centroids(job: tuple[int, int, int, bool]) -> tuple[int, list[tuple[int, int, int]]]:
    index, num_classes, tile, snap = job
    return index, tile_centroids(_DATASET.centroid_mask(index), num_classes, tile, snap)


def compute_centroids(
    dataset, indices: Sequence[int], num_classes: int, tile: int, workers: int = 0, progress: bool = True,
    snap: bool = False,
) -> dict[int, list[list[int]]]:
    """{class: [[image index, x, y], ...]} over `indices` of `dataset` (which must offer centroid_mask(index))."""
    jobs = [(int(i), num_classes, tile, snap) for i in indices]
    result: dict[int, list[list[int]]] = {c: [] for c in range(num_classes)}
    bar = Progress(len(jobs), unit="images", label=f"centroids (tile {tile})") if progress and jobs else None
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
        for done, (index, found) in enumerate(pairs, 1):
            for c, x, y in found:
                result[c].append([index, x, y])
            if bar:
                bar.update(done, final=done == len(jobs))
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
    extra: str = "", workers: int = 0, snap: bool = False,
) -> tuple[dict[int, list[list[int]]], str]:
    """Centroids of `indices` from the cache (built first when absent or stale); returns (centroids, cache file).

    The centroid mode (`snap`) is part of the key and of the file name: the two modes never share a file.
    One process builds while the others wait on a file lock, then read; no process group is needed.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    paths = [dataset.samples[i].mask for i in indices]
    mode = "snap" if snap else "mean"
    key = cache_key(name, paths, num_classes, tile, f"centroids={mode}|{extra}")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    path = os.path.join(cache_dir, f"{safe}_tile{tile}_{mode}_{key}.json")
    with file_lock(path + ".lock"):
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            if data.get("key") == key and data.get("num_images") == len(paths):
                return {int(c): v for c, v in data["centroids"].items()}, path
        start = time.time()
        centroids = compute_centroids(dataset, indices, num_classes, tile, workers, snap=snap)
        log.info("centroids (%s) of %d images (tile %d) in %.1fs -> %s", mode, len(paths), tile,
                 time.time() - start, path)
        atomic_write_text(path, json.dumps({"key": key, "name": name, "tile": tile, "centroids_mode": mode,
                                            "num_images": len(paths),
                                            "centroids": {str(c): v for c, v in centroids.items()}}))
        return centroids, path


SHARES = ("all_classes", "present_classes")


def draw_cycled(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k indices of range(n): whole shuffled passes, then part of one more (every item before any repeats)."""
    if n == 0 or k == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([rng.permutation(n) for _ in range(-(-k // n))])[:k]


class ClassUniform:
    """Per-epoch mix of random images and class-centred samples.

    `centroids[c]` holds [image index, x, y] rows; indices >= `num_main` belong to extra images (coarse data),
    used only while the caller says they are active. `share` divides the class-centred part of an epoch between
    all K classes (all_classes, the original) or between the classes that have centroids (present_classes).
    """

    def __init__(self, centroids: dict[int, list[list[int]]], num_classes: int, pct: float, num_main: int,
                 share: str = "all_classes"):
        if not 0 < pct <= 1:
            raise ValueError(f"class-uniform fraction must be in (0, 1], got {pct}")
        if share not in SHARES:
            raise ValueError(f"data.class_uniform.share must be one of {', '.join(SHARES)}, got {share!r}")
        self.num_classes, self.pct, self.num_main, self.share = num_classes, pct, num_main, share
        self.centroids = {c: np.asarray(centroids.get(c, []), np.int64).reshape(-1, 3) for c in range(num_classes)}
        empty = [c for c, rows in self.centroids.items() if not len(rows)]
        if empty:
            log.info("class-uniform sampling: no centroids for class(es) %s; %d samples per epoch", empty,
                     self.epoch_size(include_extra=True))
        with_extra, without = self.epoch_size(include_extra=True), self.epoch_size(include_extra=False)
        if with_extra != without:
            only_extra = [c for c in range(num_classes) if len(self.centroids[c]) and not len(self.pool(c, False))]
            log.warning("class-uniform epochs have %d samples while the extra (coarse) images take part and %d "
                        "after (class(es) %s have centroids in them only; data.class_uniform.share=present_classes "
                        "keeps %d)", with_extra, without, only_extra, num_main)

    def __repr__(self) -> str:
        sizes = {c: len(v) for c, v in self.centroids.items()}
        return f"ClassUniform(pct={self.pct}, share={self.share}, centroids per class={sizes})"

    def reindexed(self, new_index: np.ndarray, num_main: int) -> "ClassUniform":
        """The same sampling after images were dropped from the dataset: `new_index[old image index]` is the new
        index, -1 for a dropped image, whose centroids go."""
        centroids = {}
        for c, rows in self.centroids.items():
            moved = new_index[rows[:, 0]]
            kept = rows[moved >= 0].copy()
            kept[:, 0] = moved[moved >= 0]
            centroids[c] = kept.tolist()
        return ClassUniform(centroids, self.num_classes, self.pct, num_main, self.share)

    def pool(self, c: int, include_extra: bool) -> np.ndarray:
        rows = self.centroids[c]
        return rows if include_extra else rows[rows[:, 0] < self.num_main]

    def _plan(self, include_extra: bool) -> tuple[list[np.ndarray], int, int]:
        """(centroid rows of each class that has some, samples per such class, random samples)."""
        present = [rows for rows in (self.pool(c, include_extra) for c in range(self.num_classes)) if len(rows)]
        shares = self.num_classes if self.share == "all_classes" else len(present)
        per_class = int(self.num_main * self.pct / max(shares, 1))  # the original's int(n * pct / K)
        return present, per_class, self.num_main - per_class * shares

    def epoch_size(self, include_extra: bool) -> int:
        """Samples in an epoch: num_main, less per_class for each class without centroids under all_classes.
        It depends on which classes have centroids only, not on the random draws."""
        present, per_class, n_random = self._plan(include_extra)
        return n_random + per_class * len(present)

    def build_epoch(self, rng: np.random.Generator, include_extra: bool) -> list[tuple[int, tuple[int, int] | None]]:
        """n_random distinct random main images, then per_class draws from each class's centroid list (whole
        shuffled passes over the list before any repeats: the same multiset law as the original's shuffle-once,
        wrap-around sampling), all in random order."""
        present, per_class, n_random = self._plan(include_extra)
        items: list[tuple[int, tuple[int, int] | None]] = [
            (int(i), None) for i in draw_cycled(rng, self.num_main, n_random)
        ]
        for rows in present:
            for j in draw_cycled(rng, len(rows), per_class):
                items.append((int(rows[j, 0]), (int(rows[j, 1]), int(rows[j, 2]))))
        return [items[i] for i in rng.permutation(len(items))]
