"""Peak memory of a piece of code, on any device, and estimates at sizes this machine cannot run.

- `PeakMemory(device)`: on CUDA, `torch.cuda.max_memory_allocated` minus what was allocated at entry (tensor bytes
  as the caching allocator rounds them). Elsewhere, `LiveTensorBytes`: the most bytes of tensor storage alive at
  once among the tensors created inside the block (no tracemalloc, no RSS: allocator caching and the process's
  other memory do not blur it).
- `estimate_peak(...)`: the same count for a model built and run on fake tensors (shapes and dtypes, no data), so
  the recipe sizes (HRNet-OCR on a 2177-long-edge image at scale 2.0, a 1024x1024 training crop) can be checked
  on a CPU in seconds. Autocast runs as CPU autocast: convolutions and matmuls in the low precision as on CUDA,
  but CUDA also runs softmax in fp32, so the estimate is low by the two OCR softmax maps ([N, K, HW/16] each).

What neither count sees: kernel scratch space (oneDNN/cuDNN workspaces), allocator fragmentation and the CUDA
context (~0.5 GB). On a GPU, compare with `torch.cuda.max_memory_reserved` for the allocator's share.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts the storage of every tensor an op creates inside the context, until that storage is freed.

    Views share their base's storage and in-place ops create none, so each allocation is counted once; the weak
    reference callback fires when the storage itself (not one Python handle to it) is released.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(_: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            self.live -= nbytes
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._refs.clear()  # storages still alive are counted in `live`; stop watching them


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak`: bytes allocated at the peak of the block beyond what was
    allocated at entry (CUDA: allocator counters; other devices: `LiveTensorBytes`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._tracker: LiveTensorBytes | None = None
        self._base = 0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at entry"
        return "peak bytes of live tensor storage created inside the call (dispatch-mode tracker)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc)
            self.peak = self._tracker.peak


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def estimate_peak(
    build: Callable[[], nn.Module],
    inputs: Callable[[], tuple[torch.Tensor, ...]],
    run: Callable[..., Any],
    precision: str = "fp32",
) -> dict[str, int]:
    """Peak bytes of `run(model, *inputs)` at any size, counted on fake tensors.

    Returns {'static': weights + buffers + inputs, 'peak': static + the peak of the run}: the figure to hold against
    a GPU's memory (`torch.cuda.max_memory_allocated` of the same run, before allocator overheads).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from utils.runtime.precision import autocast

    with FakeTensorMode():
        model = build()
        args = inputs()
        static = tensor_bytes(model) + sum(a.numel() * a.element_size() for a in args)
        with autocast(precision, torch.device("cpu")), LiveTensorBytes() as tracker:
            run(model, *args)
    return {"static": static, "peak": static + tracker.peak}

