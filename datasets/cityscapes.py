"""Cityscapes: official and zip-named layouts, label id -> train id, cross-validation splits."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .base import (
    ClassInfo,
    DataError,
    DataNotFoundError,
    LabelMap,
    Sample,
    SegmentationDataset,
    Transform,
    check_listed,
    read_mask,
)
from .uniform import ClassUniform, load_or_compute

# (label id, train id, name) for the 19 evaluated classes; every other id 0..33 is ignored.
TRAIN_CLASSES = (
    (7, 0, "road"), (8, 1, "sidewalk"), (11, 2, "building"), (12, 3, "wall"), (13, 4, "fence"), (17, 5, "pole"),
    (19, 6, "traffic light"), (20, 7, "traffic sign"), (21, 8, "vegetation"), (22, 9, "terrain"), (23, 10, "sky"),
    (24, 11, "person"), (25, 12, "rider"), (26, 13, "car"), (27, 14, "truck"), (28, 15, "bus"), (31, 16, "train"),
    (32, 17, "motorcycle"), (33, 18, "bicycle"),
)
NUM_LABEL_IDS = 34  # ids 0..33 (license plate, id -1, is never written to labelIds PNGs)
IGNORE_INDEX = 255
PALETTE = np.array(
    [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
     (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
     (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    np.uint8,
)
CLASSES = ClassInfo(tuple(name for _, _, name in TRAIN_CLASSES), PALETTE, IGNORE_INDEX)
CV_SPLITS = 3

# (image folder, fine-label folder) relative to the root: the official layout, then the zip-named one.
LAYOUTS = (("leftImg8bit", "gtFine"), ("leftImg8bit_trainvaltest/leftImg8bit", "gtFine_trainvaltest/gtFine"))
LAYOUT_HELP = (
    "expected <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with "
    "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png, or the zip-named variant "
    "<root>/leftImg8bit_trainvaltest/leftImg8bit/... and <root>/gtFine_trainvaltest/gtFine/..."
)
IMAGE_SUFFIX = "_leftImg8bit.png"
FINE_SUFFIX = "_gtFine_labelIds.png"
COARSE_SUFFIX = "_gtCoarse_labelIds.png"
# (train_extra image folder, gtCoarse folder): the zip-named layout, then the flat one.
EXTRA_LAYOUTS = (("leftImg8bit_trainextra/leftImg8bit", "gtCoarse/gtCoarse"), ("leftImg8bit", "gtCoarse"))
EXTRA_HELP = (
    "expected <root>/leftImg8bit_trainextra/leftImg8bit/train_extra/<city>/<name>_leftImg8bit.png with "
    "<root>/gtCoarse/gtCoarse/train_extra/<city>/<name>_gtCoarse_labelIds.png (or leftImg8bit/train_extra and "
    "gtCoarse/train_extra)"
)
AUTOLABEL_HELP = (
    "expected <autolabel_dir>/train_extra/<city>/<name>_leftImg8bit.png with <name>_leftImg8bit_prob.png, or "
    "the flat <name>_leftImg8bit.png / <name>_leftImg8bit_prob.png that eval.py --autolabel writes"
)
# Autolabels are valid inside rows 15..840 and columns 14..2030 of a 1024x2048 frame (the rest shows the ego
# vehicle and the rectification border).
MASK_OUT_BOX = (15 / 1024, 840 / 1024, 14 / 2048, 2030 / 2048)
# How an autolabelled mask is assembled (CityscapesDataset.autolabel_mask): the original's order, or ours.
AUTOLABEL_ORDERS = ("original", "threshold_first")


def label_map() -> LabelMap:
    table = {i: IGNORE_INDEX for i in range(NUM_LABEL_IDS)}
    table.update({label_id: train_id for label_id, train_id, _ in TRAIN_CLASSES})
    return LabelMap(table, "Cityscapes")


def find_layout(root: str) -> tuple[str, str]:
    """(image folder, fine-label folder) of the layout present under `root`."""
    if not os.path.isdir(root):
        raise DataNotFoundError(f"Cityscapes folder not found: {root} ({LAYOUT_HELP})")
    for images, labels in LAYOUTS:
        if os.path.isdir(os.path.join(root, images)):
            return os.path.join(root, images), os.path.join(root, labels)
    raise DataNotFoundError(f"no Cityscapes image folder under {root}: {LAYOUT_HELP}")


def _cities(image_root: str, split: str) -> list[str]:
    folder = os.path.join(image_root, split)
    if not os.path.isdir(folder):
        raise DataNotFoundError(f"Cityscapes split folder not found: {folder} ({LAYOUT_HELP})")
    return sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)))


def cv_cities(image_root: str, split: str, cv: int) -> list[tuple[str, str]]:
    """(split folder, city) pairs of `split` ('train' or 'val') under cross-validation split `cv`.

    All cities = val cities + train cities (each sorted); split k takes as val the len(val) cities starting at
    k * n // 3, and the rest as train. cv 3 means train = val = all cities.
    """
    if cv not in range(CV_SPLITS + 1):
        raise ValueError(f"data.cv must be 0..{CV_SPLITS} (3 = train+val), got {cv}")
    if cv == 0:
        return [(split, c) for c in _cities(image_root, split)]
    val = [("val", c) for c in _cities(image_root, "val")]
    every = val + [("train", c) for c in _cities(image_root, "train")]
    if cv == CV_SPLITS:
        return every
    offset = cv * len(every) // CV_SPLITS
    chosen = every[offset : offset + len(val)]
    return chosen if split == "val" else [c for c in every if c not in chosen]


def pair_files(
    image_dir: str, label_dir: str | None, label_suffix: str = FINE_SUFFIX, city: str = ""
) -> list[Sample]:
    """Samples of one city folder: each X_leftImg8bit.png with its X<label_suffix> (unlabelled when label_dir is None).

    Raises DataError listing images without masks and masks without images.
    """
    images = sorted(f for f in os.listdir(image_dir) if f.endswith(IMAGE_SUFFIX))
    stems = [f[: -len(IMAGE_SUFFIX)] for f in images]
    if label_dir is None:
        return [Sample(os.path.join(image_dir, f), None, s) for f, s in zip(images, stems)]
    labels = set(os.listdir(label_dir)) if os.path.isdir(label_dir) else set()
    missing = [s + label_suffix for s in stems if s + label_suffix not in labels]
    extra = sorted(f for f in labels if f.endswith(label_suffix) and f[: -len(label_suffix)] not in set(stems))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) in {image_dir} without a mask in {label_dir}: "
                         + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if extra:
            parts.append(f"{len(extra)} mask(s) in {label_dir} without an image in {image_dir}: "
                         + ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
        raise DataError("; ".join(parts))
    return [Sample(os.path.join(image_dir, f), os.path.join(label_dir, s + label_suffix), s)
            for f, s in zip(images, stems)]


def autolabel_files(folder: str, city: str, stem: str) -> tuple[str, str] | None:
    """(mask, probability map) of one image's autolabel, in the original release's layout
    (train_extra/<city>/<stem>_leftImg8bit.png) or flat as eval.py --autolabel writes it (<stem>_leftImg8bit.png
    from a folder run, <stem>.png from a split run); None when absent."""
    for base in (os.path.join(folder, "train_extra", city, stem + "_leftImg8bit"),
                 os.path.join(folder, stem + "_leftImg8bit"), os.path.join(folder, stem)):
        if os.path.isfile(base + ".png") and os.path.isfile(base + "_prob.png"):
            return base + ".png", base + "_prob.png"
    return None


def find_extra_layout(root: str) -> tuple[str, str]:
    """(train_extra image folder, gtCoarse folder) under `root`."""
    for images, labels in EXTRA_LAYOUTS:
        folder = os.path.join(root, images, "train_extra")
        if os.path.isdir(folder):
            return folder, os.path.join(root, labels, "train_extra")
    raise DataNotFoundError(f"coarse data requested (data.coarse.boost_classes) but no train_extra images under "
                            f"{root}: {EXTRA_HELP}")


@dataclass(frozen=True)
class CoarseOptions:
    """How coarse (train_extra) data joins a training set (see docs/differences.md)."""

    boost_classes: tuple[int, ...] = ()  # train ids; empty: no coarse data
    autolabel_prob: float = 0.0  # > 0: autolabelled masks; pixels whose probability is below become ignore
    dropout_classes: tuple[int, ...] = ()  # train ids whose human gtCoarse pixels are added to the autolabels
    mask_out: bool = False  # autolabels: ego vehicle and borders become ignore
    autolabel_dir: str = "autolabelled"
    max_epoch: int = 150  # coarse data takes part in epochs < max_epoch only
    order: str = "original"  # one of AUTOLABEL_ORDERS

    def __post_init__(self) -> None:
        if self.order not in AUTOLABEL_ORDERS:
            raise ValueError(f"data.coarse.order must be one of {', '.join(AUTOLABEL_ORDERS)}, got {self.order!r}")


class CoarseDataset(SegmentationDataset):
    """A training set whose samples past `num_main` are coarse data (self.coarse): human coarse masks, or
    autolabels (self.autolabel: index -> (probability map, human coarse mask or None)) assembled by
    autolabel_mask. Subclasses set coarse, autolabel, centroid_name and coarse_centroid_name."""

    coarse: CoarseOptions
    autolabel: dict[int, tuple[str, str | None]]
    centroid_name: str
    coarse_centroid_name: str

    def extra_active(self, epoch: int) -> bool:
        return len(self.samples) > self.num_main and epoch < self.coarse.max_epoch

    def load_mask(self, index: int) -> np.ndarray:
        if index not in self.autolabel:
            return super().load_mask(index)
        return self.autolabel_mask(index, training=True)

    def centroid_mask(self, index: int) -> np.ndarray:
        if index in self.autolabel and self.coarse.order == "original":
            return self.autolabel_mask(index, training=False)
        return self.load_mask(index)

    def autolabel_mask(self, index: int, training: bool) -> np.ndarray:
        """Train-id mask of an autolabelled coarse image, for training or (training=False) for its centroids.

        original (the published runs): mask-out, then the id -> train-id mapping, during which the human
        gtCoarse pixels of each dropout class present in the autolabel are unioned in (ids are mapped in
        ascending order, so where the autolabel holds a higher id than the human label, the autolabel's class
        wins), then the probability threshold, which makes every low-confidence pixel ignore, the human ones
        included. The centroids come from the mapping and the union alone: no mask-out, no threshold.
        threshold_first: mask-out, mapping, threshold, then the human pixels of the dropout classes present
        on top, whatever the autolabel's confidence; the centroids come from that same training mask.
        """
        path = self.samples[index].mask
        raw = read_mask(path)
        if training and self.coarse.mask_out:
            h, w = raw.shape
            r0, r1, c0, c1 = MASK_OUT_BOX
            keep = np.zeros_like(raw)
            keep[round(r0 * h) : round(r1 * h), round(c0 * w) : round(c1 * w)] = 1
            raw = raw * keep  # id 0 (unlabelled) outside the box
        mask = self.label_map(raw, path)
        prob_path, human_path = self.autolabel[index]
        wanted: dict[int, list[int]] = {}  # dropout class -> its label ids present in the autolabel
        for c in self.coarse.dropout_classes:
            present = [k for k, v in self.label_map.id_to_train.items() if v == c and (raw == k).any()]
            if present:
                wanted[c] = present
        human_raw = human = None
        if wanted and human_path is not None:
            human_raw = read_mask(human_path)
            human = self.label_map(human_raw, human_path)
            if human.shape != mask.shape:
                raise DataError(f"gtCoarse mask size differs from its autolabel: {human_path}")
        original = self.coarse.order == "original"
        if original and human is not None:
            for c, present in wanted.items():
                for k in present:
                    mask[(human_raw == k) & (raw <= k)] = c
        if training:
            prob = read_mask(prob_path)
            if prob.shape != mask.shape:
                raise DataError(f"probability map size {prob.shape[::-1]} differs from its autolabel "
                                f"{mask.shape[::-1]} (WxH): {prob_path}")
            mask[prob / 255.0 < self.coarse.autolabel_prob] = self.ignore_index  # the original's arithmetic
        if not original and human is not None:
            for c in wanted:
                mask[human == c] = c
        return mask

    def enable_class_uniform(self, pct: float, tile: int, cache_dir: str = "", workers: int = 0, snap: bool = False,
                             share: str = "all_classes") -> None:
        """Turn on class-uniform sampling: centroids of every fine image, plus those of the boost classes in the
        coarse images (from the cache, built when absent or stale)."""

        fine, _ = load_or_compute(self, range(self.num_main), self.num_classes, tile,
                                  self.centroid_name, cache_dir, workers=workers, snap=snap)
        if len(self.samples) > self.num_main:
            c = self.coarse
            extra = (f"offset{self.num_main}|prob{c.autolabel_prob}|dropout{c.dropout_classes}|maskout{c.mask_out}"
                     f"|order{c.order}")
            coarse, _ = load_or_compute(self, range(self.num_main, len(self.samples)), self.num_classes, tile,
                                        self.coarse_centroid_name, cache_dir, extra, workers, snap)
            fine = {k: list(v) + (coarse[k] if k in c.boost_classes else []) for k, v in fine.items()}
        self.uniform = ClassUniform(fine, self.num_classes, pct, self.num_main, share)


class CityscapesDataset(CoarseDataset):
    """Cityscapes of one split; `split` is 'train', 'val', 'trainval' or 'test' (unlabelled).

    With `coarse.boost_classes`, train_extra images follow the fine ones (index >= num_main): with class-uniform
    sampling they contribute centroids of the boost classes only; without it they join every epoch's list. Either
    way only in epochs < coarse.max_epoch.
    """

    def __init__(
        self,
        root: str,
        split: str,
        transform: Transform,
        cv: int = 0,
        skip_bad: bool = False,
        coarse: CoarseOptions | None = None,
    ):
        image_root, label_root = find_layout(root)
        if split == "test":
            cities, labelled, searched = [("test", c) for c in _cities(image_root, "test")], False, ["test"]
        elif split == "trainval":
            cities, labelled, searched = cv_cities(image_root, "train", CV_SPLITS), True, ["train", "val"]
        elif split in ("train", "val"):
            cities, labelled = cv_cities(image_root, split, cv), True
            searched = [split] if cv == 0 else ["train", "val"]
        else:
            raise ValueError(f"Cityscapes split must be train, val, trainval or test, got {split!r}")
        samples: list[Sample] = []
        for folder, city in cities:
            label_dir = os.path.join(label_root, folder, city) if labelled else None
            samples += pair_files(os.path.join(image_root, folder, city), label_dir, FINE_SUFFIX, city)
        if not samples:
            where = " and ".join(os.path.join(image_root, f) for f in searched)
            raise DataNotFoundError(f"Cityscapes split {split!r} (cv {cv}) is empty: no *{IMAGE_SUFFIX} under "
                                    f"{where} ({LAYOUT_HELP})")
        num_fine = len(samples)
        self.coarse = coarse or CoarseOptions()
        self.autolabel: dict[int, tuple[str, str | None]] = {}  # index -> (probability map, human gtCoarse mask)
        if self.coarse.boost_classes:
            samples += self._coarse_samples(root, num_fine)
        if not skip_bad:  # with data.skip_bad they are skipped like any unreadable file
            check_listed(samples, f"cityscapes/{split}/cv{cv}")
        super().__init__(samples, CLASSES, label_map(), transform, skip_bad, f"cityscapes/{split}/cv{cv}")
        self.num_main = num_fine
        self.root, self.split, self.cv = root, split, cv
        self.cities = [c for _, c in cities]
        self.centroid_name, self.coarse_centroid_name = f"cityscapes_{split}_cv{cv}", "cityscapes_coarse"

    def _coarse_samples(self, root: str, first_index: int) -> list[Sample]:
        bad = [c for c in self.coarse.boost_classes + self.coarse.dropout_classes if not 0 <= c < len(TRAIN_CLASSES)]
        if bad:
            raise ValueError(f"coarse boost/dropout classes must be train ids 0..18, got {bad}")
        image_dir, coarse_dir = find_extra_layout(root)
        if self.coarse.autolabel_prob <= 0:
            out: list[Sample] = []
            for city in sorted(os.listdir(image_dir)):
                out += pair_files(os.path.join(image_dir, city), os.path.join(coarse_dir, city), COARSE_SUFFIX)
        else:
            out = self._autolabel_samples(root, image_dir, coarse_dir, first_index)
        if not out:
            raise DataNotFoundError(f"no train_extra images under {image_dir} ({EXTRA_HELP})")
        return out

    def _autolabel_samples(self, root: str, image_dir: str, coarse_dir: str, first_index: int) -> list[Sample]:
        auto = self.coarse.autolabel_dir
        auto = auto if os.path.isabs(auto) else os.path.join(root, auto)
        if not os.path.isdir(auto):
            raise DataNotFoundError(f"autolabelled masks requested (data.coarse.autolabel_threshold > 0) but {auto} does "
                                    f"not exist ({AUTOLABEL_HELP})")
        out: list[Sample] = []
        missing: list[str] = []
        for city in sorted(os.listdir(image_dir)):
            for sample in pair_files(os.path.join(image_dir, city), None):
                found = autolabel_files(auto, city, sample.name)
                if found is None:
                    missing.append(sample.name)
                    continue
                human = os.path.join(coarse_dir, city, sample.name + COARSE_SUFFIX)
                self.autolabel[first_index + len(out)] = (found[1], human if self.coarse.dropout_classes else None)
                out.append(Sample(sample.image, found[0], sample.name))
        if missing:
            raise DataError(f"{len(missing)} train_extra image(s) without an autolabel and its probability map in "
                            f"{auto}: {', '.join(missing[:10])} ({AUTOLABEL_HELP})")
        return out
