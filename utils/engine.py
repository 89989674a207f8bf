"""The training step loop and the evaluation loop, shared by train.py and eval.py."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from network.layers import resize

from .dist import all_reduce_sum, no_sync
from .dumps import ImageDumper, LabelIdWriter, image_miou, make_record
from .inference import Combo, MultiScalePass, check_window, resolve_fusion
from .metrics import confusion_counter
from .precision import autocast


@dataclass
class TrainState:
    """Everything about progress that a resume restores (besides model/optimizer/scheduler/scaler)."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_samples: int = 0  # samples of `epoch` consumed by all ranks together (the sampler's resume position)
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
    on_step: Callable[[dict[str, torch.Tensor]], bool],
    step_lr_per_iter: bool = True,
    *,
    accum_steps: int = 1,
    samples_per_step: int = 0,
    channels_last: bool = False,
) -> bool:
    """Run optimizer steps over one pass of `loader` (or until `max_iter`), each on `accum_steps` batches.

    A step's gradient is the mean over its micro-batches; DDP all-reduces it once, on the last one. Batches left
    over at the end of the pass (fewer than `accum_steps`) are not used. `samples_per_step` (all ranks together)
    advances `state.epoch_samples`, the position a mid-epoch resume skips to.
    After each step `on_step(scalars)` logs, checkpoints, validates; it returns False to stop early (preemption).
    The scalars (loss terms, learning rate) stay on the device, so that a step needs no host synchronisation
    unless `on_step` reads them (at logging steps).
    Returns False when training stopped before the end of the epoch.
    """
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    micro = 0
    sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        if state.iteration >= max_iter:
            return True
        images = batch["image"].to(device, non_blocking=True, memory_format=fmt)
        target = batch["mask"].to(device, non_blocking=True)
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        with no_sync(model, skip=micro < accum_steps):
            with autocast(precision, device):
                outputs = model(images)
            total, terms = criterion(outputs, target)
            scaler.scale(total / accum_steps if accum_steps > 1 else total).backward()
        for k, v in {"loss": total, **terms}.items():
            sums[k] = sums.get(k, 0) + v.detach()
        if micro < accum_steps:
            continue
        scaler.step(optimizer)
        scaler.update()
        if step_lr_per_iter:
            scheduler.step()
        state.iteration += 1
        state.epoch_samples += samples_per_step
        scalars = {k: v / accum_steps for k, v in sums.items()}
        micro, sums = 0, {}
        if not on_step(scalars | {"lr": torch.tensor(optimizer.param_groups[0]["lr"])}):
            return False
    return True


# ----------------------------------------------------------------------------------------------- inference


