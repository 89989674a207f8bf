"""Peak memory: the planner's prediction against the measured peak (`python -m scripts.bench.memory`).

The counting lives in utils/inference/memory.py (`LiveTensorBytes`, `PeakMemory`, `estimate_peak`,
`tensor_bytes`, re-exported here for scripts/bench/multiscale.py). This script prints a table of the planner's predicted
peak of an evaluation call (every exact schedule) and of a training step next to the measured one:
on a CUDA device `torch.cuda.max_memory_allocated`, elsewhere the dispatch-mode count of live tensor storage.

    python -m scripts.bench.memory                       # demo model, CPU (a minute)
    python -m scripts.bench.memory --width full --size 256x512 --train-crop 256x256   # full-width HRNet-OCR
    python -m scripts.bench.memory --device cuda --width full --size 1024x2048        # on a GPU
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import Any

import torch

import network
from loss import build_criterion
from train import build_optimizer
from utils.config import load_config
from utils.inference import Inference
from utils.inference.memory import (
    LiveTensorBytes,
    PeakMemory,
    TrainStep,
    estimate_peak,
    format_bytes,
    plan_eval,
    predict_train_peak,
    tensor_bytes,
)
from utils.inference.multiscale import UNCONSTRAINED

__all__ = ["LiveTensorBytes", "PeakMemory", "estimate_peak", "tensor_bytes", "main"]

RECIPES = {"demo": "configs/demo/default.yaml", "full": "configs/cityscapes/hmsa_ocrnet_hrnet_w48_1024x2048.yaml"}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None
    return h, w


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", choices=sorted(RECIPES), default="demo", help="demo model or full-width HRNet-OCR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=_size, default=(128, 256), help="evaluation image HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scales", default="0.5,1.0,2.0")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--train-crop", type=_size, default=(128, 128))
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def measure_eval(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, how: Inference,
                 num_classes: int) -> tuple[int, float]:
    """(measured peak bytes of one evaluate() call incl. weights, batch and labels; seconds)."""
    from utils.engine import evaluate

    device = images.device
    static = tensor_bytes(model) + images.numel() * 4 + target.numel() * 8
    loader = [{"image": images, "mask": target, "name": ["x"] * images.shape[0]}]
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        evaluate(model, loader, num_classes, 255, how, device)
    return static + mem.peak, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = load_config(RECIPES[args.width])
    model = network.build_model(cfg.model.name, args.classes, **cfg.model.options).eval().to(device)
    scales = [float(s) for s in args.scales.split(",")]
    how = Inference.make(scales, flip=args.flip, precision=args.precision)
    combo = how.combo(model)
    shape = (args.batch, 3, *args.size)
    images = torch.randn(shape, device=device)
    target = torch.randint(0, args.classes, (args.batch, *args.size), device=device)
    plan = plan_eval(model, shape, [combo], how, device, every=True)
    rows: list[dict[str, Any]] = []
    base_time = None
    for row in plan.rows:
        measured, seconds = measure_eval(model, images, target, Inference.make(
            scales, flip=args.flip, precision=args.precision, schedule=row.schedule), args.classes)
        base_time = seconds if row.schedule == UNCONSTRAINED else base_time
        rows.append({"case": f"eval {'x'.join(map(str, shape))} {combo.label}", "schedule": row.schedule.label,
                     "predicted": row.peak, "measured": measured, "error": row.peak / measured - 1,
                     "time_ratio": seconds / base_time})
    step = TrainStep(args.train_batch, args.train_crop, args.precision)
    predicted = predict_train_peak(
        lambda: network.build_model(cfg.model.name, args.classes, **cfg.model.options),
        partial(build_optimizer, cfg), build_criterion(cfg.loss, args.classes, 255), step)
    rows.append({"case": f"train step {step.label}", "schedule": "-", "predicted": predicted,
                 "measured": measure_train(cfg, args.classes, step, device), "time_ratio": None})
    rows[-1]["error"] = predicted / rows[-1]["measured"] - 1
    how_measured = PeakMemory(device).method
    print(f"model {cfg.model.name} ({args.width}), device {device}; measured: {how_measured}")
    print("| case | schedule | predicted | measured | error | time vs unconstrained |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x"
        print(f"| {r['case']} | {r['schedule']} | {format_bytes(r['predicted'])} | {format_bytes(r['measured'])} "
              f"| {100 * r['error']:+.1f}% | {ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "width": args.width, "method": how_measured, "rows": rows}, f, indent=1)
    return rows


def measure_train(cfg: Any, num_classes: int, step: TrainStep, device: torch.device) -> int:
    """Measured peak bytes of the second of two real training steps' span (weights, batch and state included)."""
    from utils.runtime.precision import autocast

    torch.manual_seed(0)
    model = network.build_model(cfg.model.name, num_classes, **cfg.model.options).train().to(device)
    criterion = build_criterion(cfg.loss, num_classes, 255)
    optimizer = build_optimizer(cfg, model)
    images = torch.randn(step.batch, 3, *step.crop, device=device)
    target = torch.randint(0, num_classes, (step.batch, *step.crop), device=device)
    precision = "bf16" if step.precision == "fp16" else step.precision
    static = tensor_bytes(model) + images.numel() * 4 + target.numel() * 8
    with PeakMemory(device) as mem:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                outputs = model(images)
            total, _terms = criterion(outputs, target)
            total.backward()
            optimizer.step()
            del outputs, total, _terms
    return static + mem.peak


if __name__ == "__main__":
    main()
