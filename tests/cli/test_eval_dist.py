"""Exact metrics across ranks: two gloo processes give exactly the one-process confusion matrices (the evaluated
setting and every sweep combination), loss, image count and 'worst' image selection."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datasets import build_dataset, build_loader
from tests.fixtures import NUM_VAL, make_setup, tiny_model
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.engine import evaluate
from utils.inference import Inference

pytestmark = pytest.mark.dist

SETS = [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0]]


def run_eval(overrides, ckpt, out_dir, rank=0, world_size=1):
    cfg = load_config(None, overrides)
    ds = build_dataset(cfg.data, "val", train=False)
    loader = build_loader(ds, cfg.data, False, rank, world_size)
    model = tiny_model()
    load_checkpoint(model, ckpt)
    how = Inference.make([0.5, 1.0], sweep_sets=SETS, sweep_fusions=["attention", "average", "max"])
    result = evaluate(model, loader, ds.num_classes, ds.ignore_index, how, torch.device("cpu"),
                      dump_dir=out_dir, dump="worst", num_dump=2, palette=ds.palette)
    return {"hist": result.hist, "sweep": [(c.label, h) for c, h in result.sweep], "loss": result.loss,
            "seen": result.images_seen, "worst": [(e["name"], e["score"]) for e in result.images],
            "local": len(loader.sampler)}


def worker(rank, world_size, port, overrides, ckpt, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(run_eval(overrides, ckpt, out_dir, rank, world_size), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_one_process_confusion_matrix(tmp_path):
    overrides, ckpt = make_setup(str(tmp_path), fit=False)
    single = run_eval(overrides, ckpt, str(tmp_path / "one"))
    # fork: the children reuse the imported modules instead of importing torch again (seconds on a small CPU)
    args = (2, free_port(), overrides, ckpt, str(tmp_path / "two"), str(tmp_path))
    mp.start_processes(worker, args=args, nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    assert [r["local"] for r in ranks] == [NUM_VAL // 2, NUM_VAL - NUM_VAL // 2]  # uneven, nothing dropped
    for r in ranks:
        assert r["hist"].dtype == torch.int64
        assert torch.equal(r["hist"], single["hist"])
        assert [label for label, _ in r["sweep"]] == [label for label, _ in single["sweep"]]
        for (label, h2), (_, h1) in zip(r["sweep"], single["sweep"]):
            assert torch.equal(h2, h1), label
        assert abs(r["loss"] - single["loss"]) < 1e-9 * max(1.0, abs(single["loss"]))
        assert r["seen"] == single["seen"] == NUM_VAL
        assert r["worst"] == single["worst"] and len(single["worst"]) == 2
    assert single["hist"].sum() > 0
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    two = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert one == two and len(one) > 0  # the same images' pictures, written by whichever rank held them
