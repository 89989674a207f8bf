"""Memory planning: the peak memory of an evaluation call and of a training step, predicted before they run.

- Counting: `LiveTensorBytes` (a dispatch mode) counts the bytes of tensor storage alive at once among the tensors
  created inside it; `PeakMemory(device)` is that count on a CPU and `torch.cuda.max_memory_allocated` on CUDA.
- Tracing: the network runs once per input shape on fake tensors (shapes and dtypes, no data), which gives the
  peak of one pass and the shapes of its outputs in a second or two even for HRNet-OCR at 4096 pixels wide;
  traces are cached per (model, input shape, precision), so per (model, image size, scales, precision).
- Planning: an evaluation call (utils/engine.py `evaluate`, one batch) is replayed on fake tensors under each
  schedule of `utils/inference/multiscale.py` with the network replaced by its trace; what the fusions, the
  mirrored pass, the metrics and the dumps hold is counted as it happens. `choose_schedule` takes the first
  schedule of the ladder (exact ones, then approximate ones when eval.memory_fallback=any) whose peak fits
  eval.memory_budget.
- A training step is traced whole (forward, loss, backward, optimizer; two steps, so that the optimizer state
  is there) from builders the caller passes (the model, the optimizer, the criterion), for train.py's check before
  the model is placed on the device and for scripts/plan_memory.py. What no trace sees on CUDA (DDP's gradient
  buckets, NCCL's buffers, cuDNN workspaces, the CUDA context) is added as stated allowances (`train_overheads`).
- Budgets: CUDA's free memory counts what PyTorch's caching allocator holds unused (`device_free`); an evaluation's
  budget is measured once per model and device, the minimum over ranks, so that every rank and every batch of a
  shape uses one schedule (`eval_budget`).

What no count sees: kernel scratch space (cuDNN/oneDNN workspaces) and allocator rounding and fragmentation in an
evaluation; the CUDA context (~0.5 GB) in either. CPU autocast stands in for CUDA autocast in traces (CUDA also runs
softmax in fp32).
"""
from __future__ import annotations

import copy
import os
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from network.attnscale import ExplicitBase
from utils.config import parse_bytes
from utils.runtime.dist import all_reduce_min
from utils.runtime.precision import autocast

from .multiscale import (
    UNCONSTRAINED,
    Combo,
    Forward,
    Inference,
    MultiScalePass,
    ScheduledPass,
    Schedule,
    network_fn,
    unwrap,
)

_log = logging.getLogger(__name__)

def format_bytes(n: int | float) -> str:
    """1.5 GiB, 230.0 MiB, 12.0 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------- counting


class LiveTensorBytes(TorchDispatchMode):
    """Counts the storage of every tensor an op creates inside the context, until that storage is freed.

    Views share their base's storage and in-place ops create none, so each allocation is counted once; the weak
    reference callback fires when the storage itself (not one Python handle to it) is released. Inside
    `ignoring()` nothing is counted (the planner's stand-in for host memory).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._ignore = False

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

    def reach(self, extra: int) -> None:
        """Record that `extra` bytes more than are live now were held for a moment (a traced network pass)."""
        self.peak = max(self.peak, self.live + extra)

    @contextmanager
    def ignoring(self) -> Iterator[None]:
        self._ignore = True
        try:
            yield
        finally:
            self._ignore = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if not self._ignore:
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


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
    with _fake_mode():
        model = build()
        args = inputs()
        static = tensor_bytes(model) + sum(_nbytes(a) for a in args)
        with autocast(precision, torch.device("cpu")), LiveTensorBytes() as tracker:
            run(model, *args)
    return {"static": static, "peak": static + tracker.peak}


# ----------------------------------------------------------------------------------------------- network traces


@dataclass(frozen=True)
class ForwardTrace:
    """One network pass on fake tensors: the most bytes it held at once beyond its input (its outputs included),
    and its outputs (name, shape, dtype)."""

    peak: int
    outputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class _Pass(nn.Module):
    """The per-scale network pass as a module, so that `functional_call` can run it on fake weights."""

    def __init__(self, net: nn.Module, attention: bool) -> None:
        super().__init__()
        self.net = net
        self.attention = attention

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return network_fn(self.net)(x, self.attention)


_TRACES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, ForwardTrace]]" = weakref.WeakKeyDictionary()


def _fake_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Fake tensors with the shapes, strides and dtypes of the module's parameters and buffers (in a fake mode)."""
    return {prefix + name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
            for name, t in (*module.named_parameters(), *module.named_buffers())}


