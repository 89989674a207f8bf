"""The training step, the training data stream and the evaluation loop, shared by train.py, eval.py and the benchmarks."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from network.layers import resize

from .runtime.dist import all_reduce_sum, no_sync
from .evaluation.dumps import ImageDumper, LabelIdWriter, image_miou, make_record
from .inference import Combo, Inference
from .inference.memory import eval_budget, planned_pass
from .evaluation.metrics import confusion_counter
from .runtime.layout import no_autotune
from .runtime.precision import autocast


@dataclass
class TrainState:
    """Progress that a resume restores besides model, optimizer, scheduler, scaler and the data position."""

    iteration: int = 0  # optimizer steps done
    best_miou: float = -1.0
    best_iteration: int = -1


def poly_lambda(max_steps: int, power: float) -> Callable[[int], float]:
    """LR factor (1 - step/max_steps) ** power, clamped at 0 past the end."""
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


class TrainBatches:
    """The training data as a stream of optimizer steps, and the owner of the data position.

    Each step takes `accum_steps` batches of the loader; `global_batch` samples (all ranks together) per step.
    The position is (epoch, samples of that epoch consumed by all ranks); it checkpoints itself (`state_dict`)
    and a resumed stream continues with the next sample. An epoch's length is what the dataset says for that
    epoch (it can change, e.g. when coarse data is switched off); batches left over at an epoch's end (fewer than
    one step) are not used.
    """

    def __init__(self, loader: Any, accum_steps: int, global_batch: int, world_size: int) -> None:
        self.loader, self.accum_steps = loader, accum_steps
        self.global_batch, self.world_size = global_batch, world_size
        self.epoch, self.epoch_samples = 0, 0
        self._batches: Iterator[dict[str, Any]] | None = None
        self._steps = 0

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in `epoch`."""
        self.loader.sampler.set_epoch(epoch)
        self._batches = None  # the sampler now points at `epoch`: start the current one afresh
        return len(self.loader) // self.accum_steps

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "epoch_samples": self.epoch_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A whole number of steps: the position of a checkpoint of another global batch (--force-resume) goes back
        # to the last step boundary of this one.
        self.epoch = int(state["epoch"])
        self.epoch_samples = int(state["epoch_samples"]) // self.global_batch * self.global_batch
        self._batches = None

    def next_step(self) -> list[dict[str, Any]]:
        """The batches of the next optimizer step."""
        if self._batches is None:
            self._steps = self.epoch_steps(self.epoch)
            if self._steps == 0:
                raise ValueError(f"epoch {self.epoch} has fewer samples than one step of {self.global_batch} "
                                 "(data.batch_size x train.accum_steps x processes): lower data.batch_size")
            self.loader.sampler.set_epoch(self.epoch, start=self.epoch_samples)
            self._batches = iter(self.loader)
        return [next(self._batches) for _ in range(self.accum_steps)]

    def step_done(self) -> bool:
        """Count the step's samples; True when it was the last step of its epoch (the position moves on)."""
        self.epoch_samples += self.global_batch
        if self.epoch_samples < self._steps * self.global_batch:
            return False
        self.epoch, self.epoch_samples, self._batches = self.epoch + 1, 0, None
        return True


