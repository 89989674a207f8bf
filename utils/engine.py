"""The training step loop and the evaluation loop, shared by train.py and eval.py."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from network.layers import rescale, resize
from network.mscale import MscaleBase, check_scales

from .dist import all_reduce_sum
from .metrics import confusion_matrix
from .precision import autocast
from .visualize import dump_sample


@dataclass
class TrainState:
    """Everything about progress that a resume restores (besides model/optimizer/scheduler/scaler)."""

    iteration: int = 0
    epoch: int = 0
    best_miou: float = -1.0
    best_iteration: int = -1


def poly_lambda(max_steps: int, power: float) -> Callable[[int], float]:
    """LR factor (1 - step/max_steps) ** power, clamped at 0 past the end."""
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class Progress:
    """A one-line progress bar per logging interval: iteration, loss terms, learning rate, speed and ETA."""

    def __init__(self, total: int, start: int, log: Callable[[str], None], width: int = 20) -> None:
        self.total, self.start, self.log, self.width = total, start, log, width
        self.t0 = time.time()

    def update(self, iteration: int, values: dict[str, float]) -> None:
        done = iteration - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("inf")
        filled = int(self.width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        fields = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        self.log(f"[{bar}] {iteration}/{self.total}  {fields}  {rate:.2f} it/s  eta {eta_s}")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    criterion: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    max_iter: int,
    device: torch.device,
    precision: str,
    on_step: Callable[[dict[str, float]], bool],
    step_lr_per_iter: bool = True,
) -> bool:
    """Run training steps over one pass of `loader` (or until `max_iter`).

    After each step `on_step(scalars)` logs, checkpoints, validates; it returns False to stop early (preemption).
    Returns False when training stopped before the end of the epoch.
    """
    model.train()
    for batch in loader:
        if state.iteration >= max_iter:
            return True
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        with autocast(precision, device):
            outputs = model(images)
        total, terms = criterion(outputs, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        if step_lr_per_iter:
            scheduler.step()
        state.iteration += 1
        scalars = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
        if not on_step({k: float(v) for k, v in scalars.items()} | {"lr": optimizer.param_groups[0]["lr"]}):
            return False
    return True


# ----------------------------------------------------------------------------------------------- inference


def predict(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool = False,
) -> dict[str, torch.Tensor]:
    """Logits at input size under `scales` (and the flipped pass averaged in when `flip`).

    Multi-scale attention models fuse the scales hierarchically and return their per-scale maps too; other
    models average the logits of the rescaled inputs (the original's multi-scale inference).
    """
    scales = check_scales(scales)
    net = unwrap(model)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(net, MscaleBase):
            return model(x, scales=scales)
        preds = [resize(model(rescale(x, s))["pred"], x.shape[-2:]) for s in scales]
        return {"pred": torch.stack(preds).mean(0)}

    out = run(images)
    if flip:
        flipped = run(images.flip(-1))
        out["pred"] = (out["pred"] + flipped["pred"].flip(-1)) / 2
    return out


@dataclass
class EvalResult:
    hist: torch.Tensor
    loss: float
    dumped: list[str] = field(default_factory=list)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    num_classes: int,
    ignore_index: int,
    scales: Sequence[float],
    device: torch.device,
    precision: str = "fp32",
    flip: bool = False,
    dump_dir: str | None = None,
    num_dump: int = 0,
    palette: Any = None,
    rank: int = 0,
) -> EvalResult:
    """Confusion matrix and mean CE loss over `loader`, summed across ranks; optional image dumps."""
    model.eval()
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, valid pixels
    dumped: list[str] = []
    seen = 0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        with autocast(precision, device):
            out = predict(model, images, scales, flip)
        logits = out["pred"].float()
        loss_sum[0] += F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum").double()
        loss_sum[1] += (target != ignore_index).sum()
        hist += confusion_matrix(logits.argmax(1), target, num_classes)
        if dump_dir is not None and rank == 0:
            for i in range(images.shape[0]):
                if seen >= num_dump:
                    break
                sample = {k: v[i] for k, v in out.items()}
                dumped += dump_sample(dump_dir, batch["name"][i], images[i], sample, palette, target[i], ignore_index)
                seen += 1
    all_reduce_sum(hist)
    all_reduce_sum(loss_sum)
    loss = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    return EvalResult(hist=hist.cpu(), loss=loss, dumped=dumped)


# ----------------------------------------------------------------------------------------------- logging


class RunLogger:
    """Console + `train.log` text, `metrics.jsonl` rows and TensorBoard scalars, all appended on resume."""

    def __init__(self, run_dir: str, enabled: bool = True, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        self.text.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"split": split, "iteration": step, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.text.close()
            self.metrics.close()


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
