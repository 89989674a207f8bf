"""The training criterion: named, weighted terms on a model's output dict.

    total = f_main(pred) + aux_weight·f_aux(aux) + Σ_s scale_weight·f_scale(up(pred_{s}x))

Each term picks its function by name (TERM_FUNCTIONS). `criterion(outputs, target)` returns the total and a dict of
each term's weighted, detached value ('main', 'aux', 'scale_0.5x', ...) for logging. The original's --rmi_loss
recipe is main='rmi', aux='bce', scale='bce' with aux_weight 0.4 and scale_weight 0.05 (or 0).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from loss.cross_entropy import check_inputs, cross_entropy, image_weighted_cross_entropy
from loss.rmi import RMILoss, bce_loss
from utils.config import LossConfig

TermFn = Callable[[Tensor, Tensor], Tensor]

TERM_FUNCTIONS = ("ce", "bce", "rmi", "wce")

_SCALE_KEY = re.compile(r"^pred_(\d+(?:\.\d+)?)x$")


def build_term(name: str, cfg: LossConfig, num_classes: int, ignore_index: int, key: str = "loss") -> TermFn:
    """The loss function `f(logits [N,K,H,W], target [N,H,W]) -> scalar` that `name` selects.

    ce: softmax CE over valid pixels; bce: sigmoid BCE summed over classes / (valid pixels + 1); rmi: 0.5·BCE +
    0.5·RMI; wce: CE with class weights from each image's label histogram, summed over images.
    """
    if name == "ce":
        return lambda logits, target: cross_entropy(logits, target, num_classes, ignore_index)
    if name == "bce":
        return lambda logits, target: bce_loss(logits, target, num_classes)
    if name == "rmi":
        return RMILoss(num_classes, ignore_index)
    if name == "wce":
        bound = cfg.wce_upper_bound
        return lambda logits, target: image_weighted_cross_entropy(logits, target, num_classes, ignore_index, bound)
    raise ValueError(f"{key}: unknown loss function {name!r}; expected one of {list(TERM_FUNCTIONS)}")


class Criterion:
    """Callable `(outputs: dict[str, Tensor], target: LongTensor [N,H,W]) -> (total, terms)`.

    'main' is computed on outputs['pred']; 'aux' on outputs['aux'] when present and aux_weight > 0; 'scale_{s}x'
    on every outputs['pred_{s}x'] when scale_weight > 0, resized (bilinear) to the target size first. All terms
    run in float32 with autocast off, so fp16/bf16 training gets the fp32 loss of its logits.
    """

    def __init__(self, cfg: LossConfig, num_classes: int, ignore_index: int) -> None:
        self.num_classes = num_classes
        self.main = build_term(cfg.main, cfg, num_classes, ignore_index, "loss.main")
        self.aux = build_term(cfg.aux, cfg, num_classes, ignore_index, "loss.aux")
        self.scale = build_term(cfg.scale, cfg, num_classes, ignore_index, "loss.scale")
        self.aux_weight = float(cfg.aux_weight)
        self.scale_weight = float(cfg.scale_weight)

    def _term(self, fn: TermFn, logits: Tensor, target: Tensor, key: str) -> Tensor:
        check_inputs(logits, target, self.num_classes, where=f"loss on outputs[{key!r}]")
        return fn(logits.float(), target)

    def __call__(self, outputs: dict[str, Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if "pred" not in outputs:
            raise ValueError(f"loss: the model outputs have no 'pred' (keys: {sorted(outputs)})")
        with torch.autocast(outputs["pred"].device.type, enabled=False):
            total = self._term(self.main, outputs["pred"], target, "pred")
            terms = {"main": total.detach()}
            if self.aux_weight > 0 and "aux" in outputs:
                value = self.aux_weight * self._term(self.aux, outputs["aux"], target, "aux")
                terms["aux"] = value.detach()
                total = total + value
            if self.scale_weight > 0:
                for _, key in sorted((float(m.group(1)), k) for k in outputs if (m := _SCALE_KEY.match(k))):
                    logits = outputs[key]
                    if logits.dim() == 4 and logits.shape[2:] != target.shape[-2:]:
                        # each scale's own prediction is supervised at the label's resolution
                        logits = F.interpolate(
                            logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
                        )
                    value = self.scale_weight * self._term(self.scale, logits, target, key)
                    terms["scale_" + key[len("pred_") :]] = value.detach()
                    total = total + value
        return total, terms


def build_criterion(cfg: LossConfig, num_classes: int, ignore_index: int) -> Criterion:
    """The training criterion of a LossConfig for K classes whose ignored pixels carry `ignore_index` (not in [0,K))."""
    if num_classes < 1:
        raise ValueError(f"loss: num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"loss: ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
            f"ignored pixels must carry a label outside [0, {num_classes})"
        )
    for key in ("aux_weight", "scale_weight"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"loss.{key}: must be >= 0, got {getattr(cfg, key)}")
    return Criterion(cfg, num_classes, ignore_index)


__all__ = ["Criterion", "RMILoss", "TERM_FUNCTIONS", "build_criterion", "build_term"]
