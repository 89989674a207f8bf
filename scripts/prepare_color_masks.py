"""Convert colour-coded masks (one RGB colour per class) to id masks for the custom dataset.

    python -m scripts.prepare_color_masks COLOUR_DIR OUT_DIR --classes classes.yaml [--unknown ignore]

Every PNG below COLOUR_DIR is written to the same relative path below OUT_DIR as a single-channel PNG holding the
train id of each pixel's colour (the `colors` of the class list). Colours not in the list stop the conversion with
the file and the colours, or become the ignore value with --unknown ignore.
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2

from datasets.base import DataError, read_image
from datasets.custom import colors_to_ids, read_class_list


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of colour-coded PNG masks (searched recursively)")
    p.add_argument("dst", help="output folder for the id masks")
    p.add_argument("--classes", required=True, help="class-list YAML with names and colors")
    p.add_argument("--unknown", choices=("error", "ignore"), default="error",
                   help="what to do with colours not in the class list")
    args = p.parse_args(argv)
    classes, _ = read_class_list(args.classes)
    unknown = classes.ignore_index if args.unknown == "ignore" else None
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.src) for f in fs if f.lower().endswith(".png"))
    if not files:
        print(f"no PNG files under {args.src}", file=sys.stderr)
        return 1
    for path in files:
        try:
            ids = colors_to_ids(read_image(path), classes.palette, unknown=unknown)
        except DataError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        out = os.path.join(args.dst, os.path.relpath(path, args.src))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cv2.imwrite(out, ids)
    print(f"converted {len(files)} masks into {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
