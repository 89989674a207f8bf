"""Your own data: an image folder, a mask folder and a YAML class list; and the colour-mask -> id-mask conversion.

Class list (YAML):

    names: [background, road, car]          # train ids 0..K-1
    colors: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional (a generated palette otherwise)
    ignore_index: 255                        # optional, default 255
    id_map: {0: 0, 7: 1, 26: 2, 255: 255}    # optional raw mask value -> train id; values not listed are errors

Layout: `<root>/<image_dir>/**/<name>.<ext>` with `<root>/<mask_dir>/**/<name><mask_suffix>` ({split} in the folder
names is replaced by the split).

Coarse data works as for Cityscapes (data.coarse.*): the unlabelled split is {split} = train_extra, its human coarse
masks (if any) are in the mask folder of that split, and autolabels are `<autolabel_dir>/<path>.png` with
`<path>_prob.png`, <path> being the image's path below the image folder without its extension (what
scripts/experiments/autolabel.py writes).
"""
from __future__ import annotations

import os

import numpy as np
import yaml

from .base import (
    IMAGE_EXTENSIONS,
    ClassInfo,
    DataError,
    DataNotFoundError,
    LabelMap,
    Sample,
    Transform,
    check_listed,
)
from .cityscapes import CoarseDataset, CoarseOptions

EXTRA_SPLIT = "train_extra"  # the unlabelled split's name in data.custom.image_dir / mask_dir


def default_palette(n: int) -> np.ndarray:
    """Distinct colours for n classes (the bit-interleaving scheme of the PASCAL VOC palette)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def read_class_list(path: str, need_colors: bool = False) -> tuple[ClassInfo, LabelMap]:
    """Classes and raw-value -> train-id table from a class-list YAML (see the module docstring); `need_colors`:
    a list without `colors` is an error (colour-coded masks cannot be read with a generated palette)."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"class list not found: {path} (set data.custom.classes to a YAML file)")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a mapping with 'names' (and optionally colors, ignore_index, id_map)")
    unknown = sorted(set(spec) - {"names", "colors", "ignore_index", "id_map"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; valid: names, colors, ignore_index, id_map")
    names = spec.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'names' must be a non-empty list of strings, got {names!r}")
    k = len(names)
    ignore = spec.get("ignore_index", 255)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255 or ignore < k:
        raise DataError(f"{path}: 'ignore_index' must be an integer in {k}..255 (not a class id), got {ignore!r}")
    colors = spec.get("colors")
    if colors is None and need_colors:
        raise DataError(f"{path}: no 'colors': list the [r, g, b] colour of each of the {k} classes, in the order "
                        "of 'names'")
    if colors is None:
        palette = default_palette(k)
    else:
        ok = isinstance(colors, list) and len(colors) == k and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in colors)
        if not ok:
            raise DataError(f"{path}: 'colors' must list {k} [r, g, b] triples of integers 0..255")
        palette = np.asarray(colors, np.uint8)
    id_map = spec.get("id_map")
    if id_map is None:
        labels = LabelMap.identity(k, ignore, os.path.basename(path))
    else:
        if not isinstance(id_map, dict) or not all(isinstance(a, int) and isinstance(b, int) for a, b in id_map.items()):
            raise DataError(f"{path}: 'id_map' must map integers to integers, got {id_map!r}")
        bad = {a: b for a, b in id_map.items() if not (0 <= b < k or b == ignore) or not 0 <= a < 65536}
        if bad:
            raise DataError(f"{path}: 'id_map' entries must map 0..65535 to a train id 0..{k - 1} or {ignore}: {bad}")
        labels = LabelMap(id_map, os.path.basename(path))
    return ClassInfo(tuple(names), palette, ignore), labels


def colors_to_ids(rgb: np.ndarray, colors: np.ndarray, ids: np.ndarray | None = None,
                  unknown: int | None = None) -> np.ndarray:
    """Colour-coded mask [H,W,3] -> id mask [H,W] (uint8): pixel of colors[i] -> ids[i] (default i).

    Colours not in the list become `unknown`, or raise DataError listing them when `unknown` is None.
    """
    colors = np.asarray(colors, np.int64).reshape(-1, 3)
    ids = np.arange(len(colors)) if ids is None else np.asarray(ids)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    order = np.argsort(keys)
    keys, values = keys[order], ids[order]
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    found = keys[pos] == codes
    out = values[pos].astype(np.uint8)
    if not found.all():
        if unknown is None:
            bad = np.unique(codes[~found])[:10]
            shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad)
            raise DataError(f"{int((~found).sum())} pixels have colours not in the class list: {shown}")
        out[~found] = unknown
    return out


