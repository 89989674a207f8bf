"""Where and how a model runs on its device: memory layout (`run.channels_last`) and, on a CPU, whether freed host
memory is kept for reuse (`run.host_memory`). Shared by train.py and eval.py."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

import torch
from torch import nn

from utils.runtime.cpu_conv import route_weight_grads

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def place_model(model: nn.Module, device: torch.device, channels_last: bool, retain_memory: bool = False) -> nn.Module:
    """`model` moved to `device`, its 4-d weights channels-last (NHWC) when asked; returned for chaining.

    Images need no conversion: a convolution with channels-last weights gives channels-last outputs, and the
    layers after it keep that layout. On a CPU, channels-last convolutions skip oneDNN's layout reorders; on a GPU
    cuDNN uses tensor cores without transposes. Channels-last on a CPU also routes the 1x1 convolutions to oneDNN
    (`route_pointwise_to_onednn`) and the convolutions' weight gradients to faster kernels (`route_weight_grads`).
    `retain_memory` applies `retain_host_memory` on a CPU device.
    """
    fmt = torch.channels_last if channels_last else torch.preserve_format
    if retain_memory and device.type == "cpu":
        retain_host_memory()
    if channels_last and device.type == "cpu":
        route_pointwise_to_onednn(model)
        route_weight_grads(model)
    return model.to(device, memory_format=fmt)


def route_pointwise_to_onednn(model: nn.Module) -> int:
    """Give every 1x1 convolution of `model` dilation 2, which sends it to oneDNN on a CPU; returns how many.

    With one thread PyTorch computes undilated, stride-1 1x1 convolutions with its own GEMM loop instead of
    oneDNN, which is 1.3x slower at these shapes on fp32 (docs/performance.md). With more threads it uses oneDNN
    anyway. A 1x1 kernel has one tap, so dilation does not change the output or its size: the same sum, at fp32
    rounding (oneDNN adds in another order). The weights and the state dict do not change.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.dilation == (1, 1):
            m.dilation = (2, 2)
            count += 1
    return count


def retain_host_memory() -> bool:
    """Keep freed host memory in the process for reuse (glibc malloc); True when applied, False elsewhere.

    PyTorch's CPU tensors come straight from malloc, and glibc serves large blocks with mmap and returns them on
    free: every training step or inference then faults its activations' pages in again, zero-filled by the kernel
    (about 8% of a full-width inference on a CPU, docs/performance.md). Without mmap-ed blocks and with a high
    trim threshold the pages stay mapped and are reused; the process keeps its peak memory until it exits.
    No numbers change. Process-wide, once is enough (forked data-loader workers inherit it).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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
