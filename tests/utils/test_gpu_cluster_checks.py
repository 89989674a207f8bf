"""GPU probes of three defects that show only on CUDA (scripts/gpu_check.sh runs the `gpu` cases), each with a CPU
case that drives the same code through the same mechanism, torch.cuda monkeypatched where it must look present:

(a) a validation whose memory plan chose an approximate schedule measures it against an exact reference on the
    host; that must leave the live model's parameters normal tensors (not inference tensors: evaluation runs under
    torch.inference_mode) so that training's next backward works;
(b) the evaluation budget (utils/inference/memory.py `device_budget`) counts memory that PyTorch's caching allocator
    has reserved but not handed out as available: allocating and freeing a large tensor leaves it unchanged;
(c) a checkpoint's CUDA random state (utils/checkpoint.py `rng_state` / `set_rng_state`) restores in a process
    that sees fewer GPUs than the one that saved it.
"""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.fixtures import tiny_model
from utils.checkpoint import rng_state, set_rng_state
from utils.inference import Inference
from utils.inference import memory
from utils.inference.memory import choose_schedule, device_budget

ROOT = Path(__file__).resolve().parents[2]
NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")]
SHAPE = (2, 3, 32, 64)
SCALES = (0.5, 1.0, 2.0)  # a scale above 1: the approximate rows window it
MIB = 2**20


# ----------------------------------------------------------------------------------------------- (a)


def approximate_inference(monkeypatch: pytest.MonkeyPatch) -> Inference:
    """eval.memory_fallback=any with the planner steered to an approximate schedule: every exact schedule is
    predicted at 2 bytes, every approximate one at 1, the budget is 1 byte. (The tiny model's real predictions put
    every approximate row above the cheapest exact one at test sizes, since windows hold the whole logits and add
    overlap, so no budget would choose one; what is under test is what happens once one is chosen.)"""
    monkeypatch.setattr(memory, "predict_eval_peak", lambda model, shape, combos, how, schedule, *a, **k:
                        2 if schedule.exact else 1)
    return Inference.make(SCALES, memory_fallback="any", memory_budget=1)


def assert_trains(model: nn.Module, device: torch.device) -> None:
    """No parameter is an inference tensor, and a training forward and backward give every parameter a gradient."""
    inference = [name for name, p in model.named_parameters() if p.is_inference()]
    assert not inference, f"inference-tensor parameters after validation: {inference[:3]} ..."
    model.train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    model(images)["pred"].float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class ReportsCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: the batch of a validation on a GPU, as the planner sees it. Results
    of operations on it are plain CPU tensors (no __torch_function__), so only `images.device` says CUDA."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


@pytest.mark.slow  # a few seconds of CPU: passes of the tiny model at three scales, twice
def test_approximate_schedule_on_a_gpu_batch_leaves_trainable_parameters_cpu(monkeypatch, caplog):
    """The CPU counterpart of (a): the batch reports CUDA, so the planner measures its approximate schedule against
    the host as it does on a GPU; a module move copies every tensor, as a move between devices does (on the CPU
    alone `.cpu()` and `.to('cpu')` copy nothing). A model moved to the host and back inside the evaluation's
    inference mode gets inference-tensor parameters (Module._apply assigns param.data); its backward then fails."""
    model = tiny_model()
    how = approximate_inference(monkeypatch)
    real_to = nn.Module.to

    def move(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        target = [a for a in (*args, *kwargs.values()) if isinstance(a, (str, torch.device))]
        if any(torch.device(t).type in ("cuda", "cpu") for t in target):
            return self._apply(lambda t: t.clone())  # a copy on "the other device"
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", move)
    monkeypatch.setattr(nn.Module, "cpu", lambda self: self._apply(lambda t: t.clone()))
    images = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).as_subclass(ReportsCuda)
    with caplog.at_level(logging.INFO, logger=memory.__name__), torch.inference_mode():
        schedule = choose_schedule(model, images, [how.combo(model)], (), how)  # as evaluate's planned_pass does
    assert not schedule.exact and "(approximate), planned" in caplog.text
    monkeypatch.undo()
    assert_trains(model, torch.device("cpu"))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_validation_under_an_approximate_schedule_leaves_trainable_parameters(device, caplog, monkeypatch):
    """(a) on CUDA: train.py's validation (utils.engine.evaluate) with an approximate schedule, then a backward."""
    from utils.engine import evaluate

    device = torch.device(device)
    model = tiny_model().to(device)
    how = approximate_inference(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(SHAPE, generator=generator),
             "mask": torch.randint(0, 19, (SHAPE[0], *SHAPE[2:]), generator=generator), "name": ["a", "b"]}
    with caplog.at_level(logging.INFO, logger=memory.__name__):
        result = evaluate(model, [batch], 19, 255, how, device)
    assert result.images_seen == SHAPE[0] and "(approximate), planned" in caplog.text
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert_trains(model, device)


# ----------------------------------------------------------------------------------------------- (b)


