"""Speed and memory of hierarchical multi-scale attention against single scale, measured side by side.

    python -m scripts.bench.multiscale --out bench.json                   # CPU: narrow models at small sizes (minutes)
    python -m scripts.bench.multiscale --device cuda --full --out gpu.json  # GPU: full models at the recipe sizes
    python -m scripts.bench.multiscale --sections train opt --compile       # some sections; torch.compile rows too
    python -m scripts.bench.multiscale --against 004bb91 --width full --rounds 3  # the working tree against a revision

Sections (each printed as a markdown table, all saved to --out as JSON):
  train   training step (forward, loss, backward, SGD step) of each multi-scale model and of its single-scale
          counterpart at the same crop and batch: the ratio (theory 1.25x, target <= 1.35x), the FLOP ratio, the
          phases of the multi-scale step, and the RMI loss's share of it.
  infer   n-scale inference for each scale set: time, ratio to the sum of the single-scale passes it contains
          (target <= 1.10x), the same for the evaluation path (utils.engine.predict), peak memory.
  data    data pipeline throughput (datasets.build_loader on generated images) against the step it feeds.
  opt     each optimisation flag on the paper's model: time against the baseline, and the output difference.
  recipe  the full models at the recipe sizes, counted on fake tensors: training-step FLOP ratios, and peak memory
          (the Mapillary evaluation target is < 24 GB in fp16/bf16); the memory is measured as well on a GPU.
Timings interleave the compared candidates round by round and report medians; ratios are medians of per-round
ratios. On a CPU they are the process's CPU time (the data section, with its worker processes, excepted: wall
time), which other jobs on a shared machine inflate far less than wall time. Compare ratios, not absolute times,
between runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import network
from loss import build_criterion
from loss.rmi import RMILoss
from network.layers import rescale, scaled_size
from scripts.bench.memory import PeakMemory, estimate_peak
from utils.config import DataConfig, LossConfig, SyntheticConfig
from utils.engine import train_step
from utils.inference import Inference
from utils.runtime.cpu_tuning import tune_for_cpu
from utils.runtime.layout import place_model
from utils.runtime.precision import autocast, grad_scaler

PAIRS = {"hmsa_deeplabv3plus": "deeplabv3plus", "hmsa_ocrnet_hrnet_w48": "ocrnet_hrnet_w48"}
PAPER_MODEL = "hmsa_ocrnet_hrnet_w48"
# Model widths. full: the published models. narrow: the CPU default. tiny: the test suite.
WIDTHS = {
    "full": {"hmsa_deeplabv3plus": {}, "hmsa_ocrnet_hrnet_w48": {}},
    "narrow": {
        "hmsa_deeplabv3plus": {"trunk": "resnet18", "aspp_ch": 64, "fine_ch": 32, "head_ch": 64, "attn_ch": 64},
        "hmsa_ocrnet_hrnet_w48": {"trunk": "hrnet_w18_small", "mid_ch": 64, "key_ch": 32, "attn_ch": 64},
    },
    "tiny": {
        "hmsa_deeplabv3plus": {"trunk": "resnet10t", "aspp_ch": 16, "fine_ch": 8, "head_ch": 16, "attn_ch": 16},
        "hmsa_ocrnet_hrnet_w48": {"trunk": "hrnet_w18_small", "mid_ch": 16, "key_ch": 8, "attn_ch": 16},
    },
}
SCALE_SETS = ((1.0,), (0.5, 1.0), (0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0))
SECTIONS = ("train", "infer", "data", "opt", "recipe")
NUM_CLASSES = 19  # Cityscapes
IGNORE = 255
# The original's Cityscapes RMI recipe: main RMI, auxiliary BCE x 0.4, each scale's own prediction BCE x 0.05.
RECIPE_LOSS = LossConfig(main="rmi", aux="bce", scale="bce", aux_weight=0.4, scale_weight=0.05)
TRAIN_RATIO_TARGET = 1.35
INFER_RATIO_TARGET = 1.10
MAPILLARY_TARGET_GB = 24.0
# Dense tensor-core peaks (TFLOP/s) for model FLOPs utilisation; fp32 convolutions run as TF32 (cuDNN default).
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H200": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0},
}


def model_options(width: str, name: str) -> dict[str, Any]:
    """Factory options of model `name` (multi- or single-scale) at a width of WIDTHS."""
    ms_name = name if name in PAIRS else next(k for k, v in PAIRS.items() if v == name)
    opts = dict(WIDTHS[width][ms_name])
    if name not in PAIRS:
        opts.pop("attn_ch", None)
    return opts


@dataclass(frozen=True)
class Recipe:
    """The published HRNet-OCR sizes the `recipe` section counts on fake tensors (and measures on a GPU)."""

    width: str = "full"
    train_crops: tuple[tuple[tuple[int, int], int], ...] = (((1024, 1024), 2), ((1024, 2048), 1))  # (crop, batch)
    mapillary_eval: tuple[int, int] = (1633, 2177)  # long edge 2177; Mapillary images are mostly 4:3
    cityscapes_eval: tuple[int, int] = (1024, 2048)

    def options(self, name: str) -> dict[str, Any]:
        return model_options(self.width, name)


MAPILLARY_SCALES = [0.25, 0.5, 1.0, 2.0]


@dataclass(frozen=True)
class Setup:
    device: torch.device
    width: str
    crop: tuple[int, int]
    batch: int
    eval_size: tuple[int, int]
    rounds: int
    warmup: int
    precision: str  # of the train/infer sections; the opt section compares precisions itself
    workers: int
    data_batches: int
    compile: bool
    peak_tflops: float | None
    recipe: Recipe = field(default_factory=Recipe)
    threads: int = 1  # torch threads on a CPU (each --against process too)


# ----------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on a GPU (synchronised); on a CPU the process's CPU time, which time slices given to other jobs
    on a shared machine do not inflate (with one thread it is the step's compute time)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def interleaved(cands: dict[str, Callable[[], Any]], setup: Setup) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call of each per round (warm-up calls first); every other round
    runs in reverse order, so that no candidate always follows the same one."""
    for fn in cands.values():
        for _ in range(setup.warmup):
            fn()
    now = clock(setup.device)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(setup.rounds):
        for key, fn in list(cands.items())[:: -1 if r % 2 else 1]:
            sync(setup.device)
            start = now()
            fn()
            sync(setup.device)
            times[key].append(now() - start)
    return times


