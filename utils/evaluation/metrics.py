"""Confusion matrix (int64, on the device, all-reducible) and the metrics derived from it.

Rows are ground truth, columns predictions: hist[g, p]. Precision of class c is TP / (column sum), recall is
TP / (row sum) (the original swaps the two: docs/differences.md).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from utils.files import atomic_write_text


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [K, K] counts of (target, pred) over pixels whose target lies in [0, K)."""
    valid = (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_counter(target: torch.Tensor, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`confusion_matrix(pred, target, K)` for many predictions of one target (the scale-set sweep scores dozens
    per batch): row offsets are computed once, and pixels outside [0, K) are counted into spare bins past K*K that
    are dropped, which avoids a boolean gather per prediction."""
    k2 = num_classes * num_classes
    valid = (target >= 0) & (target < num_classes)
    offsets = torch.where(valid, target.long() * num_classes, k2).view(-1)

    def count(pred: torch.Tensor) -> torch.Tensor:
        idx = offsets + pred.view(-1).long()
        return torch.bincount(idx, minlength=k2 + num_classes)[:k2].view(num_classes, num_classes)

    return count


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


def write_per_class_csv(path: str, metrics: dict[str, Any]) -> None:
    """The per-class table as CSV: id, class, IoU, precision, recall (fractions), TP, FP, FN (pixels)."""
    fields = ["id", "name", "iou", "precision", "recall", "tp", "fp", "fn"]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(fields)
    for r in metrics["per_class"]:
        w.writerow([r[k] for k in fields])
    atomic_write_text(path, text.getvalue())  # whole or not at all, as every evaluation output


# ----------------------------------------------------------------------------------------------- scale-set sweep


def sweep_results(
    rows: list[tuple[dict[str, Any], torch.Tensor | np.ndarray]], class_names: list[str]
) -> dict[str, Any]:
    """Metrics of every sweep combination and their gain over single-scale inference.

    `rows` holds ({'scales': [...], 'fusion': str, 'flip': bool}, hist). The baseline of a row is the single
    scale [1.0] with the same flip; gains are in IoU points (x100), per class and for the mean.
    """
    table = []
    for label, hist in rows:
        m = compute_metrics(hist, class_names)
        table.append({**label, "miou": m["miou"], "acc": m["acc"], "iou": [r["iou"] for r in m["per_class"]]})
    base = {r["flip"]: r for r in table if list(r["scales"]) == [1.0]}
    for r in table:
        b = base.get(r["flip"])
        if b is None:
            raise ValueError(f"the sweep has no single-scale [1.0] row with flip={r['flip']} to compare against")
        r["miou_gain"] = 100 * (r["miou"] - b["miou"])
        r["gain"] = [100 * (x - y) for x, y in zip(r["iou"], b["iou"])]
    return {"classes": list(class_names), "baseline": "scales [1.0] with the same flip", "rows": table}


def format_sweep(results: dict[str, Any], class_width: int = 6) -> str:
    """One line per combination: set, fusion, flip, mIoU (%), its gain and each class's gain (IoU points)."""
    names = [_abbrev(n, class_width) for n in results["classes"]]
    sets = [_set_label(r["scales"]) for r in results["rows"]]
    sw = max(5, *(len(s) for s in sets))
    head = f"{'set':<{sw}}  {'fusion':<9}  {'flip':<4}  {'mIoU':>6}  {'gain':>6}  " + "  ".join(
        f"{n:>{class_width}}" for n in names)
    lines = [head, "-" * len(head)]
    for s, r in zip(sets, results["rows"]):
        gains = "  ".join(_num(g, class_width, sign=True) for g in r["gain"])
        lines.append(f"{s:<{sw}}  {r['fusion']:<9}  {'yes' if r['flip'] else 'no':<4}  {_num(100 * r['miou'], 6)}"
                     f"  {_num(r['miou_gain'], 6, sign=True)}  {gains}")
    lines.append("gain: IoU points over single-scale [1.0] inference with the same flip (per class to the right)")
    return "\n".join(lines)


def write_sweep(results: dict[str, Any], json_path: str, csv_path: str) -> None:
    """The sweep as JSON (everything) and CSV (one row per combination, IoU and gain per class), each atomically."""
    atomic_write_text(json_path, json.dumps(results, indent=1))
    names = results["classes"]
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["scales", "fusion", "flip", "miou", "miou_gain"] + [f"iou_{n}" for n in names]
               + [f"gain_{n}" for n in names])
    for r in results["rows"]:
        w.writerow([" ".join(f"{s:g}" for s in sorted(r["scales"])), r["fusion"], int(r["flip"]), r["miou"],
                    r["miou_gain"]] + r["iou"] + r["gain"])
    atomic_write_text(csv_path, table.getvalue())


def _abbrev(name: str, width: int) -> str:
    """A column header of at most `width` characters: 'traffic light' -> 'tr.lig', 'sidewalk' -> 'sidewa'."""
    words = name.split()
    if len(name) <= width or len(words) < 2:
        return name[:width]
    head = max(1, (width - 1) // 2)
    return f"{words[0][:head]}.{words[-1][: width - head - 1]}"


def _set_label(scales: list[float]) -> str:
    return "[" + ",".join(f"{s:g}" for s in sorted(scales)) + "]"


def _num(x: float, width: int, sign: bool = False) -> str:
    if math.isnan(x):
        return f"{'nan':>{width}}"
    return f"{x:+{width}.2f}" if sign else f"{x:{width}.2f}"
