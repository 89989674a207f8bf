"""Confusion matrix (int64, on the device, all-reducible) and the metrics derived from it.

Rows are ground truth, columns predictions: hist[g, p]. Precision of class c is TP / (column sum), recall is
TP / (row sum) (the original swaps the two: REFERENCE.md 6.2).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [K, K] counts of (target, pred) over pixels whose target lies in [0, K)."""
    valid = (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def compute_metrics(hist: torch.Tensor | np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU and a per-class table.

    Classes absent from both ground truth and prediction have NaN IoU and are left out of the means.
    """
    h = hist.cpu().numpy() if isinstance(hist, torch.Tensor) else np.asarray(hist)
    h = h.astype(np.float64)
    k = h.shape[0]
    tp = np.diag(h)
    gt = h.sum(1)
    pred = h.sum(0)
    total = h.sum()
    iou = _div(tp, gt + pred - tp)
    recall = _div(tp, gt)
    precision = _div(tp, pred)
    freq = gt / total if total > 0 else np.zeros(k)
    names = class_names or [str(i) for i in range(k)]

    def nanmean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")

    per_class = [
        {
            "id": i,
            "name": names[i],
            "iou": float(iou[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "tp": int(tp[i]),
            "fp": int(pred[i] - tp[i]),
            "fn": int(gt[i] - tp[i]),
        }
        for i in range(k)
    ]
    return {
        "miou": nanmean(iou),
        "acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "acc_cls": nanmean(recall),
        "fwavacc": float(np.nansum(freq[freq > 0] * iou[freq > 0])),
        "pixels": int(total),
        "per_class": per_class,
    }


def format_table(metrics: dict[str, Any]) -> str:
    """Plain-text per-class table (IoU, precision, recall in percent; TP/FP/FN in pixels) and the means."""

    def pct(x: float) -> str:
        return "   nan" if math.isnan(x) else f"{100 * x:6.2f}"

    rows = metrics["per_class"]
    width = max(8, max(len(r["name"]) for r in rows))
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>6}  {'Prec':>6}  {'Recall':>6}  {'TP':>12}  {'FP':>12}  {'FN':>12}"]
    for r in rows:
        lines.append(
            f"{r['id']:>3}  {r['name']:<{width}}  {pct(r['iou'])}  {pct(r['precision'])}  {pct(r['recall'])}"
            f"  {r['tp']:>12d}  {r['fp']:>12d}  {r['fn']:>12d}"
        )
    lines.append(
        f"mIoU {pct(metrics['miou'])}  pixel acc {pct(metrics['acc'])}  mean class acc {pct(metrics['acc_cls'])}"
        f"  fwIoU {pct(metrics['fwavacc'])}"
    )
    return "\n".join(lines)
