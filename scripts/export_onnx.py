"""Export a trained model to ONNX for a fixed scale set and input size, and check it with ONNX Runtime.

    python -m scripts.export_onnx --config RUN/config.yaml --out model.onnx [--checkpoint CKPT] \
        [--size H W] [--num-check 4] [--legacy] [eval.scales=[0.5,1.0,2.0] eval.fusion=attention eval.flip=false]

The graph computes the fused logits [N, K, H, W] of images [N, 3, H, W] (ImageNet-normalised RGB) with the
config's eval.scales / eval.fusion / eval.flip. The check runs the first --num-check images of data.val_split
(resized to the export size) through ONNX Runtime and PyTorch, prints the largest absolute logit difference and the
fraction of pixels whose predicted class agrees, and exits with status 1 when fewer than 99.9% agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import network
from datasets import build_dataset
from network.layers import resize
from utils.checkpoint import checkpoint_paths, load_checkpoint
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
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e
    weights = args.checkpoint or cfg.model.snapshot
    if not weights:
        found = checkpoint_paths(os.path.join(cfg.run.output_dir, cfg.run.name))
        if not found:
            raise SystemExit("no checkpoint: pass --checkpoint or model.snapshot=...")
        weights = found[0]
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    model = network.build_model(cfg.model.name, dataset.num_classes, **cfg.model.options)
    load_checkpoint(model, weights, strict=True)
    try:
        module = FixedScaleModel(model.eval(), Inference.from_config(cfg)).eval()
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from e
    first = dataset[0]["image"].unsqueeze(0)
    size = tuple(args.size) if args.size else tuple(first.shape[-2:])
    inputs = [resize(dataset[i]["image"].unsqueeze(0), size) for i in range(min(args.num_check, len(dataset)))]
    export_onnx(module, args.out, inputs[0], dynamo=not args.legacy)
    check = check_onnx(args.out, module, inputs)
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
    main(sys.argv[1:])
