"""The device checks of scripts/gpu_check.sh besides the precision steps (tests/utils/test_precision_steps.py): an
NCCL process group, SyncBN conversion, the fused SGD kernel.

The `gpu`-marked cases need CUDA and are skipped, with the reason, without it. Where a check has a CPU counterpart
(a gloo group and CpuSyncBatchNorm; the CPU's fused SGD) it runs here too, so that the check itself is exercised on
every machine, not first on a lent GPU's few minutes."""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import network
from network.layers import CpuSyncBatchNorm, sync_batchnorm

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")]
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
TINY = {"trunk": "hrnet_w18_small", "mid_ch": 16, "key_ch": 8, "attn_ch": 16}
NAME = "hmsa_ocrnet_hrnet_w48"
CLASSES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group(backend: str) -> Iterator[None]:
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def group(device: str) -> Iterator[None]:
    """A process group of one rank for the test's device: NCCL on CUDA, gloo on the CPU."""
    with one_rank_group("nccl" if device == "cuda" else "gloo"):
        yield


def tiny_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return network.build_model(NAME, CLASSES, **TINY).to(device)


def rel(ref: torch.Tensor, value: torch.Tensor) -> float:
    ref, value = ref.double(), value.double()
    return ((value - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_nccl_process_group_of_one_rank(device, group):
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    t = torch.arange(4, dtype=torch.float32, device="cuda")
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
def test_syncbn_conversion_matches_batchnorm(device, group):
    plain = tiny_model(device).train()
    device = torch.device(device)
    synced = sync_batchnorm(tiny_model(device.type).train(), device)
    kinds = {type(m) for m in synced.modules()}
    want = nn.SyncBatchNorm if device.type == "cuda" else CpuSyncBatchNorm
    assert want in kinds and nn.BatchNorm2d not in kinds
    assert all(p.device.type == device.type for p in synced.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    outputs = []
    for model in (plain, synced):
        torch.manual_seed(3)  # the OCR head's dropout: both models draw the same masks
        outputs.append(model(x)["pred"])
    assert rel(*outputs) < 1e-5  # one rank: the statistics of the same batch
    outputs[1].sum().backward()
    assert all(p.grad is not None for p in synced.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sgd_equals_foreach(device):
    torch.manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (19, 64, 1, 1), (7,)]
    start = [torch.randn(s, device=device) for s in shapes]
    grads = [[torch.randn(s, device=device) for s in shapes] for _ in range(3)]
    results = {}
    for kind in ("fused", "foreach"):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **{kind: True})
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results[kind] = [p.detach() for p in params]
    for a, b, s in zip(results["fused"], results["foreach"], start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
