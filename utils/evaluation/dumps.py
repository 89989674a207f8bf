"""What evaluation writes per image: picture dumps (chosen by a selection rule, from every rank) and label-id
PNGs for the Cityscapes test server or for autolabelling (resumable: existing files are skipped).

Dump selection (`eval.dump`, with N = `eval.num_dump`), by the image's index in the evaluated dataset:
    none   nothing
    first  the first N images
    all    every image
    every  every N-th image (index 0, N, 2N, ...)
    worst  the N images with the lowest mIoU over the classes present in them (needs labels); each rank keeps
           its N worst while it runs, and the N worst overall are chosen across ranks at the end
"""
from __future__ import annotations

import heapq
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ..runtime.dist import all_gather_objects
from .metrics import confusion_matrix
from .visualize import denormalize, sample_images, write_images, write_png

DUMP_MODES = ("none", "first", "all", "every", "worst")


def check_dump_mode(mode: str, num_dump: int) -> None:
    if mode not in DUMP_MODES:
        raise ValueError(f"eval.dump must be one of {', '.join(DUMP_MODES)}, got {mode!r}")
    if mode in ("first", "every", "worst") and num_dump < 0:
        raise ValueError(f"eval.num_dump must be >= 0, got {num_dump}")
    if mode == "every" and num_dump == 0:
        raise ValueError("eval.dump=every needs eval.num_dump >= 1 (the step between dumped images)")


def image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of one image over the classes present in its ground truth or prediction (NaN if none)."""
    hist = confusion_matrix(pred, target, num_classes).double()
    tp = hist.diag()
    union = hist.sum(0) + hist.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else math.nan


@dataclass
class DumpRecord:
    """One image's pictures as compact arrays, kept until written (the 'worst' selection holds N of them)."""

    index: int
    name: str
    score: float
    image: np.ndarray  # uint8 RGB [H, W, 3]
    pred: np.ndarray  # train ids [H, W]
    conf: np.ndarray  # max softmax probability, float16 [H, W]
    target: np.ndarray | None  # train ids [H, W]
    scale_maps: dict[str, np.ndarray] = field(default_factory=dict)  # pred_{s}x ids, attn_{s}x weights

    def __lt__(self, other: "DumpRecord") -> bool:  # heap order: the best (highest score) on top
        return (-self.score, self.index) < (-other.score, other.index)


def make_record(
    index: int,
    name: str,
    image: torch.Tensor,
    logits: torch.Tensor,
    maps: dict[str, torch.Tensor],
    target: torch.Tensor | None,
    score: float,
) -> DumpRecord:
    """A DumpRecord from one image's tensors: input [3,H,W], logits [K,H,W], per-scale maps, target [H,W]."""
    conf, pred = logits.float().softmax(0).max(0)
    rgb = denormalize(image)
    if rgb.shape[:2] != tuple(pred.shape):  # labels kept at native size (data.eval_native_labels)
        rgb = cv2.resize(rgb, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_LINEAR)
    scale_maps = {}
    for key, value in maps.items():
        if key.startswith("pred_"):
            scale_maps[key] = value.argmax(0).to(torch.uint8).cpu().numpy()
        elif key.startswith("attn_"):
            scale_maps[key] = value[0].float().cpu().numpy().astype(np.float16)
    return DumpRecord(
        index=index,
        name=name,
        score=score,
        image=rgb,
        pred=pred.to(torch.uint8).cpu().numpy(),
        conf=conf.cpu().numpy().astype(np.float16),
        target=None if target is None else target.cpu().numpy(),
        scale_maps=scale_maps,
    )


