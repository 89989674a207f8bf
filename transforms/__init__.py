"""Joint (image + mask) and photometric transforms, and build_transforms(cfg, train, ignore_index)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .joint import CenterCropPad, HorizontalFlip, RandomScaleCrop, ResizeHeight, ResizeLongEdge
from .photometric import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BilateralBlur,
    ColorJitter,
    GaussianBlur,
    Normalize,
    OpenCVColorJitter,
    OpenCVGaussianBlur,
)

__all__ = [
    "SegTransform",
    "build_transforms",
    "RandomScaleCrop",
    "HorizontalFlip",
    "ResizeLongEdge",
    "ResizeHeight",
    "CenterCropPad",
    "ColorJitter",
    "GaussianBlur",
    "OpenCVColorJitter",
    "OpenCVGaussianBlur",
    "BilateralBlur",
    "Normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


class SegTransform:
    """Joint transforms, then image-only transforms, then normalisation to tensors.

    Called as `t(image, mask, rng, centroid=None) -> (image float32 [3,H,W], mask int64 [H,W] or None)`.
    """

    def __init__(self, joint: Sequence = (), photometric: Sequence = (), normalize: Normalize | None = None):
        self.joint = list(joint)
        self.photometric = list(photometric)
        self.normalize = normalize or Normalize()

    def __repr__(self) -> str:
        return f"SegTransform(joint={self.joint}, photometric={self.photometric})"

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None,
        rng: np.random.Generator | None = None,
        centroid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if rng is None:
            rng = np.random.default_rng()
        for t in self.joint:
            image, mask = t(image, mask, rng, centroid)
        for t in self.photometric:
            image = t(image, rng)
        mask_t = None if mask is None else torch.from_numpy(mask.astype(np.int64))
        return self.normalize(image), mask_t


def build_transforms(cfg, train: bool, ignore_index: int) -> SegTransform:
    """The original's pipeline from a DataConfig.

    Train: random scale + crop (+ augment.long_edge), flip, [RandAugment], colour jitter, bilateral or Gaussian blur,
    normalisation. Val: normalisation only, or a long-edge resize to `eval_size` (else `augment.long_edge`) when set
    (Mapillary evaluates at long edge 2177); with `map_crop_val`, a resize of the height to that size and the
    original's CenterCropPad instead. `resample` picks Pillow's (the original's) or OpenCV's resizing,
    `crop_placement` the original's or our uniform crop placement, `photometric` the original's colour jitter
    and Gaussian blur (Pillow and skimage values) or faster OpenCV approximations.
    """
    resample = cfg.resample
    if not train:
        joint = []
        eval_size = cfg.eval_size or cfg.augment.long_edge
        if cfg.map_crop_val:
            if eval_size <= 0:
                raise ValueError("data.map_crop_val needs data.eval_size (or data.augment.long_edge) > 0: the crop size")
            if cfg.eval_native_labels:
                raise ValueError("data.map_crop_val crops the labels too: it cannot be combined with "
                                 "data.eval_native_labels=true")
            joint += [ResizeHeight(eval_size, resample), CenterCropPad(eval_size, ignore_index)]
        elif eval_size > 0:
            joint.append(ResizeLongEdge(eval_size, resize_mask=not cfg.eval_native_labels, resample=resample))
        return SegTransform(joint)
    aug = cfg.augment
    joint: list = [RandomScaleCrop(aug.crop_size, aug.scale_min, aug.scale_max, aug.long_edge, ignore_index,
                                   resample=resample, placement=aug.crop_placement)]
    if aug.hflip:
        joint.append(HorizontalFlip(0.5))
    rand_augment = aug.rand_augment
    if rand_augment:
        from .randaugment import RandAugment

        if len(rand_augment) != 2:
            raise ValueError(f"data.augment.rand_augment must be [N, M] (ops per image, magnitude 0..30), "
                             f"got {rand_augment}")

        joint.append(RandAugment(rand_augment[0], rand_augment[1], ignore_index))
    fast = aug.photometric == "opencv"
    photometric: list = []
    if aug.color_jitter > 0:
        photometric.append((OpenCVColorJitter if fast else ColorJitter)(aug.color_jitter))
    if aug.bilateral_blur:
        photometric.append(BilateralBlur())
    elif aug.gaussian_blur:
        photometric.append(OpenCVGaussianBlur() if fast else GaussianBlur())
    return SegTransform(joint, photometric)
