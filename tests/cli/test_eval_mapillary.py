"""Mapillary evaluation of a checkpoint end to end, on a small generated Mapillary folder whose validation images
are downscaled and upscaled to the eval size: what the network sees and what is scored are Pillow's resizes, with
the original's truncated sizes, and the metrics equal those computed here from first principles."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
from tests.fixtures import TINY_MODEL_OVERRIDE, tiny_model
from utils.engine import predict
from utils.inference import Inference

LABELS = [
    {"readable": "Road", "name": "construction--flat--road", "color": [128, 64, 128], "evaluate": True},
    {"readable": "Sky", "name": "nature--sky", "color": [70, 130, 180], "evaluate": True},
    {"readable": "Car", "name": "object--vehicle--car", "color": [0, 0, 142], "evaluate": True},
    {"readable": "Unlabeled", "name": "void--unlabeled", "color": [0, 0, 0], "evaluate": False},
]
EVAL_SIZE = 64
# (width, height): downscaled (long edge 150 -> 64: 64x42 by truncation, 42.66), upscaled (40 -> 64), exact
SIZES = [(150, 100), (30, 40), (64, 48)]


def scene(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Sky above road with a car: a smooth image (so resampling matters) and its label indices (3 = unlabeled)."""
    label = np.zeros((h, w), np.uint8)
    label[: h // 2] = 1
    label[h // 2 : h // 2 + h // 4, w // 4 : w // 2] = 2
    label[-2:, :3] = 3
    image = np.stack([label * 60 + 30, 200 - label * 50, 90 + label * 20], -1).astype(np.float64)
    image += rng.normal(0, 25, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


@pytest.fixture(scope="module")
def mapillary(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvd_eval")
    (root / "config.json").write_text(json.dumps({"labels": LABELS}))
    rng = np.random.default_rng(3)
    for split, sizes in (("training", SIZES[:1]), ("validation", SIZES)):
        os.makedirs(root / split / "images")
        os.makedirs(root / split / "labels")
        for i, (w, h) in enumerate(sizes):
            image, label = scene(rng, w, h)
            Image.fromarray(image).save(root / split / "images" / f"v{i}.png")  # lossless, unlike JPEG
            pal = Image.fromarray(label, mode="P")
            pal.putpalette([c for lab in LABELS for c in lab["color"]] + [0] * (768 - 12))
            pal.save(root / split / "labels" / f"v{i}.png")
    model = tiny_model(num_classes=3)
    ckpt = root / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return root, ckpt, model.eval()


def expected_hist(root, model, scales) -> np.ndarray:
    """The confusion matrix from Pillow's resizes (BILINEAR image, NEAREST mask, other side truncated)."""
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    hist = np.zeros((3, 3), np.int64)
    for i, (w, h) in enumerate(SIZES):
        image = Image.open(root / "validation" / "images" / f"v{i}.png").convert("RGB")
        label = Image.open(root / "validation" / "labels" / f"v{i}.png")
        long_edge = max(w, h)
        size = (EVAL_SIZE, int(h * EVAL_SIZE / long_edge)) if w >= h else (int(w * EVAL_SIZE / long_edge), EVAL_SIZE)
        if size != (w, h):
            image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        x = torch.from_numpy(((np.asarray(image, np.float64) - mean) / std).astype(np.float32)).permute(2, 0, 1)
        with torch.inference_mode():
            pred = predict(model, x[None], Inference.make(scales))["pred"][0].argmax(0).numpy()
        gt = np.asarray(label).astype(np.int64)
        keep = gt < 3
        hist += np.bincount(3 * gt[keep] + pred[keep], minlength=9).reshape(3, 3)
    return hist


@pytest.mark.slow
def test_mapillary_eval_scores_pillow_resized_images(mapillary, tmp_path):
    root, ckpt, model = mapillary
    # the sizes the original gives: 150x100 -> 64x42, 30x40 -> 48x64, 64x48 unchanged
    assert [int(h * EVAL_SIZE / max(w, h)) if w >= h else int(w * EVAL_SIZE / max(w, h)) for w, h in SIZES] == [42, 48, 48]
    summary = eval_script.main([
        "data.dataset=mapillary", f"data.root={root}", f"data.eval_size={EVAL_SIZE}", "data.val_batch_size=1",
        "data.num_workers=0", TINY_MODEL_OVERRIDE,
        "eval.scales=[0.5,1.0]", "eval.dump=none", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"),
    ])
    hist = expected_hist(root, model, [0.5, 1.0])
    iou = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    assert summary["images"] == 3
    assert summary["miou"] == pytest.approx(float(np.nanmean(iou)), abs=1e-12)
    assert summary["acc"] == pytest.approx(np.diag(hist).sum() / hist.sum(), abs=1e-12)