def _files(folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """{path relative to folder without extension: full path} of the files below `folder`."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(extensions):
                full = os.path.join(d, f)
                out[os.path.splitext(os.path.relpath(full, folder))[0]] = full
    return out


class CustomDataset(CoarseDataset):
    """A split of your own data; with `coarse.boost_classes`, the train_extra split's images follow (index >=
    num_main) with their human coarse masks or their autolabels (datasets/cityscapes.py, CoarseDataset)."""

    def __init__(self, root: str, split: str, classes_path: str, transform: Transform, image_dir: str = "images/{split}",
                 mask_dir: str = "masks/{split}", mask_suffix: str = ".png", skip_bad: bool = False,
                 coarse: CoarseOptions | None = None):
        classes, labels = read_class_list(classes_path)
        images_at = os.path.join(root, image_dir.format(split=split))
        masks_at = os.path.join(root, mask_dir.format(split=split))
        if not os.path.isdir(images_at):
            raise DataNotFoundError(f"custom dataset image folder not found: {images_at} (expected "
                                    f"<root>/{image_dir} with masks in <root>/{mask_dir}; split {split!r})")
        images = _files(images_at, IMAGE_EXTENSIONS)
        if not images:
            raise DataNotFoundError(f"custom dataset split {split!r} is empty: no images in {images_at}")
        labelled = split != "test"  # a test split is served without masks
        if labelled and not os.path.isdir(masks_at):
            raise DataNotFoundError(f"custom dataset mask folder not found: {masks_at} (expected <root>/{mask_dir} "
                                    f"holding <image name>{mask_suffix} for every image of {images_at})")
        samples = []
        if labelled:
            masks = {}
            for d, _, files in os.walk(masks_at):
                for f in files:
                    if f.endswith(mask_suffix):
                        full = os.path.join(d, f)
                        masks[os.path.relpath(full, masks_at)[: -len(mask_suffix)]] = full
            missing = sorted(k + mask_suffix for k in images if k not in masks)
            extra = sorted(os.path.basename(masks[k]) for k in masks if k not in images)
            if missing or extra:
                raise DataError(f"custom dataset: {len(missing)} image(s) in {images_at} without a mask in {masks_at} "
                                f"({', '.join(missing[:10])}); {len(extra)} mask(s) without an image "
                                f"({', '.join(extra[:10])})")
        for key in sorted(images):
            samples.append(Sample(images[key], masks[key] if labelled else None, key.replace(os.sep, "_")))
        num_main = len(samples)
        self.coarse = coarse or CoarseOptions()
        self.autolabel = {}
        if self.coarse.boost_classes:
            samples += self._coarse_samples(root, image_dir, mask_dir, mask_suffix, num_main, classes.num_classes)
        if not skip_bad:  # with data.skip_bad they are skipped like any unreadable file
            check_listed(samples, f"custom/{split}")
        super().__init__(samples, classes, labels, transform, skip_bad, f"custom/{split}")
        self.num_main = num_main
        self.root, self.split = root, split
        self.centroid_name, self.coarse_centroid_name = self.description, "custom_coarse"

    def _coarse_samples(self, root: str, image_dir: str, mask_dir: str, mask_suffix: str, first_index: int,
                        num_classes: int) -> list[Sample]:
        c = self.coarse
        bad = [k for k in c.boost_classes + c.dropout_classes if not 0 <= k < num_classes]
        if bad:
            raise ValueError(f"data.coarse.boost_classes / dropout_classes must be train ids 0..{num_classes - 1}, "
                             f"got {bad}")
        images_at = os.path.join(root, image_dir.format(split=EXTRA_SPLIT))
        masks_at = os.path.join(root, mask_dir.format(split=EXTRA_SPLIT))
        images = _files(images_at, IMAGE_EXTENSIONS) if os.path.isdir(images_at) else {}
        if not images:
            raise DataNotFoundError(f"coarse data requested (data.coarse.boost_classes) but no images in {images_at} "
                                    f"(the unlabelled split: data.custom.image_dir with {{split}} = {EXTRA_SPLIT})")
        out: list[Sample] = []
        missing: list[str] = []
        if c.autolabel_prob <= 0:  # human coarse masks
            for key in sorted(images):
                mask = os.path.join(masks_at, key + mask_suffix)
                if not os.path.isfile(mask):
                    missing.append(key + mask_suffix)
                out.append(Sample(images[key], mask, key.replace(os.sep, "_")))
            if missing:
                raise DataError(f"{len(missing)} {EXTRA_SPLIT} image(s) without a coarse mask in {masks_at}: "
                                f"{', '.join(missing[:10])}")
            return out
        auto = c.autolabel_dir if os.path.isabs(c.autolabel_dir) else os.path.join(root, c.autolabel_dir)
        for key in sorted(images):
            base = os.path.join(auto, key)
            if not (os.path.isfile(base + ".png") and os.path.isfile(base + "_prob.png")):
                missing.append(key)
                continue
            human = os.path.join(masks_at, key + mask_suffix) if c.dropout_classes else None
            self.autolabel[first_index + len(out)] = (base + "_prob.png", human)
            out.append(Sample(images[key], base + ".png", key.replace(os.sep, "_")))
        if missing:
            raise DataError(f"{len(missing)} {EXTRA_SPLIT} image(s) without an autolabel <name>.png and its "
                            f"<name>_prob.png in {auto}: {', '.join(missing[:10])} (scripts/experiments/autolabel.py writes them)")
        return out
