"""Defects of the cluster path that only a GPU cluster shows, reproduced on the CPU: the CUDA random stream of
each rank's own device (resume on another GPU binding), more local ranks than GPUs and two ranks on one GPU,
the optimizer kernel after a resume, cuDNN autotuning during evaluation, logged scalars reduced over the ranks,
and the global batch of a resume on another world size. `torch.cuda` is monkeypatched where a GPU would answer.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import train as train_script
from utils import checkpoint
from utils.checkpoint import BatchLayout, layout_refusal, rng_state, saved_layout, set_rng_state
from utils.engine import reduce_scalars
from utils.runtime import dist as udist
from utils.runtime.dist import DistConfigError, cuda_index, exchange, shared_devices


class FakeCuda:
    """The RNG side of torch.cuda in a process that sees `count` GPUs with `current` as its device: the state of
    device i is the tensor [i, generation]; setting a device index that is not visible fails as CUDA does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, current: int) -> None:
        self.count, self.current = count, current
        self.restored: list[tuple[int, list[int]]] = []
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "get_rng_state", self.get, raising=False)
            monkeypatch.setattr(module, "set_rng_state", self.set, raising=False)
            monkeypatch.setattr(module, "device_count", lambda: self.count, raising=False)
            monkeypatch.setattr(module, "current_device", lambda: self.current, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def _index(self, device: object) -> int:
        if isinstance(device, int):
            return device
        index = torch.device(device).index
        return self.current if index is None else index

    def get(self, device: object = "cuda") -> torch.Tensor:
        i = self._index(device)
        if i >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return torch.tensor([i, 7], dtype=torch.uint8)

    def set(self, state: torch.Tensor, device: object = "cuda") -> None:
        i = self._index(device)
        if i >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.restored.append((i, state.tolist()))


def test_a_rank_saves_and_restores_only_its_own_gpu_stream(monkeypatch):
    """Saved by local rank 3 seeing all 8 GPUs of its node, restored where srun binds each task to its GPU (it sees
    one, as device 0): the stream of GPU 3 goes to this task's device. Saving all 8 made the restore fail."""
    saver = FakeCuda(monkeypatch, count=8, current=3)
    state = rng_state()
    assert state["cuda"].tolist() == [3, 7]
    restorer = FakeCuda(monkeypatch, count=1, current=0)
    set_rng_state(state)
    assert restorer.restored == [(0, [3, 7])] and saver.restored == []


def test_an_older_checkpoint_with_every_gpu_stream_restores_the_current_device_only(monkeypatch):
    old = {**rng_state(), "cuda": [torch.tensor([i, 7], dtype=torch.uint8) for i in range(8)]}
    fake = FakeCuda(monkeypatch, count=2, current=1)
    set_rng_state(old)
    assert fake.restored == [(1, [1, 7])]
    fake = FakeCuda(monkeypatch, count=4, current=3)
    set_rng_state({**old, "cuda": old["cuda"][:2]})  # saved where fewer GPUs were visible: nothing to restore
    assert fake.restored == []


def test_more_local_ranks_than_gpus_is_a_launch_error_naming_the_counts(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [cuda_index(r, 2) for r in range(2)] == [0, 1]
    assert cuda_index(5, 1) == 0  # srun --gpus-per-task: each task sees its own GPU as device 0
    with pytest.raises(DistConfigError, match=r"local rank 2 but this process sees 2 GPU\(s\) "
                                              r"\(CUDA_VISIBLE_DEVICES=0,1\): start at most 2 process\(es\) per node"):
        cuda_index(2, 2)


def test_two_ranks_on_one_gpu_are_named_before_nccl_starts():
    """The ranks compare host and GPU UUID over the rendezvous store (a real TCPStore here, two ranks as
    threads): rank 1 and 2 landed on one GPU."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    keys = ["node1 GPU a", "node1 GPU b", "node1 GPU b"]
    seen: dict[int, list[str]] = {}

    def rank(r: int) -> None:
        client = torch.distributed.TCPStore("127.0.0.1", store.port, 3, is_master=False)
        seen[r] = exchange(client, r, 3, keys[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {r: keys for r in range(3)}
    message = shared_devices(seen[0])
    assert message is not None and message.startswith("ranks 1, 2 share one GPU (node1 GPU b): give each process")
    assert shared_devices(["n1 GPU a", "n2 GPU a", "n1 GPU b"]) is None  # the same UUID text on two hosts


def test_nccl_gets_the_device_id_and_the_gpu_check_runs_before_it(monkeypatch):
    """init_distributed on "CUDA": the rendezvous store is made first, the GPUs compared over it, then the
    process group starts bound to this rank's device (device_id)."""
    calls: list[tuple] = []

    class Store:
        def set_timeout(self, delta):
            calls.append(("timeout", delta.total_seconds()))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(udist.dist, "rendezvous", lambda url, rank, world, timeout: iter([(Store(), rank, world)]))
    monkeypatch.setattr(udist, "exchange", lambda store, rank, world, key: calls.append(("exchange", key)) or
                        ["h GPU x", "h GPU y"])
    monkeypatch.setattr(udist, "device_key", lambda d: f"h GPU {d}")
    monkeypatch.setattr(udist.dist, "init_process_group", lambda backend, **kw: calls.append(
        ("init", backend, str(kw["device_id"]), kw["rank"])))
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    info = udist.init_distributed(device="cuda", timeout=9, environ=env)
    assert str(info.device) == "cuda:1"
    assert calls == [("set_device", "cuda:1"), ("timeout", 9.0), ("exchange", "h GPU cuda:1"),
                     ("init", "nccl", "cuda:1", 1)]
    monkeypatch.setattr(udist, "exchange", lambda *a: ["h GPU x", "h GPU x"])
    with pytest.raises(DistConfigError, match="ranks 0, 1 share one GPU"):
        udist.init_distributed(device="cuda", timeout=9, environ=env)
    calls.clear()  # gloo on GPUs (the GPU check's 2 ranks on one device): no device comparison, no device_id
    udist.init_distributed(device="cuda", timeout=9, environ={**env, "HMSA_DIST_BACKEND": "gloo"})
    assert calls[-1] == ("init", "gloo", "None", 1) and ("exchange", "h GPU cuda:1") not in calls
    with pytest.raises(DistConfigError, match="HMSA_DIST_BACKEND='mpi': use gloo, or nccl on CUDA devices"):
        udist.init_distributed(device="cuda", timeout=9, environ={**env, "HMSA_DIST_BACKEND": "mpi"})


def test_a_resumed_optimizer_keeps_the_kernel_chosen_for_this_device():
    """torch's load_state_dict brings back the saved groups' options, `fused` among them: a checkpoint of a CPU run
    made a CUDA run use the slower kernel."""
    params = [nn.Parameter(torch.ones(3))]
    saved = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=False).state_dict()
    plain = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["fused"] is False  # the mechanism
    kept = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    train_script.load_optimizer_state(kept, saved)
    assert kept.param_groups[0]["fused"] is True and kept.param_groups[0]["lr"] == 0.1


def test_evaluation_runs_without_cudnn_autotuning(monkeypatch):
    from tests.fixtures import tiny_model
    from utils.engine import evaluate
    from utils.inference import Inference

    seen = []
    model = tiny_model()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    batch = {"image": torch.randn(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.long), "name": ["a"]}
    evaluate(model, [batch], 19, 255, Inference(scales=(1.0,)), torch.device("cpu"))
    assert seen and not any(seen)
    assert torch.backends.cudnn.benchmark is True  # training's setting comes back


def test_reduced_scalars_in_one_process_count_the_non_finite():
    values, bad = reduce_scalars({"loss": torch.tensor(2.5), "lr": torch.tensor(0.01)}, 1)
    assert values == pytest.approx({"loss": 2.5, "lr": 0.01}) and bad == 0
    values, bad = reduce_scalars({"loss": torch.tensor(float("inf")), "lr": torch.tensor(0.01)}, 1)
    assert values["loss"] == float("inf") and bad == 1


def test_a_resume_on_another_world_size_keeps_or_names_the_global_batch():
    ckpt = {"config": {"data": {"batch_size": 2}, "train": {"accum_steps": 1}}, "state": {"world_size": 2}}
    assert saved_layout(ckpt) == BatchLayout(2, 1, 2)
    older = {"config": {"data": {"batch_size": 4}}, "state": {}, "rng": [{}, {}, {}]}  # before world_size was saved
    assert saved_layout(older) == BatchLayout(4, 1, 3)
    assert layout_refusal("ck.pth", BatchLayout(2, 1, 2), BatchLayout(2, 2, 1)) is None
    assert layout_refusal("ck.pth", BatchLayout(2, 1, 2), BatchLayout(1, 1, 4)) is None
    message = layout_refusal("ck.pth", BatchLayout(2, 1, 2), BatchLayout(2, 1, 1))
    assert message == (
        "refusing to resume ck.pth: it was trained with a global batch of 4 (data.batch_size 2 x train.accum_steps 1 "
        "x 2 process(es)), this run has 2 (data.batch_size 2 x train.accum_steps 1 x 1 process(es)); keep the global "
        "batch (e.g. train.accum_steps=2) to continue the same samples in the same order, or use --force-resume to "
        "continue anyway")
    assert "keep the global batch (data.batch_size x" in layout_refusal("c", BatchLayout(3, 1, 1), BatchLayout(2, 1, 1))
    assert checkpoint.LAYOUT_KEYS == ("data.batch_size:", "train.accum_steps:")
