"""Palettes, colour predictions, overlays, attention heat maps, error and confidence maps, written as PNG files."""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from transforms.photometric import IMAGENET_MEAN, IMAGENET_STD
from utils.files import atomic_write_bytes

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] ImageNet-normalised tensor -> uint8 RGB [H,W,3]."""
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Train-id map -> RGB using the dataset palette; ignore and unknown ids are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    if ignore_index is not None and 0 <= ignore_index < 256:
        table[ignore_index] = 0
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def overlay(image_rgb: np.ndarray, color_rgb: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    return cv2.addWeighted(image_rgb, 1 - alpha, color_rgb, alpha, 0)


def heatmap(weight: np.ndarray, image_rgb: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Attention weight in [0,1] -> RGB heat map, blended over the image (resized to it) when given."""
    w = np.clip(weight, 0, 1)
    if image_rgb is not None and w.shape != image_rgb.shape[:2]:
        w = cv2.resize(w, (image_rgb.shape[1], image_rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    hm = cv2.cvtColor(cv2.applyColorMap((w * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return hm if image_rgb is None else overlay(image_rgb, hm, alpha)


def write_png(path: str, array: np.ndarray) -> None:
    """`array` (single-channel, or BGR as OpenCV orders colours) as the PNG file `path`, whole or not at all: encoded
    in memory, then written atomically (utils/files.py). cv2.imwrite on a full disk answers False or leaves a
    truncated file; here a failed write is an OSError naming `path`, and nothing is left behind."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode {path} as PNG (array {array.shape}, {array.dtype})")
    atomic_write_bytes(path, encoded.tobytes())


def write_rgb(path: str, rgb: np.ndarray) -> None:
    write_png(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def error_map(image_rgb: np.ndarray, pred: np.ndarray, target: np.ndarray, ignore_index: int) -> np.ndarray:
    """The image darkened where the prediction is right, red where it is wrong, black where the label is ignored."""
    out = (image_rgb.astype(np.float32) * 0.5).astype(np.uint8)
    valid = target != ignore_index
    out[valid & (pred != target)] = (255, 0, 0)
    out[~valid] = 0
    return out


def confidence_map(conf: np.ndarray) -> np.ndarray:
    """Max softmax probability in [0,1] -> RGB heat map (blue: unsure, red: sure)."""
    return heatmap(conf.astype(np.float32))


def sample_images(
    image_rgb: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    conf: np.ndarray | None = None,
    target: np.ndarray | None = None,
    ignore_index: int | None = None,
    scale_maps: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Every picture of one image, by kind: input, pred, overlay, [gt, error], [conf], pred_{s}x, attn_{s}x.

    `scale_maps` holds per-scale train-id maps ('pred_{s}x') and attention weights ('attn_{s}x'), each at its
    scale's resolution; attention is drawn as a heat map over the image.
    """
    color = colorize(pred, palette)
    files = {"input": image_rgb, "pred": color, "overlay": overlay(image_rgb, color)}
    if target is not None:
        files["gt"] = colorize(target, palette, ignore_index)
        files["error"] = error_map(image_rgb, pred, target, -1 if ignore_index is None else ignore_index)
    if conf is not None:
        files["conf"] = confidence_map(conf)
    for key, value in sorted((scale_maps or {}).items()):
        if key.startswith("attn_"):
            files[key] = heatmap(value.astype(np.float32), image_rgb)
        elif key.startswith("pred_"):
            files[key] = colorize(value, palette)
    return files


def write_images(out_dir: str, name: str, files: dict[str, np.ndarray]) -> dict[str, str]:
    """Write each picture as `{name}_{kind}.png`; returns kind -> path."""
    written = {}
    for kind, rgb in files.items():
        path = os.path.join(out_dir, f"{name}_{kind}.png")
        write_rgb(path, rgb)
        written[kind] = path
    return written


def side_by_side(images: list[np.ndarray], height: int) -> np.ndarray:
    """RGB images resized to one height and concatenated left to right."""
    resized = [
        im if im.shape[0] == height else cv2.resize(im, (max(1, round(im.shape[1] * height / im.shape[0])), height))
        for im in images
    ]
    return np.concatenate(resized, axis=1)
