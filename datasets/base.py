"""What every dataset shares: errors, image/mask reading, the id -> train-id table and the generic Dataset.

A dataset is a list of (image path, mask path or None, name) plus class metadata. Reading is OpenCV (RGB uint8
images, uint8/uint16 masks); the label table turns raw ids into train ids and rejects values it does not know.
Randomness comes from the index: the training sampler yields `SampleRef(index, seed, centroid)` so that every
sample's augmentation is a pure function of (run seed, epoch, position), whatever the number of workers.
"""
from __future__ import annotations

import io
import logging
import os
import struct
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

OPENCV_LIMIT_VARIABLE = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV refuses images with more pixels (default 2**30)
_DECODE_FLAGS = {"image": cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, "mask": cv2.IMREAD_UNCHANGED}


def not_a_file(path: str, kind: str) -> str | None:
    """Why `path` cannot hold an image or mask (`kind`): a folder, a broken symbolic link, nothing; None for a file."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return f"{kind} path is a folder, not a file: {path} (move the folder away)"
    if os.path.islink(path):
        return f"{kind} file is a broken symbolic link: {path} -> {os.readlink(path)} (restore its target or remove it)"
    return f"{kind} file not found: {path}"


def check_listed(samples: Sequence["Sample"], description: str) -> None:
    """Raise DataError when a listed image or mask is not a file (a folder named like one, a broken symbolic link):
    found when the dataset is listed, not when training reaches it."""
    bad = [why for s in samples for path, kind in ((s.image, "image"), (s.mask, "mask"))
           if path is not None and (why := not_a_file(path, kind)) is not None]
    if bad:
        more = f"; ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{description}: {len(bad)} listed file(s) cannot be read: " + "; ".join(bad[:5]) + more)


def _read_bytes(path: str, kind: str) -> bytes:
    """The encoded bytes of `path`; DataError when it is missing, not a file or not readable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError as e:  # an error of the file's permissions, not of its content
        raise DataError(f"cannot read {path}: {e.strerror} (check the permissions of the file and its folders)") from e
    except OSError as e:
        raise DataError(not_a_file(path, kind) or f"cannot read {path}: {e.strerror}") from e


def _png_header(data: bytes) -> tuple[tuple[int, int] | None, bool]:
    """((width, height) from IHDR or None, whether the IEND chunk is reached), walking the chunks."""
    size, pos = None, 8
    while pos + 8 <= len(data):
        length, chunk = struct.unpack_from(">I4s", data, pos)
        if chunk == b"IHDR" and pos + 16 <= len(data):
            size = struct.unpack_from(">II", data, pos + 8)
        elif chunk == b"IEND":
            return size, True
        pos += 12 + length
    return size, False


_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (the three taken out are not)


def _jpeg_header(data: bytes) -> tuple[tuple[int, int] | None, bool]:
    """((width, height) from the frame header or None, whether the end-of-image marker follows the first scan)."""
    size, pos = None, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return size, True  # no marker where one belongs: corrupt rather than cut short, the decoder judges
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        if marker == 0xDA:  # the scan's data stuffs every 0xFF with 0x00: its only 0xFFD9 is the end marker
            return size, data.find(b"\xff\xd9", pos + 2 + length) >= 0
        pos += 2 + length  # APPn segments (EXIF thumbnails with their own end marker included) are skipped
    return size, False