def trace_forward(model: nn.Module, shape: Sequence[int], precision: str = "fp32",
                  attention: bool = True) -> ForwardTrace:
    """The trace of one inference pass of `model` on an input of `shape` (cached; the weights are not read),
    without the attention head when `attention` is False (the top scale's pass)."""
    net = unwrap(model)
    cache = _TRACES.setdefault(net, {})
    key = (tuple(int(d) for d in shape), precision, net.training, attention)
    if key not in cache:
        with _disable_current_modes(), _fake_mode():  # also when called from inside a planner replay
            state = _fake_state(net, "net.")
            x = torch.empty(key[0])
            with torch.inference_mode(), autocast(precision, torch.device("cpu")), LiveTensorBytes() as tracker:
                out = torch.func.functional_call(_Pass(net, attention), state, (x,))
            cache[key] = ForwardTrace(tracker.peak, tuple((k, tuple(v.shape), v.dtype) for k, v in out.items()))
    return cache[key]


def _stand_in(model: nn.Module, tracker: LiveTensorBytes, precision: str) -> Forward:
    """A network pass that costs what the traced one costs: the traced peak, then outputs of the traced shapes."""
    def fn(x: torch.Tensor, attention: bool = True) -> dict[str, torch.Tensor]:
        trace = trace_forward(model, tuple(x.shape), precision, attention)
        tracker.reach(trace.peak)
        return {k: torch.empty(shape, dtype=dtype) for k, shape, dtype in trace.outputs}
    return fn


# ----------------------------------------------------------------------------------------------- evaluation plans


@dataclass(frozen=True)
class PlanRow:
    schedule: Schedule
    peak: int  # predicted bytes on the device: weights, the batch and its labels, and the peak of the call

    @property
    def exact(self) -> bool:
        return self.schedule.exact


def _consume(run: Any, combos: Sequence[Combo], keep: Sequence[float], target: torch.Tensor | None) -> None:
    """What `evaluate` does with a pass per batch: logits in fp32, argmax, loss, confusion counts, every sweep
    combination one at a time, the dumped maps."""
    logits = run.logits(combos[0]).float()
    pred = logits.max(1).indices
    if target is not None:
        loss = F.cross_entropy(logits, target, reduction="sum")
        del loss
        offsets = torch.empty(target.numel(), dtype=torch.long)
        idx = offsets + pred.view(-1).long()
        del idx
        for _, other in run.logits_many(combos[1:]):  # `other` lives on while the next is made (evaluate)
            idx = offsets + other.max(1).indices.view(-1).long()
            del idx
    maps = run.maps(keep) if keep else {}
    del logits, pred, maps


def predict_eval_peak(
    model: nn.Module,
    shape: Sequence[int],
    combos: Sequence[Combo],
    how: Inference,
    schedule: Schedule,
    keep: Sequence[float] = (),
    labelled: bool = True,
    device: torch.device | str = "cpu",
) -> int:
    """Predicted peak bytes on `device` of one evaluation call on a batch of `shape` under `schedule`: weights and
    buffers, the batch (and its labels when `labelled`) and the most the call holds at once."""
    device = torch.device(device)
    precision = schedule.precision or how.precision
    n, _, h, w = (int(d) for d in shape)
    static = tensor_bytes(unwrap(model)) + n * 3 * h * w * 4 + (n * h * w * 8 if labelled else 0)
    with _fake_mode(), torch.inference_mode():
        images = torch.empty(n, 3, h, w)
        target = torch.zeros(n, h, w, dtype=torch.long) if labelled else None
        with LiveTensorBytes() as tracker, autocast(how.precision, torch.device("cpu")):
            fn = _stand_in(model, tracker, precision)
            if schedule == UNCONSTRAINED:
                scales = {s for c in combos for s in c.scales} | set(keep)
                run: Any = MultiScalePass(fn, images, scales, any(c.flip for c in combos), how.window, how.overlap)
            else:
                store = load = None
                if schedule.host and device.type != "cpu":  # host memory is not the device's
                    def store(t: torch.Tensor) -> torch.Tensor:
                        with tracker.ignoring():
                            return torch.empty_like(t)

                    def load(t: torch.Tensor) -> torch.Tensor:
                        return torch.empty_like(t)
                run = ScheduledPass(fn, images, combos, schedule, keep, how.window, how.overlap, store, load)
            _consume(run, combos, keep, target)
            del run
    return static + tracker.peak


def lower_precision(precision: str, device: torch.device) -> str | None:
    """The half precision an approximate schedule may use, or None when already below fp32."""
    if precision != "fp32":
        return None
    return "fp16" if device.type == "cuda" else "bf16"