class FakeAllocator:
    """CUDA as the caching allocator presents it: freed blocks stay reserved by the process (the driver counts
    them as used) until empty_cache."""

    def __init__(self, total: int = 80 * 2**30, context: int = 500 * MIB) -> None:
        self.total, self.context = total, context
        self.allocated = self.reserved = 0

    def allocate(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n  # the block goes to the cache, not back to the driver

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.total - self.context - self.reserved, self.total

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        return {"reserved_bytes.all.current": self.reserved, "allocated_bytes.all.current": self.allocated,
                "active_bytes.all.current": self.allocated}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        monkeypatch.setattr(torch.cuda, "memory_stats", self.memory_stats)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)


def test_budget_counts_the_allocators_cached_blocks_cpu(monkeypatch):
    """(b) on a fake allocator: 4 GiB allocated and freed stay reserved; the budget must not drop by them."""
    fake = FakeAllocator()
    fake.install(monkeypatch)
    device = torch.device("cuda", 0)
    fake.allocate(300 * MIB)  # the weights, resident
    before = device_budget(device, None, resident=300 * MIB)
    fake.allocate(4 * 2**30)
    fake.free(4 * 2**30)
    after = device_budget(device, None, resident=300 * MIB)
    assert fake.reserved - fake.allocated == 4 * 2**30  # the mechanism: the cache holds them
    assert before == fake.total - fake.context  # all but the context: 300 MiB free + resident
    assert after == before, f"the budget fell by {(before - after) / MIB:.0f} MiB after a freed 4 GiB tensor"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_budget_counts_the_allocators_cached_blocks(device):
    """(b) on CUDA: a freed 2 GiB tensor stays in PyTorch's cache; the budget stays within a few MB of before."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.ones(1, device=device)  # the context exists before the first reading
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = device_budget(device, None, 0)
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    del x
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    after = device_budget(device, None, 0)
    torch.cuda.empty_cache()
    assert cached >= 2 * 2**30  # the mechanism: the allocator kept the freed block
    assert abs(after - before) <= 8 * MIB, f"budget {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after"


# ----------------------------------------------------------------------------------------------- (c)


class FakeGenerators:
    """torch.cuda's per-device random states for `count` visible GPUs: an index past them fails as torch's
    default_generators[index] does."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.states: dict[int, torch.Tensor] = {}

    def index(self, device: Any) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return 0 if device.index is None else device.index

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        index = self.index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")
        self.states[index] = state.clone()

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return self.states.get(self.index(device), torch.zeros(16, dtype=torch.uint8))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        # torch.cuda.set_rng_state_all and get_rng_state_all stay torch's own: they call these per device
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)


def saved_states(cuda: Any) -> dict[str, Any]:
    """A checkpoint's random streams with `cuda` as its CUDA entry (a list: every GPU of the saving process)."""
    return {"torch": torch.Generator().manual_seed(5).get_state(), "numpy": np.random.RandomState(5).get_state(),
            "python": random.Random(5).getstate(), "cuda": cuda}


def test_cuda_rng_state_of_two_gpus_restores_where_one_is_visible_cpu(monkeypatch):
    """(c) with fake per-device generators: the list of two GPUs' states restores where one GPU is visible (its
    state, the first, on device 0); a restore where none is visible leaves CUDA alone."""
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    before = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        set_rng_state(saved_states(states))  # this CPU-only process: no GPU visible
        assert torch.equal(torch.get_rng_state(), saved_states(None)["torch"])
        fake = FakeGenerators(1)
        fake.install(monkeypatch)
        set_rng_state(saved_states(states))
        assert set(fake.states) == {0} and torch.equal(fake.states[0], states[0])
        set_rng_state(saved_states(states[1]))  # one GPU's state (not a list)
        assert torch.equal(fake.states[0], states[1])
        assert torch.equal(rng_state()["torch"], saved_states(None)["torch"])
    finally:  # the global streams as they were, for the tests after this one
        torch.set_rng_state(before[0])
        np.random.set_state(before[1])
        random.setstate(before[2])


RESTORE = """
import sys, torch
from utils.checkpoint import set_rng_state
set_rng_state(torch.load(sys.argv[1], weights_only=False))  # before CUDA is initialised: torch queues CUDA's part
print(torch.cuda.device_count(), torch.rand(4, device="cuda").tolist())
"""


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_cuda_rng_state_restores_on_a_process_that_sees_fewer_gpus(device, tmp_path):
    """(c) on CUDA: a checkpoint as a process with two GPUs wrote it (a list of two states), restored by a process
    restricted to one GPU (CUDA_VISIBLE_DEVICES) continues device 0's stream."""
    torch.cuda.manual_seed(11)
    first = torch.cuda.get_rng_state()
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed(12)
    state = rng_state()
    state["cuda"] = [first, torch.cuda.get_rng_state()]
    torch.save(state, tmp_path / "rng.pth")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path / "rng.pth")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"1 {expected}"