def predict(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool = False,
    fusion: str | None = None,
    window: Sequence[int] = (),
    overlap: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Logits `pred` at input size under `scales` (the mirrored pass averaged in when `flip`), and each scale's own
    `pred_{s}x` (and `attn_{s}x` for attention models) at that scale's resolution.

    fusion: attention (hierarchical, the default; 'average' for models without scale attention), average or max.
    window: [height, width] for sliding-window inference at every scale ([] for whole images).
    """
    combo = Combo.make(scales, resolve_fusion(model, fusion), flip)
    run = MultiScalePass(model, images, combo.scales, flip, check_window(window, overlap), overlap)
    return {"pred": run.logits(combo), **run.maps()}


@dataclass
class EvalResult:
    hist: torch.Tensor  # int64 [K, K] of the evaluated setting (summed over ranks)
    loss: float  # mean CE per labelled pixel of that setting (NaN without labels)
    dumped: list[str] = field(default_factory=list)  # picture files written by every rank
    stopped: bool = False  # should_stop() ended the loop early: counts are partial and rank-local
    images: list[dict] = field(default_factory=list)  # per dumped image: index, name, score, files {kind: path}
    sweep: list[tuple[Combo, torch.Tensor]] = field(default_factory=list)  # every combination's hist, setting first
    images_seen: int = 0  # images evaluated (summed over ranks)


def _first_index(loader: Iterable[Any]) -> int:
    """Dataset index of this rank's first image (the eval ShardSampler gives each rank a contiguous block)."""
    return int(getattr(getattr(loader, "sampler", None), "start", 0))


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
    should_stop: Callable[[], bool] | None = None,
    *,
    fusion: str | None = None,
    window: Sequence[int] = (),
    overlap: float = 0.25,
    sweep: Sequence[Combo] = (),
    dump: str = "first",
    label_writer: LabelIdWriter | None = None,
) -> EvalResult:
    """Confusion matrix and mean CE loss over `loader`, summed across ranks; image dumps; label-id files.

    The evaluated setting is (scales, fusion, flip). `sweep` adds more (scale set, fusion, flip) combinations,
    read from the same per-scale network outputs (the network runs once per distinct scale per image, and once
    more per scale mirrored if any combination flips); their confusion matrices come back in `sweep`.
    Batches without 'mask' (folders, test splits) give no metrics, only dumps and label ids.
    Pictures (`dump_dir`, selection `dump` with N = `num_dump`, see utils/dumps.py) come from every rank and
    batch element.
    `should_stop()` is asked once before each batch (preemption); when it answers True the loop ends at once,
    nothing is all-reduced and the result has `stopped=True` with this rank's partial counts.
    """
    model.eval()
    setting = Combo.make(scales, resolve_fusion(model, fusion), flip)
    combos = [setting] + [c for c in sweep if c != setting]
    position = {c: i for i, c in enumerate(combos)}
    run_scales = sorted({s for c in combos for s in c.scales}, reverse=True)
    run_flip = any(c.flip for c in combos)
    win = check_window(window, overlap)
    dumper = None
    if dump_dir is not None:
        dumper = ImageDumper(dump_dir, dump, num_dump, palette, ignore_index, num_classes)
        dumper = dumper if dumper.active else None
    hists = torch.zeros(len(combos), num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # CE sum, labelled pixels, images
    index = _first_index(loader)
    for batch in loader:
        if should_stop is not None and should_stop():
            return EvalResult(hist=hists[0].cpu(), loss=float("nan"), stopped=True,
                              sweep=list(zip(combos, hists.cpu())), images_seen=int(loss_sum[2]))
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True) if "mask" in batch else None
        with autocast(precision, device):
            run = MultiScalePass(model, images, run_scales, run_flip, win, overlap)
        logits = run.logits(setting).float()
        if target is not None and logits.shape[-2:] != target.shape[-2:]:
            logits = resize(logits, target.shape[-2:])  # labels kept at native size (data.eval_native_labels)
        pred = logits.max(1).indices  # = argmax(1), several times faster on CPUs
        loss_sum[2] += images.shape[0]
        if target is not None:
            loss_sum[0] += F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum").double()
            loss_sum[1] += (target != ignore_index).sum()
            count = confusion_counter(target, num_classes)
            hists[0] += count(pred)
            for combo, other in run.logits_many(combos[1:]):
                if other.shape[-2:] != target.shape[-2:]:
                    other = resize(other, target.shape[-2:])
                hists[position[combo]] += count(other.max(1).indices)
        maps = run.maps(setting.scales) if dumper is not None else {}
        for j in range(images.shape[0]):
            name = batch["name"][j]
            if label_writer is not None:
                label_writer.add(name, logits[j])
            if dumper is not None:
                tj = None if target is None else target[j]
                score = math.nan if tj is None else image_miou(pred[j], tj, num_classes)
                one = {k: v[j] for k, v in maps.items()}
                record = partial(make_record, index + j, name, images[j], logits[j], one, tj, score)
                dumper.add(record, index + j, score)  # builds the record only if the image is kept
        index += images.shape[0]
        del run, logits, pred, maps  # free this batch's maps before the next batch's network passes
    all_reduce_sum(hists)
    all_reduce_sum(loss_sum)
    entries = dumper.finish() if dumper is not None else []
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return EvalResult(
        hist=hists[0].cpu(), loss=loss, dumped=[p for e in entries for p in e["files"].values()], images=entries,
        sweep=list(zip(combos, hists.cpu())), images_seen=int(loss_sum[2]),
    )


# ----------------------------------------------------------------------------------------------- logging


class RunLogger:
    """Console + `train.log` text, `metrics.jsonl` rows and TensorBoard scalars (rank 0), appended on resume.

    With `rank` given (a distributed run), every rank also writes its own `logs/rank<r>.log` (its messages,
    warnings and errors); warnings and errors go to stderr on every rank, prefixed with the rank.
    `resume_iteration`: the run continues after that iteration, so rows and TensorBoard events logged after it
    by an interrupted run (which the resumed one logs again) are dropped.
    """

    def __init__(self, run_dir: str, enabled: bool = True, purge_step: int | None = None,
                 rank: int | None = None, resume_iteration: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.rank = rank
        self.writer = None
        self.rank_file = None
        if rank is not None:
            os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
            self.rank_file = open(os.path.join(run_dir, "logs", f"rank{rank}.log"), "a", buffering=1)
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if resume_iteration is not None:
            _drop_rows_after(metrics_path, resume_iteration)
            purge_step = resume_iteration + 1
        self.text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self.metrics = open(metrics_path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def _stamp(self, message: str) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n"

    def info(self, message: str) -> None:
        if self.rank_file is not None:
            self.rank_file.write(self._stamp(message))
        if not self.enabled:
            return
        print(message, flush=True)
        self.text.write(self._stamp(message))

    def warn(self, message: str, level: str = "WARNING") -> None:
        """Shown on every rank (stderr), also in this rank's log file and, on rank 0, in train.log."""
        prefix = f"[rank {self.rank}] " if self.rank is not None else ""
        print(f"{prefix}{level}: {message}", file=sys.stderr, flush=True)
        if self.rank_file is not None:
            self.rank_file.write(self._stamp(f"{level}: {message}"))
        if self.enabled:
            self.text.write(self._stamp(f"{level}: {message}"))

    def error(self, message: str) -> None:
        self.warn(message, level="ERROR")

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"split": split, "iteration": step, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.rank_file is not None:
            self.rank_file.close()
            self.rank_file = None
        if self.enabled and self.writer is not None:
            self.writer.close()
            self.text.close()
            self.metrics.close()
            self.writer = None


def _drop_rows_after(path: str, iteration: int) -> None:
    """Rewrite metrics.jsonl without the rows of iterations after `iteration` (atomically: temp file + rename)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if int(row.get("iteration", 0)) <= iteration:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
