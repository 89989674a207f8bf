"""Any folder of images, any sizes, no labels (inference and dumps).

The class list (for palettes and the model's class count) is the Cityscapes one unless data.custom.classes names a
class-list YAML (datasets/custom.py) or a Mapillary config.json.
"""
from __future__ import annotations

import os

from .base import (
    IMAGE_EXTENSIONS,
    ClassInfo,
    DataNotFoundError,
    LabelMap,
    Sample,
    SegmentationDataset,
    Transform,
    check_listed,
)


def class_info(classes: str) -> ClassInfo:
    """The classes named by data.custom.classes: '' or 'cityscapes', a Mapillary config.json, or a class-list YAML."""
    return class_source(classes)[0]


def class_source(classes: str) -> tuple[ClassInfo, LabelMap]:
    """Classes and label table named by data.custom.classes (see class_info)."""
    if not classes or classes == "cityscapes":
        from .cityscapes import CLASSES, label_map

        return CLASSES, label_map()
    if classes.endswith(".json"):
        from .mapillary import read_config

        return read_config(classes)
    from .custom import read_class_list

    return read_class_list(classes)


class FolderDataset(SegmentationDataset):
    """Every image file directly in `root` (sorted); items have no 'mask'. Use a batch size of 1 for mixed sizes.

    `label_map` is the class source's table (unused for reading; it lets predictions be written as label ids).
    An unreadable image is a DataError naming it; with `skip_bad` it is logged and left out of the evaluation.
    """

    def __init__(self, root: str, transform: Transform, classes: str = "", skip_bad: bool = False):
        if not os.path.isdir(root):
            raise DataNotFoundError(f"image folder not found: {root}")
        names = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
        samples = [Sample(os.path.join(root, f), None, os.path.splitext(f)[0]) for f in names]
        if not skip_bad:  # with data.skip_bad they are left out like any unreadable file
            check_listed(samples, f"image folder {root}")
        info, table = class_source(classes)
        super().__init__(samples, info, table, transform, skip_bad, f"folder/{os.path.basename(root)}")