def schedule_ladder(
    batch: int, size: Sequence[int], combos: Sequence[Combo], fallback: str, precision: str, device: torch.device
) -> list[Schedule]:
    """Schedules in the order they are tried: unconstrained, then exact ones that hold less at once (one scale at a
    time, the flipped pass apart, the batch split, maps in host memory off a CPU), then approximate ones (sliding
    windows at the largest scales, lower precision) when `fallback` is 'any'."""
    flip = any(c.flip for c in combos)
    ladder = [UNCONSTRAINED, Schedule(stream=True)]
    if flip:
        ladder.append(replace(ladder[-1], flip_apart=True))
    chunk = batch // 2
    while chunk >= 1:
        ladder.append(replace(ladder[-1], chunk=chunk))
        chunk //= 2
    if device.type != "cpu":
        ladder.append(replace(ladder[-1], host=True))
    if fallback != "any":
        return ladder
    exact = ladder[-1]
    window = (int(size[0]), int(size[1]))  # windows of the 1.0 image's size at the larger scales
    above = sorted({s for c in combos for s in c.scales if s > 1.0}, reverse=True)
    for s in above:
        ladder.append(replace(exact, window=window, window_from=s))
    low = lower_precision(precision, device)
    if low is not None:
        ladder.append(replace(ladder[-1], precision=low))
    half = (max(16, window[0] // 2), max(16, window[1] // 2))
    ladder.append(replace(ladder[-1], window=half, window_from=1.0))
    return ladder


@dataclass
class EvalPlan:
    shape: tuple[int, ...]
    budget: int | None
    rows: list[PlanRow]
    chosen: PlanRow | None

    def table(self) -> str:
        lines = ["| schedule | exact | predicted peak | fits |", "|---|---|---|---|"]
        for r in self.rows:
            fits = "-" if self.budget is None else ("yes" if r.peak <= self.budget else "no")
            mark = " (chosen)" if r is self.chosen else ""
            lines.append(f"| {r.schedule.label}{mark} | {'yes' if r.exact else 'no'} | {format_bytes(r.peak)} "
                         f"| {fits} |")
        return "\n".join(lines)


def plan_eval(
    model: nn.Module,
    shape: Sequence[int],
    combos: Sequence[Combo],
    how: Inference,
    device: torch.device | str,
    keep: Sequence[float] = (),
    labelled: bool = True,
    budget: int | None = None,
    every: bool = False,
) -> EvalPlan:
    """The ladder's predicted peaks and the first row that fits `budget` (None: the unconstrained one). With
    `every` all rows are predicted (the plan table), else the ladder stops at the first that fits."""
    device = torch.device(device)
    ladder = schedule_ladder(int(shape[0]), shape[-2:], combos, how.memory_fallback, how.precision, device)
    rows, chosen = [], None
    for schedule in ladder:
        row = PlanRow(schedule, predict_eval_peak(model, shape, combos, how, schedule, keep, labelled, device))
        rows.append(row)
        if chosen is None and (budget is None or row.peak <= budget):
            chosen = row
            if not every:
                break
    return EvalPlan(tuple(int(d) for d in shape), budget, rows, chosen)


class MemoryPlanError(ValueError):
    """No schedule that may be used fits the memory budget."""


def device_free(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: the driver's free memory plus what PyTorch's caching
    allocator has reserved but not handed out (it serves new tensors from those blocks before asking the driver;
    `mem_get_info` counts them as taken, so after a training step or a first batch the free memory alone is short
    by about the previous peak)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def device_budget(device: torch.device, configured: int | None, resident: int = 0) -> int | None:
    """The bytes a plan may use: the configured budget, else on CUDA what this process may still allocate
    (`device_free`) plus `resident` (what the plan counts that is on the device already, such as the weights), else
    None (no limit). Measured on this rank only: see `eval_budget` for the one all ranks share."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        return device_free(device) + resident
    return None


_BUDGETS: "weakref.WeakKeyDictionary[nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def eval_budget(model: nn.Module, device: torch.device, how: Inference, batch_bytes: int = 0) -> int | None:
    """The budget of `model`'s evaluation plans on `device`: eval.memory_budget when set, else on CUDA the smallest
    over the ranks of `device_budget` with the weights and `batch_bytes` (the batch already on the device) as
    resident, measured at the first call for this model and device and kept from then on; else None.

    Kept, so that a batch shape gets one schedule for the whole run (it is not re-planned as free memory changes),
    and the minimum over ranks, so that ranks with batches of one shape choose the same schedule. The first call is
    a collective on CUDA without eval.memory_budget: every rank must make it at the same point, which evaluate's
    first batch is as long as every rank has one (the split has at least as many images as ranks); calling this
    before the batch loop makes it independent of the batch counts. Later calls, whatever the batch shape, are not
    collectives: a rank with one batch fewer or a last batch of another shape cannot stall the others.
    """
    if how.memory_budget is not None:
        return how.memory_budget
    if device.type != "cuda":
        return None
    net = unwrap(model)
    kept = _BUDGETS.setdefault(net, {})
    if str(device) not in kept:
        kept[str(device)] = all_reduce_min(device_budget(device, None, tensor_bytes(net) + batch_bytes))
    return kept[str(device)]


_CHOICES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Schedule]]" = weakref.WeakKeyDictionary()


def choose_schedule(
    model: nn.Module, images: torch.Tensor, combos: Sequence[Combo], keep: Iterable[float], how: Inference
) -> Schedule:
    """The first schedule of the ladder whose planned peak fits the budget (`eval_budget`; logged with the reason,
    once per batch shape and then reused); the unconstrained one without a budget. Raises MemoryPlanError before any
    network pass when none that eval.memory_fallback allows fits. A chosen approximate schedule is reported with its
    measured difference from the exact result on the first image (`measure_difference`: the model is not touched)."""
    device = images.device
    keep = tuple(keep)
    net = unwrap(model)
    budget = eval_budget(net, device, how, _nbytes(images))
    if budget is None:
        return UNCONSTRAINED
    key = (tuple(images.shape), tuple(combos), keep, budget, how.memory_fallback, how.precision, how.window,
           how.overlap, device.type)
    cache = _CHOICES.setdefault(net, {})
    if key in cache:
        return cache[key]
    plan = plan_eval(net, images.shape, combos, how, device, keep, labelled=True, budget=budget)
    shape = "x".join(str(d) for d in images.shape)
    source = "eval.memory_budget" if how.memory_budget is not None else f"free memory of {device}"
    if plan.chosen is None:
        cheapest = min(plan.rows, key=lambda r: r.peak)
        allowed = ("exact schedules only (eval.memory_fallback=exact; =any also allows sliding windows and lower "
                   "precision)" if how.memory_fallback == "exact" else "approximate schedules included")
        raise MemoryPlanError(
            f"evaluation of a {shape} batch needs {format_bytes(cheapest.peak)} even under the cheapest schedule "
            f"({cheapest.schedule.label}), {allowed}, but the budget ({source}) is {format_bytes(budget)}: raise "
            f"eval.memory_budget, lower data.val_batch_size or use fewer/smaller eval.scales")
    chosen = plan.chosen
    unconstrained = plan.rows[0]
    if chosen.schedule == UNCONSTRAINED:
        _log.info(f"memory plan: a {shape} batch needs {format_bytes(chosen.peak)} (unconstrained), within the "
                  f"budget of {format_bytes(budget)} ({source})")
    else:
        _log.info(f"memory plan: a {shape} batch needs {format_bytes(unconstrained.peak)} unconstrained, over the "
                  f"budget of {format_bytes(budget)} ({source}): schedule '{chosen.schedule.label}' "
                  f"({'exact' if chosen.exact else 'approximate'}), planned {format_bytes(chosen.peak)}")
    if not chosen.exact:
        exact = [r for r in plan.rows if r.exact][-1].schedule
        diff = measure_difference(model, images, combos[0], how, chosen.schedule, exact)
        _log.info(f"memory plan: the approximate schedule '{chosen.schedule.label}' on the first image: argmax "
                  f"agrees with the exact result on {100 * diff['agreement']:.2f}% of pixels, largest logit "
                  f"difference {diff['max_abs']:.4g} (exact reference run once on the host)")
    cache[key] = chosen.schedule
    return chosen.schedule


def host_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` in host memory that leaves `net` as it is. Each parameter and buffer is copied to the host
    on its own (through deepcopy's memo), so the device never holds a second model; outside inference mode, so the
    copy's parameters are normal tensors. Moving `net` itself instead (`net.cpu()`, then `net.to(device)`) replaces
    every parameter's data in place (`Module._apply` assigns `param.data`): inside inference mode the parameters
    become inference tensors (training's next backward fails), and each move drops the parameters' gradient
    accumulators, on which DDP hooked its gradient all-reduce."""
    with torch.inference_mode(False), torch.no_grad():
        memo: dict[int, Any] = {}
        for t in (*net.parameters(), *net.buffers()):
            host = t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(host, t.requires_grad) if isinstance(t, nn.Parameter) else host
        return copy.deepcopy(net, memo)


def measure_difference(
    model: nn.Module, images: torch.Tensor, combo: Combo, how: Inference, approx: Schedule, exact: Schedule
) -> dict[str, float]:
    """How much an approximate schedule changes the result on the first image of `images`: the share of pixels
    whose argmax agrees with the exact schedule's, and the largest absolute logit difference. The exact reference
    runs on the host, off the device the approximate schedule was chosen to fit: on a CPU with the model itself,
    else with a host copy of it (`host_copy`), so the model being evaluated (or trained) is never moved or changed."""
    net = unwrap(model)
    device = images.device
    first = images[:1]
    with torch.inference_mode(), autocast(how.precision, device):
        approximate = ScheduledPass(net, first, [combo], approx, (), how.window, how.overlap).logits(combo)
        approximate = approximate.float().cpu()
    host = net if device.type == "cpu" else host_copy(net)
    with torch.inference_mode(), autocast(how.precision, torch.device("cpu")):
        reference = ScheduledPass(host, first.cpu(), [combo], exact, (), how.window, how.overlap).logits(combo)
        reference = reference.float()
    agreement = (approximate.max(1).indices == reference.max(1).indices).double().mean().item()
    return {"agreement": agreement, "max_abs": (approximate - reference).abs().max().item()}


# ----------------------------------------------------------------------------------------------- training step


@dataclass(frozen=True)
class TrainStep:
    """What one training step is planned for."""

    batch: int
    crop: tuple[int, int]
    precision: str
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainStep":
        """The step of `cfg`: data.batch_size, data.augment.crop_size, run.precision, run.channels_last."""
        crop = tuple(int(c) for c in cfg.data.augment.crop_size)
        return cls(cfg.data.batch_size, (crop[0], crop[-1]), cfg.run.precision, cfg.run.channels_last)

    @property
    def label(self) -> str:
        return (f"data.batch_size={self.batch}, crop {self.crop[0]}x{self.crop[1]}, {self.precision}"
                + (", channels-last" if self.channels_last else ""))


# What a training step holds on CUDA that no trace sees, added to the traced peak as allowances. They are the
# libraries' defaults and commonly reported sizes, not measurements of this model on this GPU.
CUDNN_WORKSPACE_BYTES = 2**30
"""cuDNN convolution workspaces: train.py sets cudnn.benchmark, which may pick algorithms needing large workspaces
(allocated through PyTorch's caching allocator and kept reserved); PyTorch caps them only when CUDNN_CONV_WSCAP_DBG
(MiB) is set. 1 GiB is an allowance, not a bound."""
CUDA_CONTEXT_BYTES = 512 * 2**20
"""The CUDA context and the kernels and handles of cuDNN and cuBLAS, loaded at first use (CUDA's lazy module
loading): ~0.3-0.5 GB on current GPUs and drivers (the figure this module's notes always gave); cuBLAS workspaces of
2 x 4 MiB + 8 x 16 KiB per stream (CUBLAS_WORKSPACE_CONFIG's default) fit in it. Whatever part of it exists when the
check measures free memory is counted twice (the check errs on the safe side by up to that)."""
NCCL_BYTES = 512 * 2**20
"""NCCL's communicator buffers (world size > 1): NCCL_BUFFSIZE (4 MiB by default, the Simple protocol) plus the LL
and LL128 protocols' buffers, per channel and peer, for up to 32 channels of rings and trees; ~0.2-0.5 GB with
NCCL's defaults, the upper figure taken."""


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the gradients of `model` (its parameters that require one)."""
    return sum(_nbytes(p) for p in model.parameters() if p.requires_grad)


def train_overheads(grad_bytes: int, device: torch.device | str, world_size: int) -> dict[str, int]:
    """What a training step holds beyond its traced tensors, by source: with world_size > 1 DDP's gradient buckets
    (bucket_cap_mb 25 MiB, the first 1 MiB, together covering every gradient: with train.py's DDP, which does not
    set gradient_as_bucket_view, one more copy of the gradients, `grad_bytes`) on any device; on CUDA the cuDNN
    workspace, the CUDA context and, with world_size > 1, NCCL's buffers (the constants above)."""
    out = {}
    if world_size > 1:
        out["DDP gradient buckets"] = grad_bytes
    if torch.device(device).type == "cuda":
        out["cuDNN workspace"] = CUDNN_WORKSPACE_BYTES
        out["CUDA context"] = CUDA_CONTEXT_BYTES
        if world_size > 1:
            out["NCCL buffers"] = NCCL_BYTES
    return out


def trace_train_step(
    build_model: Callable[[], nn.Module],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    criterion: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]],
    step: TrainStep,
) -> tuple[int, int]:
    """(peak bytes of the step's tensors, gradient bytes), traced on fake tensors: weights, gradients, optimizer
    state, the batch and the most the step holds at once (two steps are traced, the second with the optimizer state
    of the first). `build_model()` and `build_optimizer(model)` run inside the fake mode (weights as shapes only);
    `criterion(outputs, target)` returns (total, terms). fp16 is traced as bf16 (same sizes; the loss scaler reads
    values)."""
    precision = "bf16" if step.precision == "fp16" else step.precision
    fmt = torch.channels_last if step.channels_last else torch.contiguous_format
    with _disable_current_modes(), _fake_mode():
        model = build_model().train()
        if step.channels_last:  # Module.to cannot swap fake tensors
            for p in model.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=fmt)
        optimizer = build_optimizer(model)
        images = torch.empty(step.batch, 3, *step.crop).contiguous(memory_format=fmt)
        target = torch.zeros(step.batch, *step.crop, dtype=torch.long)
        static = tensor_bytes(model) + _nbytes(images) + _nbytes(target)
        with LiveTensorBytes() as tracker:
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                with autocast(precision, torch.device("cpu")):
                    outputs = model(images)
                total, _terms = criterion(outputs, target)
                total.backward()
                optimizer.step()
                del outputs, total, _terms
    return static + tracker.peak, trainable_bytes(model)


