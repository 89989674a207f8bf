"""Check a downloaded Mapillary Vistas (v1.2) folder and say exactly what is missing.

    python -m scripts.prepare_mapillary ROOT [--verify [--workers N]]

Mapillary Vistas comes from https://www.mapillary.com/dataset/vistas (research licence): unpack it so that ROOT holds
config.json and training/, validation/ (images/*.jpg, labels/*.png) and optionally testing/images.
--verify also decodes every image and label of training and validation in N worker processes, checking class
indices and that labels match their images: the data.verify=true pass of train.py.
Exit status 0 when everything needed is there, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

from datasets import build_dataset
from datasets.base import DataError, DataNotFoundError, read_mask
from datasets.mapillary import SPLITS, read_config
from datasets.verify import find_bad_files, problem_line
from utils.config import DataConfig

EXPECTED = {"training": 18000, "validation": 2000, "testing": 5000}


def verify_splits(root: str, workers: int) -> int:
    """Decode every sample of training and validation; prints each bad file and returns their number."""
    problems = 0
    for split in ("train", "val"):
        name = SPLITS[split]
        try:
            dataset = build_dataset(DataConfig.make(dataset="mapillary", root=root), split, train=False)
        except DataError as e:
            print(f"  MISSING  {name}: cannot be read: {e}")
            problems += 1
            continue
        bad = find_bad_files(dataset, workers)
        for file, problem in bad:
            print(f"  BAD      {name}: {problem_line(file, problem)}")
        if not bad:
            print(f"  ok       {name}: {len(dataset)} samples decode, masks match their images")
        problems += len(bad)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--verify", action="store_true", help="decode every image and label (minutes for the full set)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="--verify processes (default: all cores)")
    args = p.parse_args(argv)
    problems = 0
    print(f"Mapillary Vistas at {args.root}")
    try:
        classes, table = read_config(os.path.join(args.root, "config.json"))
        print(f"  ok       config.json: {classes.num_classes} evaluated classes, ignore value {classes.ignore_index}")
    except (DataError, DataNotFoundError) as e:
        print(f"  MISSING  {e}")
        return 1
    for split in SPLITS.values():
        image_dir = os.path.join(args.root, split, "images")
        if not os.path.isdir(image_dir):
            level = "warning " if split == "testing" else "MISSING "
            problems += split != "testing"
            print(f"  {level} {split}: folder {image_dir}")
            continue
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".png")))
        note = "" if len(stems) == EXPECTED[split] else f" (the full dataset has {EXPECTED[split]})"
        print(f"  {'ok      ' if stems else 'MISSING '} {split}: {len(stems)} images{note}")
        problems += not stems
        if split == "testing":
            continue
        label_dir = os.path.join(args.root, split, "labels")
        lost = [os.path.join(label_dir, s + ".png") for s in stems if not os.path.isfile(os.path.join(label_dir, s + ".png"))]
        if lost:
            problems += 1
            print(f"  MISSING  {split}: {len(lost)} label files, e.g. " + ", ".join(lost[:5]))
            continue
        for s in stems[:: max(len(stems) // 5, 1)][:5]:
            path = os.path.join(label_dir, s + ".png")
            try:
                table(read_mask(path, palette=True), path)
            except DataError as e:
                problems += 1
                print(f"  MISSING  {split}: unusable label file: {e}")
                break
        else:
            print(f"  ok       {split}: every image has its label; sampled labels hold valid class indices")
    if args.verify:
        problems += verify_splits(args.root, args.workers)
    print("all needed files are present" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
