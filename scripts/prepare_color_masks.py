"""Convert colour-coded masks (one RGB colour per class) to id masks for the custom dataset.

    python -m scripts.prepare_color_masks COLOUR_DIR OUT_DIR --classes classes.yaml [--unknown ignore]

Every PNG below COLOUR_DIR is written to the same relative path below OUT_DIR as a single-channel PNG holding the
train id of each pixel's colour (the `colors` of the class list). Colours not in the list stop the conversion with
the file and the colours, or become the ignore value with --unknown ignore. OUT_DIR may not be COLOUR_DIR, nor lie
inside it, nor receive an output where a colour mask is: the colour masks are never overwritten. Each id mask is
written whole or not at all; a bad input ends with one line `error: ...` and exit code 2 (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2

from datasets.base import DataError, read_image
from datasets.custom import colors_to_ids, read_class_list
from utils.cli import CliError, debug_enabled, one_line_errors, run_cli
from utils.files import atomic_write_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of colour-coded PNG masks (searched recursively)")
    p.add_argument("dst", help="output folder for the id masks (outside the source folder)")
    p.add_argument("--classes", default=None, help="class-list YAML with names and colors (required)")
    p.add_argument("--unknown", choices=("error", "ignore"), default="error",
                   help="what to do with colours not in the class list")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def destination(src: str, dst: str, path: str) -> str:
    """Where the id mask of the colour mask `path` is written."""
    return os.path.join(dst, os.path.relpath(path, src))


def check_destination(src: str, dst: str, files: list[str]) -> None:
    """Refuse an output folder where id masks would replace colour masks or mix with them: the source folder, a
    folder inside it (a later run would take the id masks for colour masks), or one where an output is a source."""
    source, target = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([source, target]) == source:
        where = "is the source folder" if target == source else f"is inside the source folder {src}"
        raise CliError(f"output folder {dst} {where}: the id masks would replace or mix with the colour masks; "
                       "give a folder outside it")
    sources = {os.path.realpath(f) for f in files}
    for path in files:
        out = destination(src, dst, path)
        if os.path.realpath(out) in sources:
            raise CliError(f"output folder {dst}: the id mask {out} would overwrite the colour mask there; give a "
                           "folder that holds no source mask")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), (DataError,)):
        if not args.classes:
            raise CliError("--classes: give the class-list YAML whose 'colors' list the colour of each class")
        if not os.path.isfile(args.classes):
            raise CliError(f"--classes: class list not found: {args.classes}")
        classes, _ = read_class_list(args.classes, need_colors=True)
        if not os.path.isdir(args.src):
            raise CliError(f"source folder not found: {args.src}")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.src) for f in fs if f.lower().endswith(".png"))
        if not files:
            raise CliError(f"no PNG files under {args.src}")
        check_destination(args.src, args.dst, files)
        unknown = classes.ignore_index if args.unknown == "ignore" else None
        for path in files:
            image = read_image(path)
            try:
                ids = colors_to_ids(image, classes.palette, unknown=unknown)
            except DataError as e:  # colours not in the list (raised only without --unknown ignore)
                raise CliError(f"{path}: {e} (or pass --unknown ignore to make them the ignore value)") from e
            atomic_write_bytes(destination(args.src, args.dst, path), cv2.imencode(".png", ids)[1].tobytes())
    print(f"converted {len(files)} masks into {args.dst}")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
