"""What every dataset shares: errors, image/mask reading, the id -> train-id table and the generic Dataset.

A dataset is a list of (image path, mask path or None, name) plus class metadata. Reading is OpenCV (RGB uint8
images, uint8/uint16 masks); the label table turns raw ids into train ids and rejects values it does not know.
Randomness comes from the index: the training sampler yields `SampleRef(index, seed, centroid)` so that every
sample's augmentation is a pure function of (run seed, epoch, position), whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .uniform import ClassUniform, draw_cycled, load_or_compute

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class DataError(ValueError):
    """Bad dataset content: unreadable file, wrong mask size, unknown label values, image without mask..."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset folder or split is missing or empty; the message names it and the layout expected.
    A DataError too, so that one `except DataError` catches every expected data failure."""


# ----------------------------------------------------------------------------------------------- reading


def read_image(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] as stored, the pixels Pillow decodes: an EXIF orientation tag is not applied (OpenCV
    would rotate the image away from its label mask). Raises DataError naming the path when the file is missing,
    truncated or not an image."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"cannot decode image (corrupt, truncated or not an image): {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_pil(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as e:
        raise DataError(f"cannot decode mask (corrupt, truncated or not an image): {path}: {e}") from e


def read_mask(path: str, palette: bool = False) -> np.ndarray:
    """Label mask [H, W] uint8/uint16 as stored (palette PNGs give their indices, not their colours).

    `palette=True` reads with PIL directly (datasets whose masks are all palette PNGs, e.g. Mapillary).
    """
    if not os.path.isfile(path):
        raise DataError(f"mask file not found: {path}")
    mask = _read_pil(path) if palette else cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"cannot decode mask (corrupt, truncated or not an image): {path}")
    if mask.ndim == 3 and not palette:
        mask = _read_pil(path)  # OpenCV expands palette PNGs to colour; PIL keeps their indices
    if mask.ndim != 2:
        raise DataError(
            f"mask must be single-channel label ids, got {mask.shape[2]} channels: {path} "
            "(colour-coded masks can be converted with scripts/prepare_color_masks.py)"
        )
    if mask.dtype not in (np.uint8, np.uint16):
        raise DataError(f"mask must be 8- or 16-bit integers, got {mask.dtype}: {path}")
    return mask


# ----------------------------------------------------------------------------------------------- label table


class LabelMap:
    """Raw label id -> train id through a lookup table; ids outside the table are an error, not silent ignore."""

    def __init__(self, id_to_train: dict[int, int], name: str = "dataset"):
        if not id_to_train:
            raise ValueError(f"{name}: empty label table")
        bad = {k: v for k, v in id_to_train.items() if not (0 <= k < 65536 and 0 <= v < 256)}
        if bad:
            raise ValueError(f"{name}: label table entries out of range (ids 0..65535, train ids 0..255): {bad}")
        self.id_to_train = dict(id_to_train)
        self.name = name
        self._luts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def identity(cls, num_ids: int, ignore_index: int, name: str = "dataset") -> "LabelMap":
        """Masks already hold train ids 0..num_ids-1 (and the ignore value)."""
        table = {i: i for i in range(num_ids)}
        table[ignore_index] = ignore_index
        return cls(table, name)

    def _lut(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._luts:
            lut = np.zeros(size, np.uint8)
            valid = np.zeros(size, bool)
            for k, v in self.id_to_train.items():
                if k < size:
                    lut[k] = v
                    valid[k] = True
            self._luts[size] = (lut, valid)
        return self._luts[size]

    def __call__(self, mask: np.ndarray, path: str = "<array>") -> np.ndarray:
        """Train-id mask (uint8). Raises DataError naming `path` and the unknown values."""
        lut, valid = self._lut(256 if mask.dtype == np.uint8 else 65536)
        if mask.dtype == np.uint8:  # OpenCV's table lookup is ~3x faster than numpy indexing
            mapped = cv2.LUT(mask, lut)
            if cv2.countNonZero(cv2.LUT(mask, valid.view(np.uint8))) == mask.size:
                return mapped
        else:
            mapped = lut[mask]
            if valid[mask].all():
                return mapped
        values = np.unique(mask[~valid[mask]])
        shown = ", ".join(str(v) for v in values[:20]) + (" ..." if len(values) > 20 else "")
        known = sorted(self.id_to_train)
        raise DataError(
            f"{path}: label values not in the {self.name} label table: {shown} "
            f"(known ids: {known[0]}..{known[-1]}, {len(known)} values)"
        )


# ----------------------------------------------------------------------------------------------- dataset


class SampleRef(NamedTuple):
    """What a training sampler yields: which image, the seed of its augmentation, an optional (x, y) centroid."""

    index: int
    seed: int
    centroid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Sample:
    image: str
    mask: str | None
    name: str


@dataclass(frozen=True)
class ClassInfo:
    """Class metadata of a dataset (train ids 0..K-1)."""

    names: tuple[str, ...]
    palette: np.ndarray  # uint8 [K, 3]
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.names)


Transform = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class SegmentationDataset(Dataset):
    """Image/mask pairs -> {'image': float32 [3,H,W], 'mask': int64 [H,W], 'name': str} (no 'mask' if unlabelled)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: ClassInfo,
        label_map: LabelMap | None,
        transform: Transform,
        skip_bad: bool = False,
        description: str = "",
    ):
        self.samples = list(samples)
        self.classes = classes
        self.label_map = label_map
        self.transform = transform
        self.skip_bad = skip_bad  # drop (data.verify) or replace (while loading) unreadable samples, not stop
        self.description = description
        self.num_classes = classes.num_classes
        self.ignore_index = classes.ignore_index
        self.class_names = list(classes.names)
        self.palette = classes.palette
        self.palette_masks = False  # masks are palette PNGs holding indices: read them with PIL directly
        self.num_main = len(self.samples)  # samples past this (coarse data) are used only while extra_active()
        self.uniform = None  # datasets.uniform.ClassUniform when class-uniform sampling is on
        # The list as found on disk (None while nothing is dropped) and its dropped entries, listing index -> why:
        # what datasets.agree compares between ranks, since each rank drops the files it cannot read.
        self.listing: list[Sample] | None = None
        self.dropped: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description or ''} {len(self)} images, {self.num_classes} classes)"

    @property
    def has_labels(self) -> bool:
        return all(s.mask is not None for s in self.samples)

    # Epoch composition, called by datasets.sampler.TrainSampler with a generator shared by all ranks.

    def extra_active(self, epoch: int) -> bool:
        """Whether the extra samples (index >= num_main) take part in `epoch`."""
        return False

    def epoch_length(self, epoch: int) -> int:
        """Samples in `epoch`. Without class-uniform sampling: all samples in every epoch (once the extra samples
        are switched off the main ones fill the epoch, whole shuffled passes first). Class-uniform epochs (extra
        data enters through centroids) have the size ClassUniform.epoch_size gives: num_main with
        data.class_uniform.share=present_classes; with all_classes (the original) num_main less per_class for each
        class without centroids, which changes between epochs only when switching the extra samples off leaves
        a class without centroids."""
        if self.uniform is not None:
            return self.uniform.epoch_size(include_extra=self.extra_active(epoch))
        return len(self.samples)

    def epoch_items(self, epoch: int, rng: np.random.Generator) -> list[tuple[int, tuple[int, int] | None]]:
        """(index, centroid or None) of every sample of `epoch`, in order."""
        if self.uniform is not None:
            return self.uniform.build_epoch(rng, include_extra=self.extra_active(epoch))
        pool = len(self.samples) if self.extra_active(epoch) else self.num_main
        return [(int(i), None) for i in draw_cycled(rng, pool, self.epoch_length(epoch))]

    def enable_class_uniform(self, pct: float, tile: int, cache_dir: str = "", workers: int = 0, snap: bool = False,
                             share: str = "all_classes") -> None:
        """Turn on class-uniform sampling with centroids of every main image (cached; built when absent/stale).
        `snap` and `share` are data.class_uniform.snap and data.class_uniform.share (datasets/uniform.py)."""

        centroids, _ = load_or_compute(self, range(self.num_main), self.num_classes, tile, self.description,
                                       cache_dir, workers=workers, snap=snap)
        self.uniform = ClassUniform(centroids, self.num_classes, pct, self.num_main, share)

    def listed(self) -> list[Sample]:
        """The samples as listed, before any was dropped."""
        return self.samples if self.listing is None else self.listing

    def listing_indices(self) -> list[int]:
        """The listing index of each current sample."""
        return [i for i in range(len(self.listed())) if i not in self.dropped]

    def drop_samples(self, problems: dict[int, str]) -> None:
        """Remove samples (current index -> why) from the list, and from everything indexed by it: num_main,
        the class-uniform centroids, the autolabel table. Indices after a dropped sample move down."""
        if not problems:
            return
        origin = self.listing_indices()
        if self.listing is None:
            self.listing = list(self.samples)
        for index, why in problems.items():
            self.dropped[origin[index]] = why
        new_index = np.full(len(self.samples), -1, np.int64)  # old index -> new one (-1: dropped)
        keep = [i for i in range(len(self.samples)) if i not in problems]
        new_index[keep] = np.arange(len(keep))
        self.samples = [self.samples[i] for i in keep]
        self.num_main = int(np.count_nonzero(new_index[: self.num_main] >= 0))
        # CoarseDataset's autolabel files (datasets/cityscapes.py) are keyed by sample index too.
        autolabel = getattr(self, "autolabel", None)
        if autolabel:
            self.autolabel = {int(new_index[i]): v for i, v in autolabel.items() if new_index[i] >= 0}
        if self.uniform is not None:
            self.uniform = self.uniform.reindexed(new_index, self.num_main)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw RGB image and train-id mask (uint8, or None when unlabelled), before any transform."""
        s = self.samples[index]
        image = read_image(s.image)
        if s.mask is None:
            return image, None
        mask = self.load_mask(index)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]} (WxH): {s.mask} (image {s.image})"
            )
        return image, mask

    def load_mask(self, index: int) -> np.ndarray:
        """Train-id mask of sample `index` (subclasses add coarse/autolabel handling here)."""
        path = self.samples[index].mask
        assert path is not None
        raw = read_mask(path, palette=self.palette_masks)
        return self.label_map(raw, path) if self.label_map is not None else raw

    def centroid_mask(self, index: int) -> np.ndarray:
        """Train-id mask the class-uniform centroids of sample `index` come from (the training mask, unless a
        subclass builds its masks otherwise for centroids, as Cityscapes autolabels do)."""
        return self.load_mask(index)

    def __getitem__(self, ref: int | SampleRef) -> dict:
        if not isinstance(ref, SampleRef):
            # Plain integer access (evaluation, or a foreign sampler): augmentation seeded from torch's RNG,
            # which DataLoader seeds differently in every worker.
            ref = SampleRef(int(ref), int(torch.randint(0, 2**62, ())), None)
        index, centroid = ref.index, ref.centroid
        for _ in range(min(len(self), 16)):
            try:
                image, mask = self.load(index)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping unreadable sample %d: %s", index, e)
                index, centroid = (index + 1) % len(self), None  # the next sample stands in
        else:
            raise DataError(f"{self!r}: {min(len(self), 16)} consecutive unreadable samples from index {ref.index}")
        rng = np.random.default_rng(ref.seed)
        image_t, mask_t = self.transform(image, mask, rng, centroid)
        item = {"image": image_t, "name": self.samples[index].name}
        if mask_t is not None:
            item["mask"] = mask_t
        return item
