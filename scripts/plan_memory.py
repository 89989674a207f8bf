"""The memory plan of a recipe, without a GPU: `python -m scripts.plan_memory --config RECIPE [key=value ...] [--json]`.

Prints the predicted peak of one evaluation call on one val image under every schedule (the unconstrained one,
the exact ones that hold less, and the approximate ones when eval.memory_fallback=any), whether each fits the
budget (eval.memory_budget, else the free memory of the CUDA device when there is one), and the peak of one
training step (data.batch_size, the crop, run.precision, run.channels_last; on CUDA with the allowances for the
cuDNN workspace and the CUDA context, and with --world-size N > 1 for DDP's gradient buckets and NCCL's buffers).
The model runs on fake tensors (shapes only), so the full-width HRNet-OCR recipes take seconds to a minute on a CPU.
With --json: one JSON object with eval_peak_bytes (unconstrained), eval_min_bytes (the smallest exact
schedule), train_peak_bytes and the table's rows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from typing import Any

import torch

import network
from datasets.base import DataError
from datasets.custom import read_class_list
from datasets.folder import class_info
from loss import build_criterion
from train import build_optimizer
from utils.cli import CliError, debug_enabled, one_line_errors, run_cli
from utils.config import Config, ConfigError, load_config
from utils.inference import Inference
from utils.inference.memory import (
    TrainStep,
    _fake_mode,
    device_budget,
    format_bytes,
    parse_bytes,
    plan_eval,
    predict_train_peak,
    tensor_bytes,
)

NATIVE_SIZES = {"cityscapes": (1024, 2048)}  # val images at their own size
CLASS_COUNTS = {"cityscapes": 19, "synthetic": 19, "mapillary": 65}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe (default: the demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.scales=[0.5,1.0] data.batch_size=1")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--size", default=None, help="val image HxW (default: the dataset's, or data.eval_size at 4:3)")
    p.add_argument("--device", default=None, help="device to plan for (default: cuda when present, else cpu)")
    p.add_argument("--world-size", type=int, default=1, help="training processes (DDP) to plan the step for")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_intermixed_args(argv)


def eval_size(cfg: Config, text: str | None) -> tuple[int, int]:
    if text:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise CliError(f"--size: expected HxW such as 1024x2048, got {text!r}") from None
        return h, w
    long_edge = cfg.data.eval_size or cfg.data.augment.long_edge
    if long_edge:  # resized to this long edge; Mapillary's images are mostly 4:3
        return int(math.ceil(long_edge * 3 / 4)), int(long_edge)
    if cfg.data.dataset == "synthetic":
        return cfg.data.synthetic.height, cfg.data.synthetic.width
    if cfg.data.dataset in NATIVE_SIZES:
        return NATIVE_SIZES[cfg.data.dataset]
    raise CliError(f"the val image size of data.dataset={cfg.data.dataset} is not known: pass --size HxW")


def num_classes(cfg: Config) -> int:
    """The model's class count: that of data.custom.classes for a custom dataset or a folder, else the dataset's."""
    if cfg.data.dataset == "custom":
        return read_class_list(cfg.data.custom.classes)[0].num_classes
    if cfg.data.dataset == "folder":
        return class_info(cfg.data.custom.classes).num_classes
    return CLASS_COUNTS.get(cfg.data.dataset, 19)


def planned_device(name: str | None, budget: Any) -> torch.device:
    """The device of --device (default: cuda when present, else cpu). A CUDA device without eval.memory_budget is
    planned against its free memory, which needs that device here."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CliError(f"--device: {e}") from e
    if device.type != "cuda" or parse_bytes(budget) is not None:
        return device
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= visible:
        raise CliError(f"--device {device}: no such CUDA device here ({visible} visible); plan for a GPU elsewhere "
                       "by giving its memory, e.g. eval.memory_budget=80GiB, or plan with --device cpu")
    return device


def plan(cfg: Config, size: tuple[int, int], device: torch.device, world_size: int = 1) -> dict[str, Any]:
    classes = num_classes(cfg)

    def build_model() -> torch.nn.Module:
        return network.build_model(cfg.model.name, classes, **cfg.model.options)

    with _fake_mode():  # the weights only as shapes: a full-width model costs no memory and no init time
        model = build_model().eval()
    how = Inference.from_config(cfg)
    setting = how.combo(model)
    combos = [setting] + [c for c in how.sweep(model) if c != setting]
    keep = setting.scales if cfg.eval.dump != "none" else ()
    shape = (1, 3, *size)
    resident = tensor_bytes(model) + 3 * size[0] * size[1] * 4
    budget = device_budget(device, parse_bytes(cfg.eval.memory_budget), resident)
    eval_plan = plan_eval(model, shape, combos, how, device, keep, labelled=True, budget=budget, every=True)
    step = TrainStep.from_config(cfg)
    train_peak = predict_train_peak(build_model, partial(build_optimizer, cfg), build_criterion(cfg.loss, classes, 255),
                                    step, device, world_size)
    exact = [r for r in eval_plan.rows if r.exact]
    return {
        "model": cfg.model.name, "device": str(device), "budget_bytes": budget,
        "eval_image": list(size), "eval_setting": setting.label, "sweep_combinations": len(combos) - 1,
        "eval_peak_bytes": eval_plan.rows[0].peak, "eval_min_bytes": min(r.peak for r in exact),
        "chosen": None if eval_plan.chosen is None else eval_plan.chosen.schedule.label,
        "schedules": [{"schedule": r.schedule.label, "exact": r.exact, "peak_bytes": r.peak,
                       "fits": None if budget is None else r.peak <= budget} for r in eval_plan.rows],
        "train_step": step.label, "world_size": world_size, "train_peak_bytes": train_peak,
        "train_fits": None if budget is None else train_peak <= budget,
        "_table": eval_plan.table(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), (ConfigError, DataError, ValueError)):
        cfg = load_config(args.config, args.overrides)
        device = planned_device(args.device, cfg.eval.memory_budget)
        if args.world_size < 1:
            raise CliError(f"--world-size: expected at least 1, got {args.world_size}")
        result = plan(cfg, eval_size(cfg, args.size), device, args.world_size)
    table = result.pop("_table")
    if args.json:
        print(json.dumps(result))
        return result
    budget = "none (no limit on a CPU)" if result["budget_bytes"] is None else format_bytes(result["budget_bytes"])
    print(f"{result['model']} on {result['device']}, budget {budget}")
    print(f"evaluation of one {result['eval_image'][0]}x{result['eval_image'][1]} val image, {result['eval_setting']}"
          + (f" + {result['sweep_combinations']} sweep combinations" if result["sweep_combinations"] else "") + ":")
    print(table)
    print(f"chosen: {result['chosen'] or 'none fits (evaluation would stop before the first image)'}")
    fits = "" if result["train_fits"] is None else (" (fits)" if result["train_fits"] else " (does NOT fit)")
    procs = f", {result['world_size']} processes" if result["world_size"] > 1 else ""
    print(f"training step ({result['train_step']}{procs}): {format_bytes(result['train_peak_bytes'])}{fits}")
    return result


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
