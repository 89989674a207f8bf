"""Video inference: frames are read, segmented and written one at a time (never held in memory), with the
colour overlay and, optionally, each scale's attention heat map side by side."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from .multiscale import Inference, MultiScalePass
from ..runtime.precision import autocast
from ..evaluation.visualize import colorize, denormalize, heatmap, overlay, side_by_side
from ..log import Progress

log = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video cannot be opened, decoded or written; the message names the file."""


class VideoReader:
    """RGB frames of a video file; opening checks that the file exists and that its first frame decodes.

    A video that ends before the frame count its container announces (a truncated or damaged file) ends with a
    warning giving both numbers; `frames_read` counts the frames delivered.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video not found: {path}")
        self.path = path
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise VideoError(f"cannot open video (unknown container or codec, or not a video): {path}")
        ok, frame = self.cap.read()
        if not ok or frame is None:
            self.cap.release()
            raise VideoError(f"cannot decode a frame of video {path}")
        self._first = frame
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and math.isfinite(fps) and fps > 0 else 25.0
        self.frame_count = max(0, int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)))  # 0 when the container lacks it
        self.frames_read = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        frame = self._first
        while frame is not None:
            self.frames_read += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            ok, frame = self.cap.read()
            frame = frame if ok else None
        if self.frames_read < self.frame_count:
            log.warning("video %s ended after %d of the %d frames its container announces: the file is truncated "
                        "or damaged (the frames read were processed)", self.path, self.frames_read, self.frame_count)

    def close(self) -> None:
        self.cap.release()


def annotate_frame(
    image: torch.Tensor, out: dict[str, torch.Tensor], palette: np.ndarray, attention: bool
) -> np.ndarray:
    """One output frame (RGB): the overlay of the prediction, then each scale's attention over the image."""
    rgb = denormalize(image)
    pred = out["pred"].argmax(0).cpu().numpy()
    panels = [overlay(rgb, colorize(pred, palette))]
    if attention:
        keys = sorted((k for k in out if k.startswith("attn_")), key=lambda k: float(k[5:-1]))
        panels += [heatmap(out[k][0].float().cpu().numpy(), rgb) for k in keys]
    return side_by_side(panels, rgb.shape[0])


@torch.inference_mode()
def annotate_video(
    model: nn.Module,
    reader: VideoReader,
    out_path: str,
    transform: Callable[..., tuple[torch.Tensor, Any]],
    palette: np.ndarray,
    device: torch.device,
    how: Inference,
    attention: bool = False,
    progress: Progress | None = None,
) -> int:
    """Segment every frame of `reader` and write the annotated video to `out_path` (mp4v); returns the number
    of frames written. `transform(rgb, None)` gives the normalised image tensor (the evaluation transform)."""
    model.eval()
    combo = how.combo(model)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = None
    count = 0
    try:
        for rgb in reader:
            image, _ = transform(rgb, None)
            batch = image.unsqueeze(0).to(device)
            with autocast(how.precision, device):
                run = MultiScalePass(model, batch, combo.scales, combo.flip, how.window, how.overlap)
            out = {"pred": run.logits(combo)[0], **{k: v[0] for k, v in run.maps().items()}}
            frame = annotate_frame(image, out, palette, attention)
            if writer is None:
                size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), reader.fps, size)
                if not writer.isOpened():
                    raise VideoError(f"cannot write video {out_path} (mp4v codec unavailable?)")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            count += 1
            if progress is not None:
                progress.update(count)
    finally:
        if writer is not None:
            writer.release()
        reader.close()
    if progress is not None:
        progress.update(count, final=True)
    return count