def train_step(
    model: nn.Module,
    batches: Sequence[dict[str, Any]],
    criterion: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    precision: str,
    device: torch.device,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimizer step over `batches` (its micro-batches); returns the loss terms, averaged, on the device.

    The step's gradient is the mean over the micro-batches; DDP all-reduces it once, on the last one. Nothing is
    read back to the host: a caller that logs every few steps synchronises only then.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    accum = len(batches)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        images = batch["image"].to(device, non_blocking=True, memory_format=fmt)
        target = batch["mask"].to(device, non_blocking=True)
        with no_sync(model, skip=i < accum - 1):
            with autocast(precision, device):
                outputs = model(images)
            total, terms = criterion(outputs, target)
            scaler.scale(total / accum if accum > 1 else total).backward()
        for k, v in {"loss": total, **terms}.items():
            sums[k] = sums.get(k, 0) + v.detach()
    scaler.step(optimizer)
    scaler.update()
    return {k: v / accum for k, v in sums.items()}


def reduce_scalars(scalars: dict[str, torch.Tensor], world_size: int) -> tuple[dict[str, float], int]:
    """Each scalar's mean over the ranks, and on how many ranks any of them was not finite. A collective: every
    rank calls it at the same logging steps; the one host synchronisation of such a step. Decided on these shared
    values, a non-finite loss stops every rank or none."""
    names = sorted(scalars)
    device = next((v.device for v in scalars.values() if v.device.type != "cpu"), torch.device("cpu"))
    local = torch.stack([scalars[k].detach().to(device, torch.float64).reshape(()) for k in names])
    packed = torch.cat([local, (~torch.isfinite(local)).any().to(torch.float64).reshape(1)])
    all_reduce_sum(packed)
    values = (packed[:-1] / world_size).tolist()
    return dict(zip(names, values)), int(packed[-1].item())


# ----------------------------------------------------------------------------------------------- inference


def predict(model: nn.Module, images: torch.Tensor, how: Inference) -> dict[str, torch.Tensor]:
    """Logits `pred` at input size under `how` (scales, fusion, flip, window; the mirrored pass averaged in when it
    flips), and each scale's own `pred_{s}x` (and `attn_{s}x` for attention models) at that scale's resolution.
    The caller chooses the autocast context (`how.precision` is applied by `evaluate`)."""
    combo = how.combo(model)
    run = planned_pass(how, model, images, [combo], keep=combo.scales)
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
    images_skipped: int = 0  # unreadable images left out (data.skip_bad; summed over ranks)


def _left_in(batch: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The elements of `batch` to evaluate, and their positions in it: those whose dataset marked them `skipped`
    (unreadable, data.skip_bad) are left out."""
    skipped = batch.get("skipped")
    positions = list(range(batch["image"].shape[0]))
    if skipped is None or not bool(skipped.any()):
        return batch, positions
    kept = [j for j in positions if not skipped[j]]
    pick = torch.tensor(kept, dtype=torch.long)
    return {k: v[pick] if isinstance(v, torch.Tensor) else [v[j] for j in kept] for k, v in batch.items()}, kept


def _first_index(loader: Iterable[Any]) -> int:
    """Dataset index of this rank's first image (the eval ShardSampler gives each rank a contiguous block)."""
    return int(getattr(getattr(loader, "sampler", None), "start", 0))


@no_autotune()
@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    num_classes: int,
    ignore_index: int,
    how: Inference,
    device: torch.device,
    *,
    dump_dir: str | None = None,
    dump: str = "first",
    num_dump: int = 0,
    palette: Any = None,
    should_stop: Callable[[], bool] | None = None,
    label_writer: LabelIdWriter | None = None,
) -> EvalResult:
    """Confusion matrix and mean CE loss over `loader`, summed across ranks; image dumps; label-id files.

    The evaluated setting is `how` (scales, fusion, flip, window, precision); its sweep combinations (scale set,
    fusion, flip) are read from the same per-scale network outputs (the network runs once per distinct scale per
    image, and once more per scale mirrored if any combination flips); their confusion matrices come back in
    `sweep`. Batches without 'mask' (folders, test splits) give no metrics, only dumps and label ids.
    Pictures (`dump_dir`, selection `dump` with N = `num_dump`, see utils/dumps.py) come from every rank and
    batch element.
    `should_stop()` is asked once before each batch (preemption); when it answers True the loop ends at once,
    nothing is all-reduced and the result has `stopped=True` with this rank's partial counts.
    Batch elements marked `skipped` (an unreadable image under data.skip_bad, a stand-in in its place) count nowhere
    but in `images_skipped`; a batch of skipped elements only still asks `should_stop`, which may be a collective.
    """
    model.eval()
    setting = how.combo(model)
    combos = [setting] + [c for c in how.sweep(model) if c != setting]
    position = {c: i for i, c in enumerate(combos)}
    dumper = None
    if dump_dir is not None:
        dumper = ImageDumper(dump_dir, dump, num_dump, palette, ignore_index, num_classes)
        dumper = dumper if dumper.active else None
    hists = torch.zeros(len(combos), num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(4, dtype=torch.float64, device=device)  # CE sum, labelled pixels, images, skipped
    index, skipped = _first_index(loader), 0
    if how.schedule is None:
        eval_budget(model, device, how)  # its one collective, before the batch counts can differ between ranks
    for batch in loader:
        if should_stop is not None and should_stop():
            return EvalResult(hist=hists[0].cpu(), loss=float("nan"), stopped=True,
                              sweep=list(zip(combos, hists.cpu())), images_seen=int(loss_sum[2]),
                              images_skipped=skipped)
        size = batch["image"].shape[0]
        batch, positions = _left_in(batch)
        skipped += size - len(positions)
        if not positions:
            index += size
            continue
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True) if "mask" in batch else None
        with autocast(how.precision, device):
            run = planned_pass(how, model, images, combos, keep=setting.scales if dumper is not None else ())
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
        for j, at in enumerate(positions):
            name = batch["name"][j]
            if label_writer is not None:
                label_writer.add(name, logits[j])
            if dumper is not None:
                tj = None if target is None else target[j]
                score = math.nan if tj is None else image_miou(pred[j], tj, num_classes)
                one = {k: v[j] for k, v in maps.items()}
                record = partial(make_record, index + at, name, images[j], logits[j], one, tj, score)
                dumper.add(record, index + at, score)  # builds the record only if the image is kept
        index += size
        del run, logits, pred, maps  # free this batch's maps before the next batch's network passes
    all_reduce_sum(hists)
    loss_sum[3] = skipped
    all_reduce_sum(loss_sum)
    entries = dumper.finish() if dumper is not None else []
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return EvalResult(
        hist=hists[0].cpu(), loss=loss, dumped=[p for e in entries for p in e["files"].values()], images=entries,
        sweep=list(zip(combos, hists.cpu())), images_seen=int(loss_sum[2]), images_skipped=int(loss_sum[3]),
    )