def predict_train_peak(
    build_model: Callable[[], nn.Module],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    criterion: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]],
    step: TrainStep,
    device: torch.device | str = "cpu",
    world_size: int = 1,
) -> int:
    """Predicted peak bytes of one training step on `device` in a run of `world_size` processes: the traced step
    (`trace_train_step`) plus `train_overheads` (none in one process on a CPU)."""
    traced, grads = trace_train_step(build_model, build_optimizer, criterion, step)
    return traced + sum(train_overheads(grads, device, world_size).values())


def available_bytes(device: torch.device, configured: int | None = None) -> int | None:
    """What a training step may use on `device`: the configured budget, else on CUDA what this process may still
    allocate (`device_free`; the model not yet placed there), the least over ranks (so that all refuse together),
    else None (not checked)."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        return all_reduce_min(device_free(device))
    return None


def train_alternatives(
    build_model: Callable[[], nn.Module],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    criterion: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]],
    step: TrainStep,
    accum_steps: int,
    device: torch.device | str = "cpu",
    world_size: int = 1,
) -> list[tuple[str, int]]:
    """Settings that lower the step's peak, each with its predicted peak: half the batch with twice the
    accumulation (same global batch), a half precision, a smaller crop."""
    candidates = []
    batch = step.batch
    while batch > 1:
        batch //= 2
        candidates.append((f"data.batch_size={batch} train.accum_steps={accum_steps * (step.batch // batch)} (same "
                           "global batch)", replace(step, batch=batch)))
    if step.precision == "fp32":
        candidates.append(("run.precision=bf16 (or fp16)", replace(step, precision="bf16")))
    crop = (max(32, int(step.crop[0] * 0.75) // 32 * 32), max(32, int(step.crop[1] * 0.75) // 32 * 32))
    if crop != step.crop:
        candidates.append((f"data.augment.crop_size=[{crop[0]},{crop[1]}]", replace(step, crop=crop)))
    out = []
    for what, candidate in candidates:
        try:
            out.append((what, predict_train_peak(build_model, build_optimizer, criterion, candidate, device,
                                                 world_size)))
        except ValueError:  # a setting the model cannot train with (batch 1 through BatchNorm on a 1x1 map)
            continue
    return out


def check_train_memory(
    cfg: Any,
    device: torch.device,
    build_model: Callable[[], nn.Module],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    criterion: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]],
    world_size: int = 1,
) -> str | None:
    """Before the model is placed on `device` (and wrapped in DDP): the predicted peak of one step of `cfg`
    (`TrainStep.from_config`, with the allowances of `train_overheads` for `world_size` processes) against what the
    device has (eval.memory_budget when set, else what this process may allocate on CUDA, the least over ranks: a
    collective there, so every rank calls this at the same point; not checked on other devices without a budget).
    Run after placement, the check would count the model's own memory as taken. Returns a line to log, or raises
    MemoryPlanError naming the predicted and available bytes and settings that would fit."""
    budget = parse_bytes(cfg.eval.memory_budget)
    available = available_bytes(device, budget)
    if available is None:
        return None
    step = TrainStep.from_config(cfg)
    traced, grads = trace_train_step(build_model, build_optimizer, criterion, step)
    overheads = train_overheads(grads, device, world_size)
    peak = traced + sum(overheads.values())
    parts = ", ".join([f"tensors {format_bytes(traced)}"] + [f"{k} {format_bytes(v)}" for k, v in overheads.items()])
    where = f"{device}" + (" (eval.memory_budget)" if budget is not None else " free")
    if peak <= available:
        return (f"memory plan: a training step ({step.label}) needs {format_bytes(peak)} ({parts}) of "
                f"{format_bytes(available)} on {where}")
    fits = [f"{what} ({format_bytes(p)})" for what, p in train_alternatives(
        build_model, build_optimizer, criterion, step, cfg.train.accum_steps, device, world_size) if p <= available]
    advice = ("would fit: " + "; ".join(fits)) if fits else \
        "none of half the batch, a half precision or a 0.75x crop fits: use a smaller model or crop"
    raise MemoryPlanError(f"a training step ({step.label}) is planned at {format_bytes(peak)} ({peak} bytes: {parts}) "
                          f"but {where} has {format_bytes(available)} ({available} bytes): {advice}")


def planned_pass(
    how: Inference, model: nn.Module, images: torch.Tensor, combos: Sequence[Combo], keep: Iterable[float] = ()
) -> MultiScalePass | ScheduledPass:
    """The network over `images` for every combination of `combos` (and the per-scale maps of the scales `keep`,
    for dumps), under `how.schedule`, or under the cheapest schedule whose planned peak fits the memory budget
    (logged; a clear error when none may be used). Run it under the autocast of `how.precision`."""
    schedule = how.schedule
    if schedule is None:
        schedule = choose_schedule(model, images, combos, keep, how)
    if schedule == UNCONSTRAINED:
        scales = {s for c in combos for s in c.scales} | set(keep)
        return MultiScalePass(model, images, scales, any(c.flip for c in combos), how.window, how.overlap)
    return ScheduledPass(model, images, combos, schedule, keep, how.window, how.overlap)


# ----------------------------------------------------------------------------------------------- evaluation check


def host_available() -> int:
    """Bytes of RAM new allocations may still take: MemAvailable of /proc/meminfo, lowered to what the memory limit
    of this process's cgroup (v2: containers, SLURM jobs) still allows; the free pages where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/cgroup") as f:
            group = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
        folder = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as f, open(os.path.join(folder, "memory.current")) as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, StopIteration, ValueError):
        pass  # no cgroup v2 limit to read: the host's figure stands
    return available


