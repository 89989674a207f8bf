"""The memory planner's CUDA paths on a CPU (utils/inference/memory.py): torch.cuda's memory counters monkeypatched,
and batches that say they live on cuda:0 (`OnCuda`) while their data stays in host memory.

- an approximate schedule's measured difference never moves or changes the model (it is trained on afterwards);
- the budget counts what PyTorch's caching allocator holds unused, is kept once measured and is the least over
  the ranks (two gloo processes);
- the training check adds allowances for what no trace sees and takes its model, optimizer and criterion from the
  caller.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import network
from utils.config import load_config
from utils.inference import Inference
from utils.inference.memory import (
    CUDA_CONTEXT_BYTES,
    CUDNN_WORKSPACE_BYTES,
    NCCL_BYTES,
    MemoryPlanError,
    TrainStep,
    available_bytes,
    check_train_memory,
    choose_schedule,
    device_budget,
    measure_difference,
    plan_eval,
    predict_train_peak,
    tensor_bytes,
)
from utils.inference.multiscale import UNCONSTRAINED, Schedule, ScheduledPass

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda", 0)
GiB = 2**30
K = 5


class OnCuda(torch.Tensor):
    """A host tensor that says it lives on cuda:0, and so does every tensor computed from it: the planner's device
    path on a machine without a GPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    def to(self, *args, **kwargs):  # type: ignore[override]
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self  # already "there"
        return super().to(*args, **kwargs)


