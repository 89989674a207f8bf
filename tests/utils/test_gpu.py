"""What only a CUDA device can check: an NCCL process group, SyncBN conversion, fp16/bf16 steps against fp32, the
fused SGD kernel. Run by scripts/gpu_check.sh; each test is skipped, with the reason, on a machine without CUDA."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import network
from loss import build_criterion
from network.layers import sync_batchnorm
from utils.config import LossConfig
from utils.engine import train_step
from utils.runtime.precision import grad_scaler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]
TINY = {"trunk": "hrnet_w18_small", "mid_ch": 16, "key_ch": 8, "attn_ch": 16}
NAME = "hmsa_ocrnet_hrnet_w48"
CLASSES = 5
# Unit roundoffs: a step in fp16/bf16 autocast must stay within a small multiple of its precision's rounding of
# the fp32 step (a tiny model amplifies rounding little).
UNIT = {"fp16": 2.0**-11, "bf16": 2.0**-8}
WITHIN = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return network.build_model(NAME, CLASSES, **TINY).cuda()


def batch(n: int = 2, size: tuple[int, int] = (64, 64)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, *size, generator=gen).cuda(),
            "mask": torch.randint(0, CLASSES, (n, *size), generator=gen).cuda()}


def rel(ref: torch.Tensor, value: torch.Tensor) -> float:
    ref, value = ref.double(), value.double()
    return ((value - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def test_nccl_process_group_of_one_rank(nccl_group):
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    t = torch.arange(4, dtype=torch.float32, device="cuda")
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_syncbn_conversion_matches_batchnorm_on_cuda(nccl_group):
    plain = tiny_model().train()
    synced = sync_batchnorm(tiny_model().train(), torch.device("cuda"))
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert all(p.is_cuda for p in synced.parameters())
    x = batch()["image"]
    a, b = plain(x)["pred"], synced(x)["pred"]
    assert rel(a, b) < 1e-5  # one rank: the same statistics, reduced in another order
    b.sum().backward()
    assert all(p.grad is not None for p in synced.parameters() if p.requires_grad)


def _step(precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.amp.GradScaler]:
    """(fused prediction, parameter update) of one training step of the tiny model in `precision`."""
    model = tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = build_criterion(LossConfig(main="rmi", aux="bce", scale="bce", aux_weight=0.4, scale_weight=0.05),
                                CLASSES, 255)
    seen = []

    def crit(outputs, target):
        seen.append(outputs["pred"].detach().float())
        return criterion(outputs, target)

    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    scaler = grad_scaler(precision, torch.device("cuda"))
    torch.manual_seed(3)
    train_step(model, [batch()], crit, opt, scaler, precision=precision, device=torch.device("cuda"))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return seen[0], after - before, scaler


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_step_agrees_with_fp32(precision):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        ref_pred, ref_update, _ = _step("fp32")
    finally:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
    pred, update, scaler = _step(precision)
    assert torch.isfinite(update).all()
    bound = WITHIN * UNIT[precision]
    assert rel(ref_pred, pred) < bound, (precision, rel(ref_pred, pred), bound)
    assert rel(ref_update, update) < 8 * bound, (precision, rel(ref_update, update))
    if precision == "fp16":
        assert scaler.is_enabled() and scaler.get_scale() == 65536.0  # no inf/NaN found: the step was taken
    else:
        assert not scaler.is_enabled()


def test_fused_sgd_equals_foreach():
    torch.manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (19, 64, 1, 1), (7,)]
    start = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(3)]
    results = {}
    for kind in ("fused", "foreach"):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **{kind: True})
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results[kind] = [p.detach() for p in params]
    for a, b in zip(results["fused"], results["foreach"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
