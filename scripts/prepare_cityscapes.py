"""Check a downloaded Cityscapes folder and say exactly what is missing.

    python -m scripts.prepare_cityscapes ROOT [--coarse] [--autolabel DIR] [--verify [--workers N]]

Cityscapes comes from https://www.cityscapes-dataset.com/downloads/ (an account is needed): leftImg8bit_trainvaltest.zip
and gtFine_trainvaltest.zip unpacked into ROOT (either as ROOT/leftImg8bit + ROOT/gtFine or in the zip-named folders
ROOT/leftImg8bit_trainvaltest/leftImg8bit + ROOT/gtFine_trainvaltest/gtFine). For coarse training also
leftImg8bit_trainextra.zip and gtCoarse.zip, and for the SOTA recipe the autolabelled masks (see docs/data.md).
--verify also decodes every image and mask of train and val (and the coarse data with --coarse / --autolabel) in N
worker processes, checking label ids and that masks match their images: the data.verify=true pass of train.py.
Exit status 0 when everything needed is there, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

from datasets import build_dataset
from datasets.base import DataError, DataNotFoundError, read_mask
from datasets.cityscapes import (
    COARSE_SUFFIX,
    FINE_SUFFIX,
    IMAGE_SUFFIX,
    autolabel_files,
    find_extra_layout,
    find_layout,
    label_map,
)
from datasets.verify import find_bad_files, problem_line
from utils.config import DataConfig

EXPECTED = {"train": (18, 2975), "val": (3, 500), "test": (6, 1525), "train_extra": (23, 19998)}


class Report:
    def __init__(self):
        self.problems = 0

    def ok(self, msg: str) -> None:
        print(f"  ok       {msg}")

    def warn(self, msg: str) -> None:
        print(f"  warning  {msg}")

    def missing(self, msg: str) -> None:
        self.problems += 1
        print(f"  MISSING  {msg}")

    def bad(self, msg: str) -> None:
        self.problems += 1
        print(f"  BAD      {msg}")


def check_pairs(report: Report, name: str, image_dir: str, label_dir: str | None, label_suffix: str,
                image_suffix: str = IMAGE_SUFFIX) -> list[str]:
    """Images (and labels) of one split folder, city by city; returns the label files found."""
    if not os.path.isdir(image_dir):
        report.missing(f"{name}: image folder {image_dir}")
        return []
    cities = sorted(c for c in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, c)))
    images, labels, lost = 0, [], []
    for city in cities:
        stems = [f[: -len(image_suffix)] for f in os.listdir(os.path.join(image_dir, city)) if f.endswith(image_suffix)]
        images += len(stems)
        if label_dir is None:
            continue
        have = set(os.listdir(os.path.join(label_dir, city))) if os.path.isdir(os.path.join(label_dir, city)) else set()
        for s in stems:
            if s + label_suffix in have:
                labels.append(os.path.join(label_dir, city, s + label_suffix))
            else:
                lost.append(os.path.join(label_dir, city, s + label_suffix))
    exp_cities, exp_images = EXPECTED.get(name, (0, 0))
    line = f"{name}: {len(cities)} cities, {images} images in {image_dir}"
    if images == 0:
        report.missing(f"{name}: no *{image_suffix} files in {image_dir}/<city>/")
    elif exp_images and images != exp_images:
        report.warn(f"{line} (the full dataset has {exp_cities} cities, {exp_images} images)")
    else:
        report.ok(line)
    if label_dir is not None and images and not os.path.isdir(label_dir):
        report.missing(f"{name}: label folder {label_dir} (with <city>/<name>{label_suffix})")
    elif lost:
        report.missing(f"{name}: {len(lost)} of {images} label files, e.g. " + ", ".join(sorted(lost)[:5]))
    elif label_dir is not None and images:
        report.ok(f"{name}: every image has its *{label_suffix}")
    return labels


def check_ids(report: Report, name: str, labels: list[str]) -> None:
    """Decode a few label files and check their ids against the Cityscapes table."""
    table = label_map()
    for path in labels[:: max(len(labels) // 5, 1)][:5]:
        try:
            table(read_mask(path), path)
        except DataError as e:
            report.missing(f"{name}: unusable label file: {e}")
            return
    if labels:
        report.ok(f"{name}: sampled label files decode and hold Cityscapes label ids")


def check_autolabels(report: Report, image_dir: str, folder: str) -> None:
    """Every train_extra image needs an autolabel mask and its probability map."""
    if not os.path.isdir(folder):
        report.missing(f"autolabel: folder {folder}")
        return
    found, lost = [], []
    for city in sorted(os.listdir(image_dir)):
        for f in sorted(os.listdir(os.path.join(image_dir, city))):
            if f.endswith(IMAGE_SUFFIX):
                stem = f[: -len(IMAGE_SUFFIX)]
                pair = autolabel_files(folder, city, stem)
                (found if pair else lost).append(pair[0] if pair else stem)
    if lost:
        report.missing(f"autolabel: {len(lost)} of {len(found) + len(lost)} images have no mask + probability map "
                       f"in {folder}, e.g. " + ", ".join(lost[:5]))
    else:
        report.ok(f"autolabel: {len(found)} masks with their probability maps")
    check_ids(report, "autolabel", found)


def verify_splits(report: Report, args: argparse.Namespace) -> None:
    """Decode every sample of train (with the coarse data asked for) and val; each bad file is one problem."""
    coarse = {}
    if args.coarse or args.autolabel:
        coarse = dict(boost_classes=tuple(range(19)), autolabel_threshold=0.5 if args.autolabel else 0.0,
                      autolabel_dir=os.path.abspath(args.autolabel) if args.autolabel else "autolabelled")
    for split, train in (("train", True), ("val", False)):
        try:
            dataset = build_dataset(DataConfig.make(dataset="cityscapes", root=args.root, **coarse), split, train)
        except DataError as e:
            report.missing(f"{split}: cannot be read: {e}")
            continue
        bad = find_bad_files(dataset, args.workers)
        for file, problem in bad:
            report.bad(f"{split}: {problem_line(file, problem)}")
        if not bad:
            report.ok(f"{split}: {len(dataset)} samples decode, masks match their images")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--coarse", action="store_true", help="also check train_extra images and gtCoarse masks")
    p.add_argument("--autolabel", default="", help="also check autolabelled masks in this folder (e.g. ROOT/autolabelled)")
    p.add_argument("--verify", action="store_true", help="decode every image and mask (slow: minutes for the full set)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="--verify processes (default: all cores)")
    args = p.parse_args(argv)
    report = Report()
    print(f"Cityscapes at {args.root}")
    try:
        image_root, label_root = find_layout(args.root)
    except DataNotFoundError as e:
        print(f"  MISSING  {e}")
        return 1
    report.ok(f"layout: images in {image_root}, fine labels in {label_root}")
    for split in ("train", "val"):
        labels = check_pairs(report, split, os.path.join(image_root, split), os.path.join(label_root, split), FINE_SUFFIX)
        check_ids(report, split, labels)
    if os.path.isdir(os.path.join(image_root, "test")):
        check_pairs(report, "test", os.path.join(image_root, "test"), None, "")
    else:
        report.warn(f"test: no {os.path.join(image_root, 'test')} (needed only for submission dumps)")
    if args.coarse or args.autolabel:
        try:
            extra_images, coarse_dir = find_extra_layout(args.root)
        except DataNotFoundError as e:
            report.missing(str(e))
        else:
            labels = check_pairs(report, "train_extra", extra_images, coarse_dir, COARSE_SUFFIX)
            check_ids(report, "gtCoarse", labels)
            if args.autolabel:
                check_autolabels(report, extra_images, args.autolabel)
    if args.verify:
        verify_splits(report, args)
    print("all needed files are present" if report.problems == 0 else f"{report.problems} problem(s) found")
    return 0 if report.problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