class ImageDumper:
    """Writes the selected images' pictures to `out_dir` as `{name}_{kind}.png`."""

    def __init__(
        self, out_dir: str, mode: str, num_dump: int, palette: np.ndarray, ignore_index: int, num_classes: int
    ) -> None:
        check_dump_mode(mode, num_dump)
        self.out_dir, self.mode, self.n = out_dir, mode, num_dump
        self.palette, self.ignore_index, self.num_classes = palette, ignore_index, num_classes
        self.entries: list[dict] = []  # {'index', 'name', 'score', 'files': {kind: path}} written by this rank
        self._worst: list[DumpRecord] = []  # max-heap on score (via DumpRecord.__lt__) of this rank's N worst

    @property
    def active(self) -> bool:
        return self.mode != "none" and (self.mode == "all" or self.n > 0)

    def wants(self, index: int) -> bool:
        """Whether image `index` may be dumped (for 'worst': whether it has to be scored)."""
        if self.mode == "first":
            return index < self.n
        if self.mode == "every":
            return index % self.n == 0
        return self.mode in ("all", "worst") and self.active

    def add(self, record_fn: Callable[[], DumpRecord], index: int, score: float) -> None:
        """Offer image `index`; `record_fn()` builds its DumpRecord only when it is kept."""
        if not self.wants(index):
            return
        if self.mode != "worst":
            self._write(record_fn())
            return
        if math.isnan(score):
            raise ValueError("eval.dump=worst needs labelled images (an image without any labelled pixel, or an "
                             "unlabelled split, has no IoU)")
        if len(self._worst) < self.n:
            heapq.heappush(self._worst, record_fn())
        elif score < self._worst[0].score:
            heapq.heapreplace(self._worst, record_fn())

    def _write(self, rec: DumpRecord) -> None:
        pictures = sample_images(rec.image, rec.pred, self.palette, rec.conf, rec.target, self.ignore_index,
                                 rec.scale_maps)
        files = write_images(self.out_dir, rec.name, pictures)
        self.entries.append({"index": rec.index, "name": rec.name, "score": rec.score, "files": files})

    def finish(self) -> list[dict]:
        """Write the held 'worst' images that are among the N worst of all ranks; return every rank's entries
        (sorted by index, or by score for 'worst')."""
        if self.mode == "worst":
            mine = [(r.score, r.name) for r in self._worst]
            everyone = sorted(x for part in all_gather_objects(mine) for x in part)[: self.n]
            keep = set(everyone)
            for rec in sorted(self._worst, key=lambda r: r.score):
                if (rec.score, rec.name) in keep:
                    self._write(rec)
            self._worst = []
        entries = [e for part in all_gather_objects(self.entries) for e in part]
        key = (lambda e: (e["score"], e["index"])) if self.mode == "worst" else (lambda e: e["index"])
        return sorted(entries, key=key)


# ----------------------------------------------------------------------------------------------- label ids


def train_to_label_lut(id_to_train: dict[int, int], num_classes: int) -> np.ndarray:
    """Lookup table train id -> dataset label id (e.g. Cityscapes 0 -> 7 road); train ids without a label id
    (the ignore value) map to the smallest label id mapping to ignore, else 0."""
    lut_size = 256
    by_train: dict[int, int] = {}
    for label_id, train_id in sorted(id_to_train.items()):
        by_train.setdefault(train_id, label_id)
    missing = [t for t in range(num_classes) if t not in by_train]
    if missing:
        raise ValueError(f"the label table has no label id for train ids {missing}")
    ignore_ids = [label for label, train in sorted(id_to_train.items()) if train >= num_classes]
    dtype = np.uint8 if max(id_to_train) < 256 else np.uint16
    lut = np.full(lut_size, ignore_ids[0] if ignore_ids else 0, dtype=dtype)
    for train_id, label_id in by_train.items():
        if train_id < num_classes:
            lut[train_id] = label_id
    return lut


class LabelIdWriter:
    """`{stem}.png` with dataset label ids (test-server submission) and, for autolabelling, `{stem}_prob.png`
    with uint8(255 * max softmax probability). Images whose files exist are skipped (resumable): each file is
    written atomically (`write_png`), so an interrupted run or a full disk leaves no half file that a resume
    would take for a finished one.

    `stems` maps an item's name to the stem of its image file (Cityscapes: `<name>_leftImg8bit`, the layout the
    coarse-data recipe reads); names missing from it are used as they are.
    """

    def __init__(self, out_dir: str, lut: np.ndarray, with_prob: bool, stems: dict[str, str] | None = None) -> None:
        self.out_dir, self.lut, self.with_prob = out_dir, lut, with_prob
        self.stems = stems or {}
        self.written = 0
        self.skipped = 0

    def paths(self, name: str) -> list[str]:
        base = os.path.join(self.out_dir, self.stems.get(name, name))
        return [base + ".png"] + ([base + "_prob.png"] if self.with_prob else [])

    def done(self, name: str) -> bool:
        return all(os.path.isfile(p) for p in self.paths(name))

    def add(self, name: str, logits: torch.Tensor) -> None:
        """Write one image's files from its logits [K, H, W] (skipped when they already exist)."""
        if self.done(name):
            self.skipped += 1
            return
        paths = self.paths(name)
        prob, pred = logits.float().softmax(0).max(0)
        write_png(paths[0], self.lut[pred.cpu().numpy()])
        if self.with_prob:
            write_png(paths[1], (prob.cpu().numpy() * 255).astype(np.uint8))  # truncated, as the original
        self.written += 1