def _header(data: bytes) -> tuple[str, tuple[int, int] | None, bool]:
    """(format, declared (width, height), whether the file reaches its end marker) of a PNG or JPEG; other formats
    give ("", None, True): their decoder alone judges them."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("PNG", *_png_header(data))
    if data.startswith(b"\xff\xd8"):
        return ("JPEG", *_jpeg_header(data))
    return "", None, True


def _too_large(size: tuple[int, int] | None) -> str:
    """Why OpenCV refused an image over its pixel limit, and how to raise that limit."""
    limit = os.environ.get(OPENCV_LIMIT_VARIABLE) or f"{1 << 30} (its default)"
    if size is None:
        return f"more pixels than OpenCV's limit of {limit}; raise it with the environment variable " \
               f"{OPENCV_LIMIT_VARIABLE}=<pixels>"
    pixels = size[0] * size[1]
    return f"{size[0]}x{size[1]} = {pixels} pixels, more than OpenCV's limit of {limit}; raise it with the " \
           f"environment variable {OPENCV_LIMIT_VARIABLE}={pixels}"


def _encoded(path: str, kind: str) -> tuple[bytes, tuple[int, int] | None]:
    """The bytes of `path` and its declared (width, height) if known; DataError when the file is not readable or
    is truncated (OpenCV would fill a JPEG's missing rows with grey and say nothing)."""
    data = _read_bytes(path, kind)
    fmt, size, complete = _header(data)
    if not complete:
        raise DataError(f"cannot decode {kind} (truncated file: its {fmt} data ends early; re-copy it): {path}")
    return data, size


def _cv_decode(data: bytes, size: tuple[int, int] | None, path: str, kind: str) -> np.ndarray:
    try:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS[kind])
    except cv2.error as e:  # raised (not None returned) for an image over the pixel limit
        why = _too_large(size) if "CV_IO_MAX_IMAGE_PIXELS" in str(e) else "corrupt, truncated or not an image"
        raise DataError(f"cannot decode {kind} ({why}): {path}") from e
    if decoded is None:
        raise DataError(f"cannot decode {kind} (corrupt, truncated or not an image): {path}")
    return decoded


def _pil_decode(data: bytes, path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)
    except Image.DecompressionBombError as e:  # Pillow's own pixel limit (PIL.Image.MAX_IMAGE_PIXELS)
        raise DataError(f"cannot decode mask ({e}): {path}") from e
    except OSError as e:
        raise DataError(f"cannot decode mask (corrupt, truncated or not an image): {path}: {e}") from e


def read_image(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] as stored, the pixels Pillow decodes: an EXIF orientation tag is not applied (OpenCV
    would rotate the image away from its label mask). Raises DataError naming the path when the file is missing,
    unreadable, truncated, over OpenCV's pixel limit or not an image."""
    data, size = _encoded(path, "image")
    return cv2.cvtColor(_cv_decode(data, size, path, "image"), cv2.COLOR_BGR2RGB)


def read_mask(path: str, palette: bool = False) -> np.ndarray:
    """Label mask [H, W] uint8/uint16 as stored (palette PNGs give their indices, not their colours).

    `palette=True` reads with PIL directly (datasets whose masks are all palette PNGs, e.g. Mapillary).
    """
    data, size = _encoded(path, "mask")
    mask = _pil_decode(data, path) if palette else _cv_decode(data, size, path, "mask")
    if mask.ndim == 3 and not palette:
        mask = _pil_decode(data, path)  # OpenCV expands palette PNGs to colour; PIL keeps their indices
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
        """The item of a SampleRef (training) or a plain index (evaluation, or a foreign sampler: augmentation
        seeded from torch's RNG, which DataLoader seeds differently in every worker).

        With skip_bad, an unreadable sample is logged and then, in training, replaced by the next readable one (a
        batch keeps its size); in evaluation it is left out: its item has `skipped=True` (evaluate drops it) with
        a readable sample's pixels standing in, so that it still collates with the others of its batch. Every
        item of an evaluation with skip_bad has the key `skipped`.
        """
        training = isinstance(ref, SampleRef)
        if not training:
            ref = SampleRef(int(ref), int(torch.randint(0, 2**62, ())), None)
        index, centroid = ref.index, ref.centroid
        tries = min(len(self), 16) if training else len(self)
        for attempt in range(tries):
            try:
                image, mask = self.load(index)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                if attempt == 0:  # a stand-in that fails too is logged when its own turn comes
                    log.warning("skipping unreadable sample %d: %s%s", index, e,
                                "" if training else " (left out of the evaluation)")
                index, centroid = (index + 1) % len(self), None
        else:
            raise DataError(f"{self!r}: {tries} consecutive unreadable samples from index {ref.index}")
        rng = np.random.default_rng(ref.seed)
        image_t, mask_t = self.transform(image, mask, rng, centroid)
        item = {"image": image_t, "name": self.samples[index if training else ref.index].name}
        if mask_t is not None:
            item["mask"] = mask_t
        if self.skip_bad and not training:
            item["skipped"] = index != ref.index
        return item