def largest_input_size(paths: Iterable[str], data: Any) -> tuple[int, int]:
    """(height, width) of the largest network input among the images `paths` (their headers only; unreadable ones
    are left to the data loader to report) after the evaluation's resize of `data` (cfg.data): a long edge of
    data.eval_size (else data.augment.long_edge) when set, a square of that size with data.map_crop_val."""
    from PIL import Image

    largest = (0, 0)
    for path in paths:
        try:
            with Image.open(path) as image:
                w, h = image.size
        except OSError:
            continue
        if h * w > largest[0] * largest[1]:
            largest = (h, w)
    edge = data.eval_size or data.augment.long_edge
    h, w = largest
    if edge <= 0 or h == 0:
        return largest
    if data.map_crop_val:
        return edge, edge
    scale = edge / max(h, w)
    return max(int(h * scale), 1), max(int(w * scale), 1)


def _size_setting(n: int) -> str:
    """`n` bytes rounded down to a size eval.memory_budget reads: 12.3GiB, 800MiB."""
    return f"{n * 10 // 2**30 / 10:g}GiB" if n >= 2**30 else f"{n // 2**20}MiB"


def train_held_bytes(cfg: Any, net: nn.Module) -> int:
    """What training keeps beside the model while it validates: the gradients and the optimizer's state (SGD's
    momentum, Adam's two moments)."""
    states = 1 if cfg.train.optimizer == "sgd" else 2
    return (1 + states) * trainable_bytes(net)


