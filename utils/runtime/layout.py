"""Where and how a model runs on its device: memory layout (`run.channels_last`) and cuDNN autotuning. Shared by
train.py and eval.py; CPU-only kernel tuning is apart, opt-in (utils/runtime/cpu_tuning.py, `run.cpu_tuning`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`model` moved to `device`, its 4-d weights channels-last (NHWC) when asked; returned for chaining.

    Images need no conversion: a convolution with channels-last weights gives channels-last outputs, and the
    layers after it keep that layout. On a CPU, channels-last convolutions skip oneDNN's layout reorders; on a GPU
    cuDNN uses tensor cores without transposes. The modules stay what they are (plain `nn.Conv2d`).
    """
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


@contextlib.contextmanager
def no_autotune() -> Iterator[None]:
    """cuDNN autotuning off inside (restored after). Training turns it on for its fixed crops; evaluation meets
    a new shape per scale, image size and window, and tuning each would cost a search and leave its workspaces in
    the caching allocator, which the evaluation's memory plan would then count as taken."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
