"""The workloads of `python -m scripts.bench.multiscale --against REV`, in a form that runs unchanged in any revision.

scripts/bench/multiscale.py copies this file out of the tree and starts it with the working directory and PYTHONPATH of the
revision to measure (the working tree, or a temporary `git worktree` of REV), so that every import below resolves
to that revision's code. It therefore uses only what every revision since the first benchmarked one provides:
    network.build_model, loss.build_criterion, utils.config.LossConfig / Config, train.build_optimizer, torch;
and it applies what that revision's own entry points do by default:
  * train.py converts the model and the images to channels-last when `run.channels_last` (before the config
    rename: `train.channels_last`) is true, and builds its optimizer with `train.build_optimizer`;
  * train.py and eval.py place the model with `utils.runtime.layout.place_model` (channels-last when
    `run.channels_last`; in the revisions with `run.host_memory`, freed host memory kept for reuse when it is
    `retain`, and that place_model takes it as a fourth argument); a revision without that module evaluated in the
    default (contiguous) layout and left malloc as it is. The CPU tuning of later revisions (`run.cpu_tuning`) is
    off by default, so their place_model is the whole placement.
The timed calls are the training step (forward, RMI recipe loss, backward, optimizer step) on a fixed batch, and
the n-scale inference `model(images, scales)` under inference_mode (what both evaluation paths compute: the
benchmark's `predict()` column is within 0.98-1.05x of it). Times are the process's CPU time.

Not started by path as a project script: it must not re-run itself inside the working tree.
    python DRIVER init --model NAME --options JSON --weights FILE
    python DRIVER run --workload train|eval --model NAME --options JSON --weights FILE [--calls N] [--check] ...
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch

NUM_CLASSES = 19
IGNORE = 255
WARMUP = {"train": 2, "eval": 1}  # untimed calls per process
LEARNING = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}  # the schema's SGD defaults, pinned for the check


def revision_defaults() -> dict[str, Any]:
    """What this revision's train.py and eval.py do by default on a CPU in fp32."""
    from utils.config import Config

    cfg = Config()
    section = getattr(cfg, "run", None) or cfg.train
    train_cl = bool(getattr(section, "channels_last", False))
    try:
        from utils.runtime.layout import place_model
    except ImportError:
        place_model = None
    memory = getattr(section, "host_memory", None)
    return {"cfg": cfg, "train_channels_last": train_cl, "eval_channels_last": train_cl and place_model is not None,
            "place_model": place_model, "retain_memory": memory == "retain",
            "memory_argument": () if memory is None else (memory == "retain",)}


def build(args: argparse.Namespace) -> torch.nn.Module:
    import network

    torch.manual_seed(0)
    return network.build_model(args.model, NUM_CLASSES, **json.loads(args.options))


def inputs(args: argparse.Namespace, size: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, *size, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (n, *size), generator=gen)
    target[torch.rand(n, *size, generator=gen) < 0.1] = IGNORE
    return images, target