def med_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios."""
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------------------------- building blocks


def build(name: str, setup: Setup, seed: int = 0, **extra: Any) -> nn.Module:
    torch.manual_seed(seed)
    return network.build_model(name, NUM_CLASSES, **model_options(setup.width, name), **extra).to(setup.device)


def batch(setup: Setup, size: tuple[int, int], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels (10% ignored) on the device."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *size, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (n, *size), generator=gen)
    target[torch.rand(n, *size, generator=gen) < 0.1] = IGNORE
    return images.to(setup.device), target.to(setup.device)


@dataclass
class Trainer:
    """The training step of train.py (utils.engine.train_step) on a fixed batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    target: torch.Tensor
    precision: str = "fp32"
    host_sync: bool = False  # read every loss term on the host each step, as a loop that logs every step does
    cudnn_benchmark: bool | None = None  # set around the step (None: leave as it is)

    def __post_init__(self) -> None:
        self.criterion = build_criterion(RECIPE_LOSS, NUM_CLASSES, IGNORE)
        self.scaler = grad_scaler(self.precision, self.images.device)

    def forward(self) -> dict[str, torch.Tensor]:
        with autocast(self.precision, self.images.device):
            return self.model(self.images)

    def step(self) -> dict[str, torch.Tensor]:
        """One training step; returns the forward's outputs."""
        previous = torch.backends.cudnn.benchmark
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        seen: list[dict[str, torch.Tensor]] = []

        def criterion(outputs, target):
            seen.append(outputs)
            return self.criterion(outputs, target)

        terms = train_step(self.model, [{"image": self.images, "mask": self.target}], criterion, self.optimizer,
                           self.scaler, precision=self.precision, device=self.images.device)
        if self.host_sync:
            for value in terms.values():
                float(value)
        torch.backends.cudnn.benchmark = previous
        return seen[0]

    def phases(self) -> dict[str, float]:
        """Seconds of each phase of one step (synchronised between phases)."""
        dev = self.images.device
        now = clock(dev)
        marks = [now()]

        def mark() -> None:
            sync(dev)
            marks.append(now())

        outputs = self.forward()
        mark()
        total, _ = self.criterion(outputs, self.target)
        mark()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        mark()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        mark()
        return dict(zip(("forward", "loss", "backward", "optimizer"), (b - a for a, b in zip(marks, marks[1:]))))


