"""The auto-label report: how much of each class survives the probability threshold, and sample images.

A static HTML page in the style of the results page (results_page.py): a table with, per class, the pixels the
teacher gave that class and the share of them at or above the threshold (the pixels a student trains on; the rest
become ignore), then, per sampled image, the input, the label, the probability map and the thresholded mask side
by side. The page links its PNGs by relative path, so the folder can be copied as a whole.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from utils.evaluation.results_page import STYLE, percent
from utils.files import atomic_write_text

BELOW = (0, 0, 0)  # colour of the pixels the threshold drops (ignore) in the thresholded mask


def kept(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels a student trains on: probability (uint8, 255 = 1.0) at or above the threshold; the data pipeline
    ignores those with prob / 255 < threshold (the original's comparison, on the same uint8 values)."""
    return ~(prob / 255.0 < threshold)


@dataclass
class ThresholdStats:
    """Pixel counts per train id over a set of auto-labels: labelled by the teacher, and kept by the threshold."""

    num_classes: int
    threshold: float
    pixels: np.ndarray = field(init=False)
    kept: np.ndarray = field(init=False)
    images: int = 0

    def __post_init__(self) -> None:
        self.pixels = np.zeros(self.num_classes, np.int64)
        self.kept = np.zeros(self.num_classes, np.int64)

    def add(self, train_ids: np.ndarray, prob: np.ndarray) -> None:
        """One image: its label as train ids (values >= num_classes are not counted) and its probability map."""
        if train_ids.shape != prob.shape:
            raise ValueError(f"label {train_ids.shape} and probability map {prob.shape} differ in size")
        ids = train_ids.ravel().astype(np.int64)
        valid = ids < self.num_classes
        self.pixels += np.bincount(ids[valid], minlength=self.num_classes)[: self.num_classes]
        above = valid & kept(prob, self.threshold).ravel()
        self.kept += np.bincount(ids[above], minlength=self.num_classes)[: self.num_classes]
        self.images += 1

    def kept_share(self) -> float:
        """Share of all labelled pixels at or above the threshold (NaN when there are none)."""
        total = int(self.pixels.sum())
        return float(self.kept.sum()) / total if total else float("nan")

    def per_class(self, names: list[str]) -> list[dict[str, Any]]:
        total = max(int(self.pixels.sum()), 1)
        return [{"id": c, "name": names[c], "pixels": int(self.pixels[c]), "share": int(self.pixels[c]) / total,
                 "kept": int(self.kept[c]),
                 "kept_share": int(self.kept[c]) / int(self.pixels[c]) if self.pixels[c] else float("nan")}
                for c in range(self.num_classes)]


def sample_pictures(image: np.ndarray, train_ids: np.ndarray, prob: np.ndarray, threshold: float,
                    palette: np.ndarray) -> dict[str, np.ndarray]:
    """RGB pictures of one auto-label: the input, the label (class colours; ignore black), the probability map
    (grey, white = 1) and the thresholded mask (the label where kept, black where the threshold drops it)."""
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = palette
    label = colours[train_ids]
    thresholded = label.copy()
    thresholded[~kept(prob, threshold)] = BELOW
    return {"input": image, "label": label, "prob": np.repeat(prob[..., None], 3, axis=2),
            "thresholded": thresholded}


def _class_table(stats: ThresholdStats, names: list[str]) -> str:
    head = ("<tr><th>id</th><th>class</th><th>pixels</th><th>share of labelled</th>"
            f"<th>kept (prob &ge; {stats.threshold:g})</th><th>kept share</th></tr>")
    rows = [f"<tr><td>{r['id']}</td><td>{html.escape(r['name'])}</td><td>{r['pixels']}</td><td>{percent(r['share'])}"
            f"</td><td>{r['kept']}</td><td>{percent(r['kept_share'])}</td></tr>" for r in stats.per_class(names)]
    summary = (f"<p>{stats.images} images auto-labelled; {int(stats.pixels.sum())} labelled pixels, of which "
               f"<b>{percent(stats.kept_share())}%</b> are at or above the threshold {stats.threshold:g} (the rest "
               "become ignore in the student's training)</p>")
    return summary + f"<table class='metrics'>{head}{''.join(rows)}</table>"


def write_autolabel_page(path: str, title: str, stats: ThresholdStats, names: list[str],
                         samples: list[dict[str, Any]]) -> str:
    """Write `path`: the per-class threshold table, then per sample ({'name', 'files': {kind: path}}) its
    pictures in the order input, label, prob, thresholded, each linked to the full-size file."""
    folder = os.path.dirname(os.path.abspath(path))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", _class_table(stats, names),
             f"<h2>Sample images ({len(samples)})</h2>"]
    order = ("input", "label", "prob", "thresholded")
    for entry in samples:
        kinds = [k for k in order if k in entry["files"]] + sorted(k for k in entry["files"] if k not in order)
        cells = []
        for kind in kinds:
            rel = html.escape(os.path.relpath(os.path.abspath(entry["files"][kind]), folder))
            cells.append(f"<figure><a href='{rel}'><img src='{rel}' alt='{html.escape(kind)}'></a>"
                         f"<figcaption>{html.escape(kind)}</figcaption></figure>")
        parts.append(f"<div class='sample'><h3>{html.escape(entry['name'])}</h3><div class='grid'>{''.join(cells)}"
                     "</div></div>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path
