"""Palettes, colour predictions, overlays and attention heat maps written as PNG files."""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] ImageNet-normalised tensor -> uint8 RGB [H,W,3]."""
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
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


def write_rgb(path: str, rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")


def dump_sample(
    out_dir: str,
    name: str,
    image: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    palette: np.ndarray,
    target: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> list[str]:
    """Write input, colour prediction, overlay, ground truth, per-scale predictions and attention heat maps.

    `outputs` holds one image's maps ([C,h,w]): 'pred' at input size, 'pred_{s}x' and 'attn_{s}x' per scale.
    Returns the written paths.
    """
    rgb = denormalize(image)
    pred = outputs["pred"].argmax(0).cpu().numpy()
    files = {
        "input": rgb,
        "pred": colorize(pred, palette),
        "overlay": overlay(rgb, colorize(pred, palette)),
    }
    if target is not None:
        files["gt"] = colorize(target.cpu().numpy(), palette, ignore_index)
    for key, value in outputs.items():
        if key.startswith("attn_"):
            files[key] = heatmap(value[0].float().cpu().numpy(), rgb)
        elif key.startswith("pred_"):
            files[key] = colorize(value.argmax(0).cpu().numpy(), palette)
    written = []
    for suffix, arr in files.items():
        path = os.path.join(out_dir, f"{name}_{suffix}.png")
        write_rgb(path, arr)
        written.append(path)
    return written