def _planned_peak(net: nn.Module, shape: Sequence[int], how: Inference, device: torch.device, labelled: bool,
                  dumps: bool, budget: int | None) -> tuple[int, bool]:
    """(peak, True) of the schedule an evaluation of a `shape` batch under `how` would run with `budget` (None: the
    unconstrained one); (the cheapest schedule's peak, False) when none that how.memory_fallback allows fits."""
    setting = how.combo(net)
    combos = [setting] + [c for c in how.sweep(net) if c != setting]
    plan = plan_eval(net, shape, combos, how, device, setting.scales if dumps else (), labelled, budget)
    if plan.chosen is not None:
        return plan.chosen.peak, True
    return min(r.peak for r in plan.rows), False


def check_eval_memory(
    cfg: Any,
    device: torch.device,
    model: nn.Module,
    size: Sequence[int],
    labelled: bool = True,
    dumps: bool = True,
    training: bool = False,
) -> str:
    """Before the first image (in training: before the first step): whether evaluating `cfg`'s eval.* on images of
    `size` (height, width: the largest input, `largest_input_size`) in batches of data.val_batch_size fits `device`.

    The peak is that of the schedule the evaluation would run (`plan_eval` on fake tensors: no pass at full size):
    the unconstrained one on a CPU without eval.memory_budget, else the first that fits the budget (eval.memory_budget,
    else the CUDA device's free memory), plus, with `training`, the gradients and optimizer state training holds
    (`train_held_bytes`). It is held against what the device has: the host's available RAM (`host_available`) or the
    CUDA device's free memory (`device_free`), plus the model's own bytes when it is there already; the least over
    ranks (a collective: every rank calls this at the same point). Returns a line to log, or raises MemoryPlanError
    naming eval.scales, the estimate, the available memory and settings that would fit."""
    net = unwrap(model)
    if isinstance(net, ExplicitBase):  # one forward at its own fixed scale set, which its training step ran already
        return f"memory plan: {type(net).__name__} evaluates its own scale set in one forward; not planned"
    modes = {m: m.training for m in net.modules()}
    net.eval()  # traced as evaluate runs it; training's modes come back after
    try:
        return _check_eval_memory(cfg, device, net, size, labelled, dumps, training)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check_eval_memory(cfg: Any, device: torch.device, net: nn.Module, size: Sequence[int], labelled: bool,
                       dumps: bool, training: bool) -> str:
    how = Inference.from_config(cfg)
    h, w = (int(s) for s in size)
    if h * w == 0:  # no image whose header reads: the data loader reports them
        return "memory plan: no image size known, evaluation memory not checked"
    shape = (cfg.data.val_batch_size, 3, h, w)
    resident = tensor_bytes(net) if any(p.device.type == device.type for p in net.parameters()) else 0
    free = device_free(device) if device.type == "cuda" else host_available()
    room = all_reduce_min(free) + resident
    held = train_held_bytes(cfg, net) if training else 0

    def plan(candidate: Inference) -> tuple[int, bool]:
        """The evaluation's peak under `candidate` (training's state included) and whether it fits."""
        budget = candidate.memory_budget
        if budget is None and device.type == "cuda":
            budget = room - held  # what the evaluation's own budget will measure then (`eval_budget`)
        found, within = _planned_peak(net, shape, candidate, device, labelled, dumps, budget)
        return found + held, within and found + held <= room

    need, fits = plan(how)
    what = (f"eval.scales {list(cfg.eval.scales)}: evaluating {shape[0]} image(s) of {h}x{w} "
            f"(data.val_batch_size {shape[0]}{', with the training state' if held else ''})")
    if fits:
        return f"memory plan: {what} needs {format_bytes(need)} of {format_bytes(room)} available on {device}"
    over = f" (over eval.memory_budget, {format_bytes(how.memory_budget)})" if how.memory_budget is not None else ""
    # Tried: on a CPU without eval.memory_budget (where the planner chooses no schedule) what is left as the budget,
    # and the largest scale sets without the top scales. Not tried: sliding windows, whose plan replays every window
    # (at a scale like 40, minutes) and which bound a pass, not the full-size logits.
    candidates = []
    if how.memory_budget is None and device.type != "cuda" and room - held >= 2**20:
        setting = _size_setting(room - held)
        candidates.append((f"eval.memory_budget={setting} (one scale at a time)",
                           replace(how, memory_budget=parse_bytes(setting))))
    scales = sorted(how.scales)[:-1]
    while scales and scales[-1] >= 1.0:  # the largest scales dropped, one by one, while 1.0 stays
        candidates.append((f"eval.scales={[float(s) for s in scales]}", replace(how, scales=tuple(reversed(scales)))))
        scales = scales[:-1]
    found = []
    for label, candidate in candidates:
        peak, ok = plan(candidate)
        if ok:
            found.append(f"{label} ({format_bytes(peak)})")
            if label.startswith("eval.scales"):
                break  # the largest set that fits
    advice = ("would fit: " + "; ".join(found) + "; or " if found else "use smaller eval.scales, ") + \
        f"sliding windows (eval.window=[{h},{w}]) or a smaller data.eval_size"
    raise MemoryPlanError(f"{what} is estimated at {format_bytes(need)}{over}, but {device} has "
                          f"{format_bytes(room)} available: {advice}")
