"""Where and in which memory layout a model runs: one function for train.py and eval.py (`run.channels_last`)."""
from __future__ import annotations

import torch
from torch import nn


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`model` moved to `device`, its 4-d weights channels-last (NHWC) when asked; returned for chaining.

    Images need no conversion: a convolution with channels-last weights gives channels-last outputs, and the
    layers after it keep that layout. On this project's CPU benchmark, channels-last inference is faster at fp32
    rounding (docs/performance.md); on a GPU it lets cuDNN use tensor cores without transposes.
    """
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)
