"""Export a trained model to ONNX for a fixed scale set and input size, and check it with ONNX Runtime.

    python -m scripts.export_onnx --config RUN/config.yaml --out model.onnx [--checkpoint CKPT] \
        [--size H W] [--num-check 4] [--legacy] [eval.scales=[0.5,1.0,2.0] eval.fusion=attention eval.flip=false]

The graph computes the fused logits [N, K, H, W] of images [N, 3, H, W] (ImageNet-normalised RGB) with the
config's eval.scales / eval.fusion / eval.flip. The check runs the first --num-check images of data.val_split
(resized to the export size) through ONNX Runtime and PyTorch, prints the largest absolute logit difference and the
fraction of pixels whose predicted class agrees, and exits with status 1 when fewer than 99.9% agree.

The file is written in a hidden folder beside --out and moved into place once ONNX Runtime has run it, so a failed
export leaves nothing behind. A bad input (config, checkpoint, data, an unwritable --out) ends with one line
`error: ...` and exit code 2 (--debug or HMSA_DEBUG=1: the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import network
from datasets import build_dataset
from datasets.base import DataError
from network.layers import resize
from utils.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint
from utils.cli import CliError, debug_enabled, ensure_writable_dir, one_line_errors, run_cli
from utils.config import ConfigError, load_config
from utils.inference.export import FixedScaleModel, check_onnx, export_onnx
from utils.inference import Inference

MIN_AGREEMENT = 0.999


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe or a run's config.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.scales=[0.5,1.0,2.0]")
    p.add_argument("--checkpoint", default=None, help="weights (default: model.snapshot, else the run's newest)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size (default: that of the first validation image)")
    p.add_argument("--num-check", type=int, default=4, help="validation images compared with ONNX Runtime")
    p.add_argument("--legacy", action="store_true", help="use torch's TorchScript-based exporter (no onnxscript)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


@contextmanager
def staged(path: str) -> Iterator[str]:
    """A path to write `path` at, in a new hidden folder beside it; once the block ends without an error, what
    was written there (the model, and the external-data file torch writes beside a large one) moves into place,
    the model last. The hidden folder is removed in any case."""
    folder = os.path.dirname(os.path.abspath(path))
    stage = tempfile.mkdtemp(prefix=".export_", dir=folder)
    name = os.path.basename(path)
    try:
        yield os.path.join(stage, name)
        for written in sorted(os.listdir(stage), key=lambda n: n == name):
            os.replace(os.path.join(stage, written), os.path.join(folder, written))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), (ConfigError, CheckpointError, DataError, ValueError)):
        return export(args)


def export(args: argparse.Namespace) -> dict:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise CliError(f"config error: {e}") from e
    if args.num_check < 1:
        raise CliError(f"--num-check: expected at least 1, got {args.num_check}")
    if os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is a folder: give the ONNX file's path, e.g. "
                       f"{os.path.join(args.out, 'model.onnx')}")
    weights = args.checkpoint or cfg.model.snapshot
    if not weights:
        found = checkpoint_paths(os.path.join(cfg.run.output_dir, cfg.run.name))
        if not found:
            raise CliError("no checkpoint: pass --checkpoint or model.snapshot=...")
        weights = found[0]
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    model = network.build_model(cfg.model.name, dataset.num_classes, **cfg.model.options)
    load_checkpoint(model, weights, strict=True)
    try:
        module = FixedScaleModel(model.eval(), Inference.from_config(cfg)).eval()
    except ValueError as e:
        raise CliError(f"config error: {e}") from e
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    first = dataset[0]["image"].unsqueeze(0)
    size = tuple(args.size) if args.size else tuple(first.shape[-2:])
    inputs = [resize(dataset[i]["image"].unsqueeze(0), size) for i in range(min(args.num_check, len(dataset)))]
    with staged(args.out) as path:
        export_onnx(module, path, inputs[0], dynamo=not args.legacy)
        check = check_onnx(path, module, inputs)
    summary = {"onnx": args.out, "checkpoint": weights, "scales": list(module.combo.scales), "fusion":
               module.combo.fusion, "flip": module.combo.flip, "size": list(size), "max_abs_diff": check.max_abs_diff,
               "agreement": check.agreement, "pixels": check.pixels}
    print(f"{args.out}: {check}")
    print(json.dumps(summary))
    if check.agreement < MIN_AGREEMENT:
        raise SystemExit(f"ONNX Runtime and PyTorch agree on only {100 * check.agreement:.3f}% of pixels "
                         f"(< {100 * MIN_AGREEMENT:.1f}%)")
    return summary


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main, sys.argv[1:])
