"""Cross-entropy variants on logits [N,K,H,W] and train-id targets [N,H,W].

Pixels whose label is the ignore value (or any value >= K) contribute nothing. Every function returns a finite
value when no pixel is valid (an all-ignore crop): the sum is divided by max(count, 1), which needs no GPU sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_inputs(logits: Tensor, target: Tensor, num_classes: int, where: str = "loss") -> None:
    """Raise ValueError when logits and target cannot describe the same pixels of a K-class problem."""
    if logits.dim() != 4:
        raise ValueError(f"{where}: logits must be [N,K,H,W], got shape {tuple(logits.shape)}")
    if target.dim() != 3:
        raise ValueError(f"{where}: target must be [N,H,W], got shape {tuple(target.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"{where}: logits have {logits.shape[1]} channels but the criterion was built for "
            f"num_classes={num_classes}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"{where}: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in batch or "
            f"spatial size (expected logits [N,K,H,W] with target [N,H,W])"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"{where}: target must hold integer class ids, got dtype {target.dtype}")


def _valid_target(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(target with every ignored pixel set to ignore_index, mask of valid pixels)."""
    valid = (target >= 0) & (target < num_classes)
    return torch.where(valid, target, torch.full_like(target, ignore_index)), valid


def cross_entropy(logits: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Softmax CE averaged over valid pixels (the original CrossEntropyLoss2d)."""
    target, valid = _valid_target(target.long(), num_classes, ignore_index)
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / valid.sum().clamp(min=1)


def image_class_weights(target: Tensor, num_classes: int, upper_bound: float = 1.0) -> Tensor:
    """Per-image class weights [N,K] from each image's own label histogram (the original computes them from the whole batch).

    w = (hist != 0) * upper_bound * (1 - p) + 1, where p is the class frequency among the image's valid pixels.
    """
    n = target.shape[0]
    flat = target.reshape(n, -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    # ignored pixels go to a spare bin K that is dropped afterwards; a 1-d scatter-add is deterministic on CUDA
    bins = torch.where(valid, flat, num_classes) + torch.arange(n, device=target.device).view(n, 1) * (num_classes + 1)
    hist = torch.zeros(n * (num_classes + 1), dtype=torch.int64, device=target.device)
    hist.scatter_add_(0, bins.reshape(-1), torch.ones_like(bins).reshape(-1))
    hist = hist.view(n, num_classes + 1)[:, :num_classes].double()
    p = hist / hist.sum(dim=1, keepdim=True).clamp(min=1)
    return ((hist != 0).double() * upper_bound * (1 - p) + 1).float()


def image_weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int,
    upper_bound: float = 1.0,
) -> Tensor:
    """Class-weighted CE with weights from each image's histogram, summed over the images of the batch.

    Each image's term is the weighted mean NLL over its valid pixels (sum of w[y]·nll / sum of w[y]), as
    NLLLoss(weight) computes it; the batch sum follows the original ImageBasedCrossEntropyLoss2d, but the weights
    come from the image itself rather than from the whole batch.
    """
    target, valid = _valid_target(target.long(), num_classes, ignore_index)
    weights = image_class_weights(target, num_classes, upper_bound)
    nll = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # [N,H,W]
    safe = torch.where(valid, target, 0).reshape(target.shape[0], -1)
    w = torch.gather(weights, 1, safe) * valid.reshape(target.shape[0], -1)
    per_image = (w * nll.reshape(target.shape[0], -1)).sum(1) / w.sum(1).clamp(min=torch.finfo(w.dtype).tiny)
    return per_image.sum()