def fake_cuda(monkeypatch, free: int, reserved: int = 0, allocated: int = 0) -> None:
    """torch.cuda's memory counters as a GPU would give them: `free` from the driver, `reserved` bytes held by the
    caching allocator of which `allocated` are in tensors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def simulate_moves(monkeypatch) -> list[str]:
    """Module.cpu() and Module.to() copy every tensor (what a transfer between devices makes) and record the module's
    class: the device round trip of a model on a machine with one memory."""
    moved: list[str] = []

    def move(self, *args, **kwargs):
        moved.append(type(self).__name__)
        return self._apply(torch.clone)

    monkeypatch.setattr(nn.Module, "cpu", move)
    monkeypatch.setattr(nn.Module, "to", move)
    return moved


@pytest.fixture
def demo():
    torch.manual_seed(0)
    cfg = load_config(None)
    return network.build_model(cfg.model.name, K, **cfg.model.options).eval()


def images(n=1, h=64, w=96, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def all_combos(how, model):
    setting = how.combo(model)
    return [setting] + [c for c in how.sweep(model) if c != setting]


# ----------------------------------------------------------------------------------------------- defect 2


def test_a_dtype_round_trip_in_inference_mode_is_the_mechanism():
    """Module._apply (torch/nn/modules/module.py) keeps each Parameter object and assigns `param.data` (neither
    torch.__future__ flag is set): inside inference mode the parameters become inference tensors, and a change of
    dtype or device drops their gradient accumulators (the nodes DDP's reducer hooks)."""
    assert not torch.__future__.get_overwrite_module_params_on_conversion()
    assert not torch.__future__.get_swap_module_params_on_conversion()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight = net[0].weight
    accumulator = weight.view_as(weight).grad_fn.next_functions[0][0]
    fired = []
    accumulator.register_hook(lambda *_: fired.append(1))
    with torch.inference_mode():
        net.double()
        net.float()
    assert net[0].weight is weight and weight.is_inference() and weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        net(torch.randn(2, 3, 8, 8)).sum().backward()

    net = nn.Conv2d(3, 4, 3)
    weight = net.weight
    accumulator = weight.view_as(weight).grad_fn.next_functions[0][0]
    accumulator.register_hook(lambda *_: fired.append(1))
    net.double()
    net.float()  # outside inference mode: a normal tensor again, but another accumulator
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert weight.grad is not None and fired == []
    assert weight.view_as(weight).grad_fn.next_functions[0][0] is not accumulator


@pytest.mark.slow
def test_an_approximate_schedule_on_cuda_leaves_the_model_trainable(demo, monkeypatch):
    """The difference measured inside evaluate's inference mode (`simulate_moves`); then a training step."""
    moved = simulate_moves(monkeypatch)
    how = Inference.make([0.5, 1.0, 2.0], memory_fallback="any")
    combo = how.combo(demo)
    approx = Schedule(stream=True, window=(32, 48), window_from=2.0)
    params = dict(demo.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    x = images(h=32, w=48)
    with torch.inference_mode():
        diff = measure_difference(demo, x.as_subclass(OnCuda), combo, how, approx, Schedule(stream=True))
        want_approx = ScheduledPass(demo, x, [combo], approx).logits(combo)
        want_exact = ScheduledPass(demo, x, [combo], Schedule(stream=True)).logits(combo)
    assert moved == []
    after = dict(demo.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is p for k, p in params.items())
    assert not any(p.is_inference() for p in after.values())
    assert all(p.device.type == "cpu" and torch.equal(p, before[k]) for k, p in after.items())
    agreement = (want_approx.max(1).indices == want_exact.max(1).indices).double().mean().item()
    assert diff == {"agreement": agreement, "max_abs": (want_approx - want_exact).abs().max().item()}
    assert diff["max_abs"] > 0  # the windows do change the result: the comparison is not of a pass with itself

    demo.train()
    optimizer = torch.optim.SGD(demo.parameters(), lr=0.1)
    out = demo(images(n=2, h=32, w=32))
    F.cross_entropy(out["pred"], torch.zeros(2, 32, 32, dtype=torch.long)).backward()
    optimizer.step()
    assert all(p.grad is not None for p in demo.parameters() if p.requires_grad)
    assert any(not torch.equal(p, before[k]) for k, p in demo.named_parameters())


@pytest.mark.slow
def test_validation_choosing_an_approximate_schedule_leaves_the_model_trainable(demo, monkeypatch, caplog):
    """choose_schedule as evaluate calls it during training's validation: on cuda, free memory between an
    approximate schedule's plan and the cheapest exact one's, eval.memory_fallback=any; then a training step."""
    moved = simulate_moves(monkeypatch)
    how = Inference.make([0.5, 1.0, 2.0], memory_fallback="any")
    combos = all_combos(how, demo)
    x = images(h=32, w=48).as_subclass(OnCuda)
    plan = plan_eval(demo, x.shape, combos, how, CUDA, every=True)
    exact_min = min(r.peak for r in plan.rows if r.exact)
    approx = [r for r in plan.rows if not r.exact and r.peak < exact_min]
    assert approx, plan.table()
    fake_cuda(monkeypatch, free=(approx[0].peak + exact_min) // 2 - tensor_bytes(demo) - x.numel() * 4)
    params = list(demo.parameters())
    with caplog.at_level(logging.INFO, logger="utils.inference.memory"), torch.inference_mode():
        chosen = choose_schedule(demo, x, combos, (), how)
    assert chosen == approx[0].schedule and "agrees with the exact result on" in caplog.text
    after = list(demo.parameters())
    assert moved == [] and len(after) == len(params) and all(a is b for a, b in zip(after, params))
    assert not any(p.is_inference() for p in params)
    demo.train()
    out = demo(images(n=2, h=32, w=32))
    F.cross_entropy(out["pred"], torch.zeros(2, 32, 32, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in params if p.requires_grad)


# ----------------------------------------------------------------------------------------------- defect 3


def test_the_budget_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    # 1 GiB free for the driver; the allocator holds 3 GiB of which 1 GiB in tensors: 2 GiB more to allocate.
    fake_cuda(monkeypatch, free=1 * GiB, reserved=3 * GiB, allocated=1 * GiB)
    assert device_budget(CUDA, None, resident=1000) == 3 * GiB + 1000
    assert device_budget(CUDA, 123, resident=1000) == 123
    assert available_bytes(CUDA) == 3 * GiB
    assert available_bytes(CUDA, 5 * GiB) == 5 * GiB
    assert device_budget(torch.device("cpu"), None) is None and available_bytes(torch.device("cpu")) is None


@pytest.mark.slow
def test_a_batch_shape_keeps_its_schedule_when_free_memory_shrinks(demo, monkeypatch):
    how = Inference.make([0.5, 1.0, 2.0], flip=True)
    combos = all_combos(how, demo)
    x = images().as_subclass(OnCuda)
    plan = plan_eval(demo, x.shape, combos, how, CUDA, every=True)
    unconstrained, cheapest = plan.rows[0].peak, min(r.peak for r in plan.rows if r.exact)
    resident = tensor_bytes(demo) + x.numel() * 4
    fake_cuda(monkeypatch, free=(unconstrained + cheapest) // 2 - resident)
    first = choose_schedule(demo, x, combos, (), how)
    assert first != UNCONSTRAINED and first.exact
    fake_cuda(monkeypatch, free=cheapest // 2 - resident)  # a new plan would find that nothing fits
    with torch.inference_mode():
        assert choose_schedule(demo, x, combos, (), how) == first


RANK_SCRIPT = """
import json, sys, torch
from tests.utils.test_memory_cuda import CUDA, OnCuda, all_combos, images, K
import network
from utils.config import load_config
from utils.inference import Inference
from utils.inference.memory import choose_schedule, plan_eval, tensor_bytes
from utils.runtime.dist import all_reduce_sum, init_distributed

info = init_distributed(device="cpu", timeout=60)
cfg = load_config(None)
torch.manual_seed(0)
model = network.build_model(cfg.model.name, K, **cfg.model.options).eval()
how = Inference.make([0.5, 1.0, 2.0], flip=True)
combos = all_combos(how, model)
x = images(h=32, w=48).as_subclass(OnCuda)
plan = plan_eval(model, x.shape, combos, how, CUDA, every=True)
unconstrained, cheapest = plan.rows[0].peak, min(r.peak for r in plan.rows if r.exact)
# rank 0 has room for the unconstrained schedule, rank 1 only for a cheaper one
budget = 2 * unconstrained if info.rank == 0 else (unconstrained + cheapest) // 2
free = budget - tensor_bytes(model) - x.numel() * 4
torch.cuda.mem_get_info = lambda device=None: (free, 80 * 2**30)
torch.cuda.memory_reserved = lambda device=None: 0
torch.cuda.memory_allocated = lambda device=None: 0
with torch.inference_mode():
    chosen = choose_schedule(model, x, combos, (), how)
    if info.rank == 0:  # a last batch of another shape that rank 1 does not have: no collective may follow from it
        choose_schedule(model, images(h=16, w=32).as_subclass(OnCuda), combos, (), how)
total = all_reduce_sum(torch.ones(1))
alone = plan_eval(model, x.shape, combos, how, CUDA, budget=budget).chosen.schedule
with open(sys.argv[1] + f"/rank{info.rank}.json", "w") as f:
    json.dump({"chosen": chosen.label, "alone": alone.label, "total": total.item()}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.dist
def test_ranks_with_different_free_memory_choose_one_schedule(tmp_path):
    port = str(free_port())
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    procs = [subprocess.Popen(
        [sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
             "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["alone"] == UNCONSTRAINED.label and r1["alone"] != UNCONSTRAINED.label  # alone they would differ
    assert r0["chosen"] == r1["chosen"] == r1["alone"]  # the least budget's schedule on both
    assert r0["total"] == r1["total"] == 2.0  # collectives still paired after rank 0's extra shape


# ----------------------------------------------------------------------------------------------- defect 9


class Toy(nn.Module):
    """5 classes from one 3x3 convolution: 5 * 3 * 3 * 3 weights + 5 biases = 140 float32 = 560 gradient bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def toy_criterion(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return F.cross_entropy(out, target), {}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


STEP = TrainStep(2, (16, 16), "fp32")


def test_the_training_prediction_adds_the_stated_allowances():
    base = predict_train_peak(Toy, sgd, toy_criterion, STEP)
    assert base > 0
    assert predict_train_peak(Toy, sgd, toy_criterion, STEP, "cpu", 2) == base + 560  # DDP buckets on gloo too
    assert predict_train_peak(Toy, sgd, toy_criterion, STEP, CUDA) == \
        base + CUDNN_WORKSPACE_BYTES + CUDA_CONTEXT_BYTES
    assert predict_train_peak(Toy, sgd, toy_criterion, STEP, CUDA, 4) == \
        base + 560 + NCCL_BYTES + CUDNN_WORKSPACE_BYTES + CUDA_CONTEXT_BYTES
    assert (CUDNN_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, NCCL_BYTES) == (2**30, 2**29, 2**29)


@pytest.mark.slow
def test_the_training_check_takes_builders_and_runs_before_placement(monkeypatch):
    seen = []

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        seen.append(all(isinstance(p, FakeTensor) for p in model.parameters()))
        return sgd(model)

    cfg = load_config(None, ["data.batch_size=2", "data.augment.crop_size=[16,16]", "run.precision=fp32",
                             "run.channels_last=false"])
    assert TrainStep.from_config(cfg) == STEP
    one = predict_train_peak(Toy, sgd, toy_criterion, STEP, CUDA, 1)
    assert seen == []
    # Nothing of the model on the device yet; the allocator holds 1 GiB unused: one process fits, two do not.
    fake_cuda(monkeypatch, free=one - GiB + 300, reserved=GiB, allocated=0)
    line = check_train_memory(cfg, CUDA, Toy, build_optimizer, toy_criterion, world_size=1)
    assert seen == [True] and "cuDNN workspace 1.00 GiB" in line and "CUDA context 512.00 MiB" in line
    with pytest.raises(MemoryPlanError) as err:
        check_train_memory(cfg, CUDA, Toy, build_optimizer, toy_criterion, world_size=2)
    message = str(err.value)
    two = one + 560 + NCCL_BYTES
    assert f"({two} bytes: tensors " in message and f"({one + 300} bytes)" in message
    assert "DDP gradient buckets 560 B" in message and "NCCL buffers 512.00 MiB" in message
    assert "none of half the batch" in message  # 512 MiB of NCCL buffers: no smaller step makes up for them
