"""ONNX export of a (multi-scale) model for a fixed scale set, fusion rule and input size, and its check against
PyTorch with ONNX Runtime."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .multiscale import Inference, MultiScalePass


class FixedScaleModel(nn.Module):
    """images [N,3,H,W] -> fused logits [N,K,H,W] for one (scale set, fusion, flip): what gets exported."""

    def __init__(self, model: nn.Module, how: Inference):
        super().__init__()
        self.model = model
        self.combo = how.combo(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return MultiScalePass(self.model, images, self.combo.scales, self.combo.flip).logits(self.combo)


def export_onnx(module: FixedScaleModel, path: str, example: torch.Tensor, dynamo: bool = True) -> str:
    """Write `module` as ONNX for inputs shaped like `example` (input 'images', output 'logits').

    dynamo: torch's current exporter (needs onnxscript); False uses the older TorchScript-based one.
    """
    module = module.eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, (example,), path, dynamo=dynamo, input_names=["images"], output_names=["logits"],
                          opset_version=18 if dynamo else 17)
    return path


@dataclass
class OnnxCheck:
    max_abs_diff: float  # largest |logit_onnx - logit_torch| over all inputs
    agreement: float  # fraction of pixels whose argmax agrees
    pixels: int

    def __str__(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g}, argmax agrees on {100 * self.agreement:.4f}% of "
                f"{self.pixels} pixels")


@torch.no_grad()
def check_onnx(path: str, module: FixedScaleModel, inputs: Sequence[torch.Tensor]) -> OnnxCheck:
    """Run the ONNX file with ONNX Runtime (CPU) and the PyTorch module on the same inputs; compare."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    module = module.eval()
    worst, agree, pixels = 0.0, 0, 0
    for x in inputs:
        ours = module(x).float().cpu()
        theirs = torch.from_numpy(session.run(["logits"], {"images": x.cpu().numpy().astype(np.float32)})[0])
        if theirs.shape != ours.shape:
            raise ValueError(f"{path}: ONNX output shape {tuple(theirs.shape)} != PyTorch {tuple(ours.shape)}")
        worst = max(worst, float((theirs - ours).abs().max()))
        agree += int((theirs.argmax(1) == ours.argmax(1)).sum())
        pixels += ours.shape[0] * ours.shape[2] * ours.shape[3]
    return OnnxCheck(worst, agree / max(pixels, 1), pixels)