def sgd(model: nn.Module, **kwargs: Any) -> torch.optim.SGD:
    """The original's optimizer: one group, momentum 0.9, weight decay 1e-4 on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, **kwargs)


def step_flops(trainer: Trainer) -> int:
    """FLOPs of one training step (convolutions and matmuls, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        trainer.step()
    return counter.get_total_flops()


def peak_tflops(setup: Setup, precision: str) -> float | None:
    if setup.peak_tflops is not None:
        return setup.peak_tflops
    if setup.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(setup.device)
    for key, peaks in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return peaks[precision]
    return None


# ----------------------------------------------------------------------------------------------- sections


def bench_train(setup: Setup) -> list[dict[str, Any]]:
    rows = []
    for ms_name, ss_name in PAIRS.items():
        images, target = batch(setup, setup.crop, setup.batch)
        ss_model, ms_model = build(ss_name, setup).train(), build(ms_name, setup).train()
        ss = Trainer(ss_model, sgd(ss_model), images, target, setup.precision)
        ms = Trainer(ms_model, sgd(ms_model), images, target, setup.precision)
        # the single-scale step on the 0.5x crop: what the low-scale pass costs (theory: 0.25 of the full crop)
        half_images, half_target = batch(setup, scaled_size(*setup.crop, 0.5), setup.batch)
        half_model = build(ss_name, setup).train()
        half = Trainer(half_model, sgd(half_model), half_images, half_target, setup.precision)
        flops_ss, flops_ms = step_flops(ss), step_flops(ms)
        with torch.no_grad(), autocast(setup.precision, setup.device):
            outputs = ms.model(images)
        leaves = {k: v.detach().float().requires_grad_() for k, v in outputs.items()}
        rmi = RMILoss(NUM_CLASSES, IGNORE)

        def loss_call(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                for v in leaves.values():
                    v.grad = None
                fn().backward()

            return run

        times = interleaved(
            {
                "single": ss.step,
                "multi": ms.step,
                "half": half.step,
                "criterion": loss_call(lambda: ms.criterion(leaves, target)[0]),
                "rmi": loss_call(lambda: rmi(leaves["pred"], target)),
            },
            setup,
        )
        phases = [ms.phases() for _ in range(max(1, setup.rounds // 2))]
        step_s = statistics.median(times["multi"])
        peak = peak_tflops(setup, setup.precision)
        rows.append(
            {
                "model": ms_name,
                "single_model": ss_name,
                "crop": list(setup.crop),
                "batch": setup.batch,
                "precision": setup.precision,
                "single_ms": med_ms(times["single"]),
                "multi_ms": med_ms(times["multi"]),
                "ratio": ratio(times["multi"], times["single"]),
                "half_crop_ratio": ratio(times["half"], times["single"]),
                "flop_ratio": flops_ms / flops_ss,
                "multi_gflop": flops_ms / 1e9,
                "images_per_s": setup.batch / step_s,
                "achieved_tflops": flops_ms / step_s / 1e12,
                "mfu": (flops_ms / step_s / 1e12 / peak) if peak else None,
                "phases_ms": {k: med_ms([p[k] for p in phases]) for k in phases[0]},
                "criterion_ms": med_ms(times["criterion"]),
                "rmi_ms": med_ms(times["rmi"]),
                "criterion_share": ratio(times["criterion"], times["multi"]),
                "rmi_share": ratio(times["rmi"], times["multi"]),
            }
        )
        del ss, ms, half, ss_model, ms_model, half_model, leaves, outputs
    return rows


def bench_infer(setup: Setup) -> list[dict[str, Any]]:
    from utils.engine import predict  # the evaluation path (utils.inference.MultiScalePass)

    rows = []
    singles = sorted({s for scales in SCALE_SETS for s in scales})
    for ms_name in PAIRS:
        model = build(ms_name, setup).eval()
        x, _ = batch(setup, setup.eval_size, 1)

        def call(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with torch.inference_mode(), autocast(setup.precision, setup.device):
                    return fn()

            return run

        cands: dict[str, Callable[[], Any]] = {}
        for s in singles:
            cands[f"single {s}"] = call(lambda s=s: model.single_forward(rescale(x, s)))
        for scales in SCALE_SETS:
            cands[f"nscale {scales}"] = call(lambda scales=scales: model(x, scales=list(scales)))
            cands[f"predict {scales}"] = call(lambda scales=scales: predict(model, x, Inference.make(scales)))
        times = interleaved(cands, setup)
        peaks = {}
        for key, fn in cands.items():
            with PeakMemory(setup.device) as mem:
                fn()
            peaks[key] = mem.peak
        for scales in SCALE_SETS:
            sums = [sum(times[f"single {s}"][r] for s in scales) for r in range(setup.rounds)]
            rows.append(
                {
                    "model": ms_name,
                    "size": list(setup.eval_size),
                    "scales": list(scales),
                    "precision": setup.precision,
                    "nscale_ms": med_ms(times[f"nscale {scales}"]),
                    "singles_sum_ms": med_ms(sums),
                    "ratio": ratio(times[f"nscale {scales}"], sums),
                    "predict_ms": med_ms(times[f"predict {scales}"]),
                    "predict_ratio": ratio(times[f"predict {scales}"], sums),
                    "nscale_peak_mib": peaks[f"nscale {scales}"] / 2**20,
                    "predict_peak_mib": peaks[f"predict {scales}"] / 2**20,
                    "single_peak_mib": max(peaks[f"single {s}"] for s in scales) / 2**20,
                }
            )
        del model
    return rows


def bench_data(setup: Setup, train_rows: Sequence[dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
    """Images per second out of the training loader, against the multi-scale step's images per second."""
    from datasets import build_dataset, build_loader, generate_synthetic_cityscapes

    height, width = setup.eval_size  # source images at the evaluation size, cropped to the training crop
    count = (setup.data_batches + 2) * setup.batch
    root = os.path.join(workdir, "synthetic_cityscapes")
    generate_synthetic_cityscapes(root, num_train=count, num_val=1, height=height, width=width, seed=0)
    cfg = DataConfig.make(
        root=root,
        synthetic=SyntheticConfig(num_train=count, num_val=1, height=height, width=width),
        crop_size=tuple(setup.crop),
        batch_size=setup.batch,
        num_workers=setup.workers,
    )
    loader = build_loader(build_dataset(cfg, "train", train=True), cfg, train=True)
    batches = iter(loader)
    next(batches)  # workers started, first batch out
    start = time.perf_counter()
    for _ in range(setup.data_batches):
        next(batches)
    images_per_s = setup.data_batches * setup.batch / (time.perf_counter() - start)
    del batches, loader
    return [
        {
            "model": row["model"],
            "source_size": [height, width],
            "crop": list(setup.crop),
            "workers": setup.workers,
            "data_images_per_s": images_per_s,
            "step_images_per_s": row["images_per_s"],
            "headroom": images_per_s / row["images_per_s"],
        }
        for row in train_rows
    ]


# ----------------------------------------------------------------------------------------------- optimisations


def rel_err(ref: torch.Tensor, value: torch.Tensor) -> float:
    """||value - ref|| / ||ref|| (0.0 when bit-equal)."""
    value = value.double()
    return 0.0 if torch.equal(value, ref) else ((value - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten() for k in sorted(tensors)])


UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def verdict(out_err: float, base_out_err: float, same: bool, precision: str) -> str:
    """How a variant's outputs compare with float64: bit-equal to the fp32 baseline (outputs and update); as close
    as the baseline, within 10x (fp32 rounding); or, in a lower precision, no further than the baseline's error
    scaled by the ratio of unit roundoffs (the network amplifies rounding alike in every precision).

    Only the outputs decide: some gradients (e.g. of a bias followed by BatchNorm, exactly zero in theory) are
    rounding noise in any precision, so the update error, reported beside, says little about the variant.
    """
    if same:
        return "bit-equal"
    floor = max(base_out_err, 1e-7)
    if out_err <= 10 * floor:
        return "fp32 rounding"
    if precision != "fp32" and out_err <= floor * UNIT_ROUNDOFF[precision] / UNIT_ROUNDOFF["fp32"]:
        return f"{precision} rounding"
    return "DIFFERS"


def channels_last(model: nn.Module, *tensors: torch.Tensor) -> tuple[Any, ...]:
    return (model.to(memory_format=torch.channels_last),
            *(t.contiguous(memory_format=torch.channels_last) for t in tensors))


def _train_variants(setup: Setup) -> dict[str, dict[str, Any]]:
    low = "fp16" if setup.device.type == "cuda" else "bf16"
    variants: dict[str, dict[str, Any]] = {
        "baseline (fp32, attention BN statistics of both passes, as the original)": {},
        # what the default's no_grad 1.0x pass of the attention head costs: its speed-up is the cost
        "attention BN statistics of the 0.5x pass only (attn_bn_stats=low)": {"model": {"attn_bn_stats": "low"}},
        "host sync every step": {"host_sync": True},
        "SGD foreach": {"sgd": {"foreach": True}},
        "SGD fused": {"sgd": {"fused": True}},
        "channels-last": {"channels_last": True},
        # what train.py adds with run.cpu_tuning: on a CPU the weight-gradient routing
        "channels-last with run.cpu_tuning (CPU: weight gradients routed by shape)": {"cpu_tuning": True},
        f"autocast {low}": {"precision": low},
    }
    if setup.device.type == "cuda":
        variants["autocast bf16"] = {"precision": "bf16"}
        variants["cudnn.benchmark"] = {"cudnn_benchmark": True}
    if setup.compile:
        variants["torch.compile"] = {"compile": True}
    return variants


def _train_candidate(setup: Setup, state: dict[str, torch.Tensor], spec: dict[str, Any],
                     dtype: torch.dtype = torch.float32) -> Trainer:
    model = build(PAPER_MODEL, setup, **spec.get("model", {})).train()
    model.load_state_dict(state)
    model.to(dtype)
    images, target = batch(setup, setup.crop, setup.batch)
    images = images.to(dtype)
    if spec.get("channels_last"):
        model, images = channels_last(model, images)
    if spec.get("cpu_tuning"):
        model = place_model(model, setup.device, channels_last=True)
        tune_for_cpu(model, setup.device)
        images = images.contiguous(memory_format=torch.channels_last)
    trainer = Trainer(model, sgd(model, **spec.get("sgd", {})), images, target, spec.get("precision", "fp32"),
                      spec.get("host_sync", False), spec.get("cudnn_benchmark"))
    if spec.get("compile"):
        trainer.model = torch.compile(model)
    return trainer


def _first_step(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first step's outputs, its parameter update), flattened to float64; dropout seeded alike."""
    params = dict(trainer.model.named_parameters())
    before = flat(params)
    torch.manual_seed(3)
    outputs = trainer.step()
    return flat(outputs), flat(params) - before


def bench_opt(setup: Setup) -> list[dict[str, Any]]:
    """Each flag on the paper's model against the fp32 baseline: time, and the error of the first training
    step's outputs and parameter update (inference: the outputs) against the same computation in float64."""
    rows = []
    state = copy.deepcopy(build(PAPER_MODEL, setup).state_dict())
    ref_out, ref_update = _first_step(_train_candidate(setup, state, {}, torch.float64))
    variants = _train_variants(setup)
    trainers = {name: _train_candidate(setup, state, spec) for name, spec in variants.items()}
    base = next(iter(variants))
    base_out, base_update = _first_step(trainers[base])
    checks = {}  # errors computed at once: the flattened outputs are large at the recipe sizes
    for name, spec in variants.items():
        out, update = (base_out, base_update) if name == base else _first_step(trainers[name])
        err = rel_err(ref_out, out)
        same = torch.equal(out, base_out) and torch.equal(update, base_update)
        checks[name] = (err, rel_err(ref_update, update),
                        verdict(err, rel_err(ref_out, base_out), same, spec.get("precision", "fp32")))
        del out, update
    del ref_out, ref_update, base_out, base_update
    times = interleaved({name: t.step for name, t in trainers.items()}, setup)
    for name in variants:
        rows.append(_opt_row("train step", name, times, base, *checks[name]))
    del trainers

    model = build(PAPER_MODEL, setup).eval()
    model.load_state_dict(state)
    x, _ = batch(setup, setup.eval_size, 1)
    scales = [0.5, 1.0, 2.0]
    low = "fp16" if setup.device.type == "cuda" else "bf16"
    cl_model, cl_x = channels_last(copy.deepcopy(model), x)
    infer: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], str]] = {
        "baseline (inference_mode, fp32)": (lambda: _infer(model, x, scales, torch.inference_mode), "fp32"),
        "no_grad instead of inference_mode": (lambda: _infer(model, x, scales, torch.no_grad), "fp32"),
        "channels-last": (lambda: _infer(cl_model, cl_x, scales, torch.inference_mode), "fp32"),
        f"autocast {low}": (lambda: _infer(model, x, scales, torch.inference_mode, low), low),
    }
    if setup.device.type == "cuda":
        infer["autocast bf16"] = (lambda: _infer(model, x, scales, torch.inference_mode, "bf16"), "bf16")
    if setup.compile:
        compiled = torch.compile(model)
        infer["torch.compile"] = (lambda: _infer(compiled, x, scales, torch.inference_mode), "fp32")
    ref = flat(_infer(copy.deepcopy(model).double(), x.double(), scales, torch.inference_mode))
    base = next(iter(infer))
    base_out = flat(infer[base][0]())
    base_err = rel_err(ref, base_out)
    checks = {}
    for name, (fn, precision) in infer.items():
        out = base_out if name == base else flat(fn())
        err = rel_err(ref, out)
        checks[name] = (err, None, verdict(err, base_err, torch.equal(out, base_out), precision))
        del out
    del ref, base_out
    times = interleaved({name: fn for name, (fn, _) in infer.items()}, setup)
    for name in infer:
        rows.append(_opt_row(f"inference {scales}", name, times, base, *checks[name]))
    return rows


def _infer(model: nn.Module, x: torch.Tensor, scales: list[float], mode: Callable[[], Any],
           precision: str = "fp32") -> dict[str, torch.Tensor]:
    with mode(), autocast(precision, x.device):
        return model(x, scales=scales)


def _opt_row(phase: str, name: str, times: dict[str, list[float]], base: str, out_err: float,
             update_err: float | None, outputs: str) -> dict[str, Any]:
    return {
        "phase": phase,
        "variant": name,
        "ms": med_ms(times[name]),
        "speedup": ratio(times[base], times[name]),
        "output_err": out_err,
        "update_err": update_err,
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------------------------- memory


def bench_recipe(setup: Setup) -> dict[str, list[dict[str, Any]]]:
    """FLOP ratios of the full models' training steps and peak memory of the published HRNet-OCR configurations
    at their real sizes, counted on fake tensors (shapes only: seconds on a CPU); measured as well on a GPU."""
    return {"flops": _recipe_flops(setup.recipe), "memory": _recipe_memory(setup)}


def _fake_step_flops(recipe: Recipe, name: str, crop: tuple[int, int], n: int, **extra: Any) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = network.build_model(name, NUM_CLASSES, **recipe.options(name), **extra).train()
        images, target = torch.empty(n, 3, *crop), torch.zeros(n, *crop, dtype=torch.long)
        return step_flops(Trainer(model, sgd(model), images, target))


def _recipe_flops(recipe: Recipe) -> list[dict[str, Any]]:
    crop, n = recipe.train_crops[0]
    rows = []
    for ms_name, ss_name in PAIRS.items():
        single = _fake_step_flops(recipe, ss_name, crop, n)
        multi = _fake_step_flops(recipe, ms_name, crop, n)
        low = _fake_step_flops(recipe, ms_name, crop, n, attn_bn_stats="low")
        rows.append({"model": ms_name, "width": recipe.width, "crop": list(crop), "batch": n,
                     "single_tflop": single / 1e12, "multi_tflop": multi / 1e12, "ratio": multi / single,
                     "low_tflop": low / 1e12, "low_ratio": low / single})
    return rows


def _recipe_memory(setup: Setup) -> list[dict[str, Any]]:
    from utils.engine import predict

    recipe = setup.recipe

    def eval_case(size: tuple[int, int], classes: int, scales: list[float], flip: bool, precision: str,
                  label: str) -> dict[str, Any]:
        def run(model: nn.Module, x: torch.Tensor) -> None:
            with torch.inference_mode():
                predict(model, x, Inference.make(scales, flip=flip))

        est = estimate_peak(
            lambda: network.build_model(PAPER_MODEL, classes, **recipe.options(PAPER_MODEL)).eval(),
            lambda: (torch.empty(1, 3, *size),),
            run,
            precision,
        )
        target = MAPILLARY_TARGET_GB if classes == 65 and precision != "fp32" else None
        return _memory_row(label, size, scales, flip, precision, est, target)

    rows = [
        eval_case(recipe.mapillary_eval, 65, MAPILLARY_SCALES, True, "fp16", "Mapillary eval, predict()"),
        eval_case(recipe.mapillary_eval, 65, MAPILLARY_SCALES, True, "fp32", "Mapillary eval, predict()"),
        eval_case(recipe.cityscapes_eval, 19, [0.5, 1.0, 2.0], False, "fp16", "Cityscapes eval, predict()"),
    ]

    def train_run(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
        Trainer(model, sgd(model), x, target, "bf16").step()  # fp16 alike, but its loss scaler reads values

    for crop, n in recipe.train_crops:
        est = estimate_peak(
            lambda: network.build_model(PAPER_MODEL, NUM_CLASSES, **recipe.options(PAPER_MODEL)).train(),
            lambda crop=crop, n=n: (torch.empty(n, 3, *crop), torch.zeros(n, *crop, dtype=torch.long)),
            train_run,
            "bf16",
        )
        rows.append(_memory_row(f"training step, batch {n}, RMI recipe loss", crop, [0.5, 1.0], False, "bf16",
                                est, None))
    if setup.device.type == "cuda":
        rows.extend(_measured_memory(setup))
    return rows


def _memory_row(label: str, size: Sequence[int], scales: Sequence[float], flip: bool, precision: str,
                est: dict[str, int], target_gb: float | None) -> dict[str, Any]:
    return {
        "case": label,
        "size": list(size),
        "scales": list(scales),
        "flip": flip,
        "precision": precision,
        "how": "estimated (fake tensors)",
        "peak_gib": est["peak"] / 2**30,
        "weights_inputs_gib": est["static"] / 2**30,
        "target_gib": target_gb,
    }


def _measured_memory(setup: Setup) -> list[dict[str, Any]]:
    """The Mapillary evaluation for real on the GPU (random weights: the memory does not depend on them)."""
    from utils.engine import predict

    rows = []
    size = setup.recipe.mapillary_eval
    model = network.build_model(PAPER_MODEL, 65, **setup.recipe.options(PAPER_MODEL)).eval().to(setup.device)
    x = torch.randn(1, 3, *size, device=setup.device)
    for precision in ("fp16", "bf16"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
        with torch.inference_mode(), autocast(precision, setup.device):
            predict(model, x, Inference.make(MAPILLARY_SCALES, flip=True))
        sync(setup.device)
        row = _memory_row("Mapillary eval, predict()", size, MAPILLARY_SCALES, True, precision,
                          {"peak": torch.cuda.max_memory_allocated(setup.device), "static": 0}, MAPILLARY_TARGET_GB)
        row.update(how="measured (max_memory_allocated)", weights_inputs_gib=None,
                   reserved_gib=torch.cuda.max_memory_reserved(setup.device) / 2**30)
        rows.append(row)
    del model, x
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- --against REV

AGAINST_WORKLOADS = tuple((w, m) for w in ("eval", "train") for m in PAIRS)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class AgainstError(RuntimeError):
    """A revision that cannot be checked out or whose driver run fails (message says which and why)."""


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise AgainstError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _drive(tree: str, driver: str, args: list[str], threads: int) -> dict[str, Any]:
    """One process of scripts/bench/driver.py with `tree`'s code (working directory and PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, driver, *args, "--threads", str(threads)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise AgainstError(f"the benchmark driver failed in {tree} ({' '.join(args[:3])}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_against(setup: Setup, rev: str, calls: int, workdir: str,
                  workloads: Sequence[str] = ("eval", "train")) -> dict[str, Any]:
    """The working tree against revision `rev` (checked out into a temporary git worktree, removed afterwards):
    each workload in alternating processes, round by round (the order reversed every other round); per-round
    ratios of the median times, and each revision's first-call errors against float64."""
    found = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    sha = found.stdout.strip() if found.returncode == 0 else ""
    if not sha:
        raise AgainstError(f"--against {rev!r}: not a commit of this repository (try a hash, a branch or HEAD~1)")
    tree = tempfile.mkdtemp(prefix="hmsa_against_")
    _git("worktree", "add", "--detach", tree, sha)
    try:
        driver = os.path.join(workdir, "bench_driver.py")  # outside both trees: its own folder shadows nothing
        shutil.copy(os.path.join(ROOT, "scripts", "bench", "driver.py"), driver)
        trees = {"ours": ROOT, "theirs": tree}
        common: dict[str, list[str]] = {}
        for workload, name in [w for w in AGAINST_WORKLOADS if w[0] in workloads]:
            weights = os.path.join(workdir, f"{name}.pt")
            opts = ["--model", name, "--options", json.dumps(model_options(setup.width, name)), "--weights", weights]
            if not os.path.exists(weights):  # the same weights in both revisions
                _drive(ROOT, driver, ["init", *opts], 1)
            common[f"{workload} {name}"] = ["run", "--workload", workload, *opts, "--crop", *map(str, setup.crop),
                                            "--batch", str(setup.batch), "--eval-size", *map(str, setup.eval_size)]
        checks: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in common}
        diffs: dict[str, float] = {}
        for key, args in common.items():
            preds = {}
            for who, path in trees.items():
                pred_file = os.path.join(workdir, f"{who}.pred.pt")
                checks[key][who] = _drive(path, driver, [*args, "--check", pred_file], setup.threads)
                preds[who] = torch.load(pred_file, weights_only=True).double()
            diffs[key] = rel_err(preds["theirs"], preds["ours"])
        load = [os.getloadavg()[0]]
        times: dict[str, dict[str, list[list[float]]]] = {key: {who: [] for who in trees} for key in common}
        info: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in common}
        for r in range(setup.rounds):
            for key, args in common.items():
                for who in list(trees)[:: -1 if r % 2 else 1]:
                    out = _drive(trees[who], driver, [*args, "--calls", str(calls)], setup.threads)
                    times[key][who].append(out.pop("seconds"))
                    info[key][who] = out
            load.append(os.getloadavg()[0])
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "-C", ROOT, "worktree", "prune"], capture_output=True)
    rows = []
    for key in common:
        workload, name = key.split()
        ours = [statistics.median(t) for t in times[key]["ours"]]
        theirs = [statistics.median(t) for t in times[key]["theirs"]]
        speedups = [b / a for a, b in zip(ours, theirs)]
        c_ours, c_theirs = checks[key]["ours"], checks[key]["theirs"]
        same = diffs[key] == 0.0 and c_ours.get("update_err") == c_theirs.get("update_err")
        rows.append({
            "workload": workload,
            "model": name,
            "size": list(setup.crop if workload == "train" else setup.eval_size),
            "batch": setup.batch if workload == "train" else 1,
            "ours_ms": med_ms([v for t in times[key]["ours"] for v in t]),
            "theirs_ms": med_ms([v for t in times[key]["theirs"] for v in t]),
            "speedup": statistics.median(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
            "round_speedups": speedups,
            "ours_output_err": c_ours["output_err"],
            "theirs_output_err": c_theirs["output_err"],
            "ours_update_err": c_ours.get("update_err"),
            "theirs_update_err": c_theirs.get("update_err"),
            "pred_diff": diffs[key],
            "outputs": verdict(c_ours["output_err"], c_theirs["output_err"], same, "fp32"),
            "ours_settings": info[key]["ours"],
            "theirs_settings": info[key]["theirs"],
        })
    return {"rev": rev, "commit": sha, "width": setup.width, "threads": setup.threads, "rounds": setup.rounds,
            "calls": calls, "load_average": load, "rows": rows}


def against_table(result: dict[str, Any]) -> str:
    rev = result["rev"]
    load = result["load_average"]
    out = [f"### The working tree against {rev} ({result['commit'][:7]}): widths {result['width']}, "
           f"{result['threads']} thread(s), {result['rounds']} rounds x {result['calls']} calls, "
           f"load average {min(load):.1f}-{max(load):.1f}\n",
           f"| workload | model | size × batch | ours ms | {rev} ms | speed-up (median of rounds) | min-max over rounds "
           f"| outputs: error vs float64 (ours / {rev}) | update: error vs float64 (ours / {rev}) "
           f"| prediction: ours vs {rev} | outputs | settings (ours / {rev}) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def settings(s: dict[str, Any]) -> str:
            key = "train_channels_last" if r["workload"] == "train" else "eval_channels_last"
            text = "channels-last" if s.get(key) else "contiguous"
            text += ", freed memory kept" if s.get("retain_memory") else ""
            text += (f", weight gradients routed by shape ({s['routed_convs']} convolutions eligible)"
                     if s.get("routed_convs") else "")
            return text + (f", {s['optimizer']}" if "optimizer" in s else "")

        upd = (f"{fmt(r['ours_update_err'], '.1e')} / {fmt(r['theirs_update_err'], '.1e')}"
               if r["ours_update_err"] is not None else "-")
        out.append(
            f"| {r['workload']} | {r['model']} | {r['size'][0]}x{r['size'][1]} × {r['batch']} "
            f"| {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['speedup']:.3f}x "
            f"| {r['speedup_min']:.3f}-{r['speedup_max']:.3f}x "
            f"| {r['ours_output_err']:.1e} / {r['theirs_output_err']:.1e} | {upd} | {r['pred_diff']:.1e} "
            f"| {r['outputs']} | {settings(r['ours_settings'])} / {settings(r['theirs_settings'])} |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- tables


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def check(value: float, target: float, below: bool = True) -> str:
    ok = value <= target if below else value >= target
    return "yes" if ok else "**no**"


def tables(results: dict[str, Any]) -> str:
    out = []
    if "train" in results:
        out.append("### Training step: multi-scale (0.5, 1.0) against single scale\n")
        out.append("| model | crop × batch | single-scale ms | multi-scale ms | ratio | ≤ 1.35x | FLOP ratio "
                   "| single-scale step on the 0.5x crop | img/s | TFLOP/s | MFU "
                   "| multi-scale phases ms (fwd / loss / bwd / opt) | RMI ms | RMI share | loss share |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["train"]:
            p = r["phases_ms"]
            out.append(
                f"| {r['model']} vs {r['single_model']} | {r['crop'][0]}x{r['crop'][1]} × {r['batch']} "
                f"| {r['single_ms']:.1f} | {r['multi_ms']:.1f} | {r['ratio']:.3f}x "
                f"| {check(r['ratio'], TRAIN_RATIO_TARGET)} | {r['flop_ratio']:.3f}x | {r['half_crop_ratio']:.3f}x "
                f"| {r['images_per_s']:.2f} "
                f"| {r['achieved_tflops']:.3f} | {fmt(r['mfu'], '.1%')} "
                f"| {p['forward']:.1f} / {p['loss']:.1f} / {p['backward']:.1f} / {p['optimizer']:.1f} "
                f"| {r['rmi_ms']:.1f} | {r['rmi_share']:.1%} | {r['criterion_share']:.1%} |"
            )
    if "infer" in results:
        out.append("\n### n-scale inference against the sum of its single-scale passes\n")
        out.append("| model | image | scales | n-scale ms | Σ single ms | ratio | ≤ 1.10x | predict() ms "
                   "| predict() ratio | peak MiB n-scale | peak MiB predict() | peak MiB largest single |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["infer"]:
            out.append(
                f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {', '.join(f'{s:g}' for s in r['scales'])} "
                f"| {r['nscale_ms']:.1f} | {r['singles_sum_ms']:.1f} | {r['ratio']:.3f}x "
                f"| {check(r['ratio'], INFER_RATIO_TARGET)} | {r['predict_ms']:.1f} | {r['predict_ratio']:.3f}x "
                f"| {r['nscale_peak_mib']:.1f} | {r['predict_peak_mib']:.1f} | {r['single_peak_mib']:.1f} |"
            )
    if "data" in results:
        out.append("\n### Data pipeline against the training step it feeds\n")
        out.append("| model | source image | crop | workers | loader img/s | step img/s | headroom | keeps up |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in results["data"]:
            out.append(
                f"| {r['model']} | {r['source_size'][0]}x{r['source_size'][1]} | {r['crop'][0]}x{r['crop'][1]} "
                f"| {r['workers']} | {r['data_images_per_s']:.1f} | {r['step_images_per_s']:.2f} "
                f"| {r['headroom']:.1f}x | {check(r['headroom'], 1.0, below=False)} |"
            )
    if "opt" in results:
        out.append(f"\n### Optimisations on {PAPER_MODEL}\n")
        out.append("| phase | variant | ms | speed-up | outputs: error vs float64 | update: error vs float64 "
                   "| outputs |")
        out.append("|---|---|---|---|---|---|---|")
        for r in results["opt"]:
            out.append(f"| {r['phase']} | {r['variant']} | {r['ms']:.1f} | {r['speedup']:.3f}x "
                       f"| {r['output_err']:.1e} | {fmt(r['update_err'], '.1e')} | {r['outputs']} |")
    if "recipe" in results:
        out.append("\n### Training-step FLOPs at the recipe crop (fake tensors): what a GPU approaches\n")
        out.append("| model | width | crop × batch | single-scale TFLOP | multi-scale TFLOP (as the original) | ratio "
                   "| without the 1.0x attention head (attn_bn_stats=low) | ratio |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in results["recipe"]["flops"]:
            out.append(
                f"| {r['model']} | {r['width']} | {r['crop'][0]}x{r['crop'][1]} × {r['batch']} "
                f"| {r['single_tflop']:.3f} | {r['multi_tflop']:.3f} | {r['ratio']:.3f}x "
                f"| {r['low_tflop']:.3f} | {r['low_ratio']:.3f}x |"
            )
        out.append(f"\n### Peak memory of {PAPER_MODEL} at the recipe sizes\n")
        out.append("| case | image / crop | scales | flip | precision | how | peak GiB | weights + inputs GiB "
                   "| < target |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in results["recipe"]["memory"]:
            target = "-" if r["target_gib"] is None else check(r["peak_gib"], r["target_gib"])
            out.append(
                f"| {r['case']} | {r['size'][0]}x{r['size'][1]} | {', '.join(f'{s:g}' for s in r['scales'])} "
                f"| {'yes' if r['flip'] else 'no'} | {r['precision']} | {r['how']} | {r['peak_gib']:.2f} "
                f"| {fmt(r['weights_inputs_gib'])} | {target} |"
            )
    return "\n".join(out)


def machine(setup: Setup) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    if setup.device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(setup.device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"CPU {cpu}, {os.cpu_count()} cores"
    info["memory_method"] = PeakMemory(setup.device).method
    return info


# ----------------------------------------------------------------------------------------------- main


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 128x256), got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"sizes must be at least 16x16, got {text!r}")
    return h, w


def parse_args(argv: Sequence[str] | None) -> tuple[Setup, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ...")
    parser.add_argument("--full", action="store_true",
                        help="full-width models at the recipe sizes (crop 1024x1024 x 2, eval 1024x2048)")
    parser.add_argument("--width", choices=sorted(WIDTHS), help="model widths (default: full with --full, else narrow)")
    parser.add_argument("--crop", type=parse_size, help="training crop HxW (default 1024x1024 with --full, else 128x128)")
    parser.add_argument("--batch", type=int, help="training batch (default 2)")
    parser.add_argument("--eval-size", type=parse_size, help="inference image HxW (1024x2048 with --full, else 128x256)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast of the train and infer sections")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--data-batches", type=int, default=8, help="batches timed in the data section")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows to the opt section")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", help="JSON file for every row and the machine description")
    parser.add_argument("--against", metavar="REV",
                        help="instead of the sections: the working tree against git revision REV, both models' "
                             "evaluation and training step in alternating processes (crop 256x256, eval 256x512 "
                             "unless given)")
    parser.add_argument("--calls", type=int, default=2,
                        help="--against: timed calls per process (after the warm-up: 2 calls in training, 1 in eval)")
    parser.add_argument("--workloads", nargs="+", choices=("eval", "train"), default=["eval", "train"],
                        help="--against: which workloads (both models each)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm on the 1x1 image-pooling branch needs two values)")
    if min(args.rounds, args.data_batches, args.calls) < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds, --data-batches, --calls and --threads must be >= 1, --warmup >= 0")
    if args.against is not None and device.type != "cpu":
        parser.error("--against measures CPU time in subprocesses: use it with --device cpu")
    against = args.against is not None
    setup = Setup(
        device=device,
        width=args.width or ("full" if args.full else "narrow"),
        crop=args.crop or ((1024, 1024) if args.full else (256, 256) if against else (128, 128)),
        batch=args.batch or 2,
        eval_size=args.eval_size or ((1024, 2048) if args.full else (256, 512) if against else (128, 256)),
        rounds=args.rounds,
        warmup=args.warmup,
        precision=args.precision,
        workers=args.workers,
        data_batches=args.data_batches,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        threads=args.threads,
    )
    return setup, args


def run(setup: Setup, sections: Sequence[str], workdir: str) -> dict[str, Any]:
    """The chosen sections in order (data needs train's step times, so it runs train too)."""
    results: dict[str, Any] = {"machine": machine(setup), "elapsed_s": {}}
    steps: dict[str, Callable[[], Any]] = {
        "train": lambda: bench_train(setup),
        "infer": lambda: bench_infer(setup),
        "data": lambda: bench_data(setup, results["train"], workdir),
        "opt": lambda: bench_opt(setup),
        "recipe": lambda: bench_recipe(setup),
    }
    wanted = set(sections) | ({"train"} if "data" in sections else set())
    for name in SECTIONS:
        if name in wanted:
            start = time.perf_counter()
            results[name] = steps[name]()
            results["elapsed_s"][name] = time.perf_counter() - start
            print(tables({name: results[name]}) + "\n", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    setup, args = parse_args(argv)
    if setup.device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = machine(setup)
    print(f"# {info['device']}; torch {info['torch']}, {info['threads']} thread(s); widths {setup.width}; "
          f"load average {info['load_average']:.1f}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="hmsa_bench_") as workdir:
        if args.against is not None:
            try:
                results = {"machine": info, "against": bench_against(setup, args.against, args.calls, workdir,
                                                                          args.workloads)}
            except AgainstError as e:
                raise SystemExit(f"error: {e}") from None
            print(against_table(results["against"]) + "\n", flush=True)
        else:
            results = run(setup, args.sections, workdir)
    results["setup"] = {**vars(setup), "device": str(setup.device), "recipe": asdict(setup.recipe)}
    results["command"] = " ".join(["python", "-m", "scripts.bench.multiscale", *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