def optimizer(defaults: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """The revision's optimizer (its kernel choice: for-loop, foreach, fused) at pinned hyper-parameters."""
    from train import build_optimizer

    opt = build_optimizer(defaults["cfg"], model)
    for group in opt.param_groups:
        group.update(LEARNING)
    return opt


def train_call(args: argparse.Namespace, defaults: dict[str, Any], model: torch.nn.Module, dtype: torch.dtype,
               channels_last: bool) -> tuple[Callable[[], dict[str, torch.Tensor]], torch.optim.Optimizer]:
    from loss import build_criterion
    from utils.config import LossConfig

    images, target = inputs(args, args.crop, args.batch)
    images = images.to(dtype)
    model.to(dtype).train()
    if defaults["place_model"] is not None:  # as the revision's train.py places it
        defaults["place_model"](model, torch.device("cpu"), channels_last, *defaults["memory_argument"])
    elif channels_last:
        model.to(memory_format=torch.channels_last)
    if channels_last:  # as its train step moves the images
        images = images.contiguous(memory_format=torch.channels_last)
    # the original's Cityscapes RMI recipe: main RMI, auxiliary BCE x 0.4, each scale's own output BCE x 0.05
    criterion = build_criterion(LossConfig(main="rmi", aux="bce", scale="bce", aux_weight=0.4, scale_weight=0.05),
                                NUM_CLASSES, IGNORE)
    opt = optimizer(defaults, model) if dtype == torch.float32 else torch.optim.SGD(model.parameters(), **LEARNING)

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        outputs = model(images)
        total, _ = criterion(outputs, target)
        total.backward()
        opt.step()
        return outputs

    return step, opt


def eval_call(args: argparse.Namespace, defaults: dict[str, Any], model: torch.nn.Module, dtype: torch.dtype,
              channels_last: bool) -> Callable[[], dict[str, torch.Tensor]]:
    images, _ = inputs(args, args.eval_size, 1)
    images = images.to(dtype)
    model.to(dtype).eval()
    if defaults["place_model"] is not None:
        model = defaults["place_model"](model, torch.device("cpu"), channels_last, *defaults["memory_argument"])

    def infer() -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = model(images, scales=args.scales)
            out["pred"].max(1)  # the evaluation's arg-max
            return out

    return infer


def make(args: argparse.Namespace, defaults: dict[str, Any], dtype: torch.dtype):
    model = build(args)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    if args.workload == "train":
        return (model, *train_call(args, defaults, model, dtype, defaults["train_channels_last"]
                                   and dtype == torch.float32))
    return model, eval_call(args, defaults, model, dtype, defaults["eval_channels_last"] and dtype == torch.float32), None


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten() for k in sorted(tensors)])


def rel_err(ref: torch.Tensor, value: torch.Tensor) -> float:
    return 0.0 if torch.equal(value, ref) else ((value - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def first_call(model: torch.nn.Module, fn: Callable[[], dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fused prediction, all outputs flattened to float64, parameter update) of the first call; dropout seeded."""
    params = dict(model.named_parameters())
    before = flat(params)
    torch.manual_seed(3)
    outputs = fn()
    return outputs["pred"].detach(), flat(outputs), flat(params) - before


def check(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Errors of the first call's outputs and update against the same computation in float64 (in this revision);
    the fused prediction is saved for the comparison between revisions."""
    model, fn, _ = make(args, defaults, torch.float64)
    _, ref_out, ref_update = first_call(model, fn)
    del model, fn
    model, fn, _ = make(args, defaults, torch.float32)
    pred, out, update = first_call(model, fn)
    torch.save(pred.float().contiguous(), args.check)
    result = {"output_err": rel_err(ref_out, out)}
    if args.workload == "train":
        result["update_err"] = rel_err(ref_update, update)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("init", "run"))
    p.add_argument("--workload", choices=("train", "eval"), default="train")
    p.add_argument("--model", required=True)
    p.add_argument("--options", default="{}", help="factory options as JSON")
    p.add_argument("--weights", required=True, help="state dict file (written by init, read by run)")
    p.add_argument("--crop", type=int, nargs=2, default=(256, 256))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eval-size", type=int, nargs=2, default=(256, 512))
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--calls", type=int, default=2, help="timed calls after the warm-up calls (WARMUP)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check", default="", help="instead of timing: errors vs float64; save the prediction here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "init":
        torch.save(build(args).state_dict(), args.weights)
        print(json.dumps({"weights": args.weights}))
        return 0
    defaults = revision_defaults()
    info = {"train_channels_last": defaults["train_channels_last"],
            "eval_channels_last": defaults["eval_channels_last"],
            "retain_memory": defaults["retain_memory"] and defaults["place_model"] is not None}
    if args.check:
        print(json.dumps({**info, **check(args, defaults)}))
        return 0
    model, fn, opt = make(args, defaults, torch.float32)
    if args.workload == "train":  # convolutions the revision's placement gave another class (weight-gradient routes)
        info["routed_convs"] = sum(isinstance(m, torch.nn.Conv2d) and type(m) is not torch.nn.Conv2d
                                   for m in model.modules())
    if opt is not None:
        group = opt.param_groups[0]
        info["optimizer"] = f"{type(opt).__name__} foreach={group.get('foreach')} fused={group.get('fused')}"
    # warm-up: allocations, oneDNN primitive caches; in training also the optimizer's first step, which creates
    # the momentum buffers, so that the timed calls run at the steady memory peak of a long run
    for _ in range(WARMUP[args.workload]):
        fn()
    times = []
    for _ in range(args.calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    print(json.dumps({**info, "seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
