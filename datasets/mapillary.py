"""Mapillary Vistas: classes from config.json, palette-PNG labels, long-edge evaluation size.

    <root>/config.json
    <root>/{training,validation,testing}/images/<name>.jpg
    <root>/{training,validation}/labels/<name>.png      (palette PNG: the value is the label index)

Labels whose `evaluate` is true become train ids 0..K-1 in file order; every other label maps to ignore = K
(v1.2: 65 classes, 'Unlabeled' = 65 is ignore).
"""
from __future__ import annotations

import json
import os

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
)

SPLITS = {"train": "training", "val": "validation", "test": "testing"}
LAYOUT_HELP = ("expected <root>/config.json and <root>/{training,validation,testing}/images/*.jpg with "
               "<root>/{training,validation}/labels/*.png")


def read_config(path: str) -> tuple[ClassInfo, LabelMap]:
    """Classes and the label-index -> train-id table of a Mapillary config.json."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"Mapillary config.json not found: {path} ({LAYOUT_HELP})")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not labels:
        raise DataError(f"{path}: expected a non-empty 'labels' list")
    names, colors, evaluated = [], [], []
    for i, label in enumerate(labels):
        missing = [k for k in ("readable", "color", "evaluate") if not isinstance(label, dict) or k not in label]
        if missing:
            raise DataError(f"{path}: labels[{i}] lacks the field(s) {missing}")
        color = label["color"]
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                     for c in color)):
            raise DataError(f"{path}: labels[{i}].color must be three integers 0..255, got {color!r}")
        if label["evaluate"]:
            evaluated.append(i)
            names.append(str(label["readable"]).replace(" ", "_"))
            colors.append(color)
    if not evaluated:
        raise DataError(f"{path}: no label has 'evaluate': true")
    ignore = len(evaluated)
    table = {i: ignore for i in range(len(labels))}
    table.update({label_index: train_id for train_id, label_index in enumerate(evaluated)})
    return ClassInfo(tuple(names), np.asarray(colors, np.uint8), ignore), LabelMap(table, "Mapillary")


class MapillaryDataset(SegmentationDataset):
    def __init__(self, root: str, split: str, transform: Transform, skip_bad: bool = False):
        if not os.path.isdir(root):
            raise DataNotFoundError(f"Mapillary folder not found: {root} ({LAYOUT_HELP})")
        if split not in SPLITS:
            raise ValueError(f"Mapillary split must be one of {list(SPLITS)}, got {split!r}")
        classes, labels = read_config(os.path.join(root, "config.json"))
        image_dir = os.path.join(root, SPLITS[split], "images")
        if not os.path.isdir(image_dir):
            raise DataNotFoundError(f"Mapillary split folder not found: {image_dir} ({LAYOUT_HELP})")
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not names:
            raise DataNotFoundError(f"Mapillary split {split!r} is empty: no images in {image_dir}")
        label_dir = None if split == "test" else os.path.join(root, SPLITS[split], "labels")
        samples = []
        if label_dir is not None:
            have = set(os.listdir(label_dir)) if os.path.isdir(label_dir) else set()
            stems = {os.path.splitext(n)[0] for n in names}
            missing = [os.path.splitext(n)[0] + ".png" for n in names if os.path.splitext(n)[0] + ".png" not in have]
            extra = sorted(f for f in have if f.endswith(".png") and f[:-4] not in stems)
            if missing or extra:
                raise DataError(f"{label_dir}: {len(missing)} image(s) without a label ({', '.join(missing[:10])}), "
                                f"{len(extra)} label(s) without an image ({', '.join(extra[:10])})")
        for n in names:
            stem = os.path.splitext(n)[0]
            mask = None if label_dir is None else os.path.join(label_dir, stem + ".png")
            samples.append(Sample(os.path.join(image_dir, n), mask, stem))
        if not skip_bad:  # with data.skip_bad they are skipped like any unreadable file
            check_listed(samples, f"mapillary/{split}")
        super().__init__(samples, classes, labels, transform, skip_bad, f"mapillary/{split}")
        self.palette_masks = True
        self.root, self.split = root, split
