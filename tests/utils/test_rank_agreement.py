"""Decisions every rank makes together, with 2 gloo processes running train.py: the logged loss is the mean over
the ranks, a non-finite loss on one rank stops both (fp32) or neither (fp16: the scaler skipped the step on both),
and a run resumes on another number of processes that keeps the global batch, with the same samples in the same
order and the weights of the uninterrupted run.

Run as a script (with torchrun's variables set), this file is the worker of those tests:
    python -m tests.utils.test_rank_agreement [poison=ITERATION:RANK] [stop=ITERATION:RANK] -- [train.py arguments]
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from tests.utils.test_dist import clean_env, launch_ranks, overrides
from utils.checkpoint import read_checkpoint
from utils.cli import run_cli
from utils.runtime.preempt import EXIT_PREEMPTED

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-m", "tests.utils.test_rank_agreement"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("agree")
    generate_synthetic_cityscapes(str(root / "data"), 8, 2, 64, 128, 0)
    return root


def ranks(*args: str, world: int = 2, timeout: float = 240) -> list[tuple[int, str]]:
    """(exit code, output) of each rank of the worker (torchrun's variables set by hand, gloo)."""
    procs = launch_ranks([*WORKER, *args], world)
    out = []
    for p in procs:
        try:
            out.append(p.communicate(timeout=timeout)[0])
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [(p.returncode, o) for p, o in zip(procs, out)]


def one_process(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*WORKER, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]


def local_losses(run: Path, rank: int) -> dict[int, float]:
    return {int(it): float(v) for it, v in (line.split() for line in open(run / f"loss_rank{rank}.txt"))}


def test_fp16_overflow_on_one_rank_is_skipped_on_both_and_the_logged_loss_is_the_mean(data_root):
    run = data_root / "runs" / "fp16"
    args = overrides(data_root, "fp16", 4, "run.precision=fp16", "data.batch_size=2", "train.ckpt_interval=100")
    done = ranks("poison=2:1", "--", *args)
    assert [rc for rc, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    log = (run / "train.log").read_text()
    assert "non-finite loss at iteration 2 on 1 of 2 process(es): the fp16 loss scaler skipped the step" in log
    rows = train_rows(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2  # halved once, on both ranks alike
    mine = [local_losses(run, r) for r in range(2)]
    for row in rows:
        it = row["iteration"]
        if it != 2:
            assert mine[0][it] != mine[1][it]
            assert row["loss"] == pytest.approx((mine[0][it] + mine[1][it]) / 2, rel=1e-6)
    weights = read_checkpoint(str(run / "ckpt_00000004.pth"))["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_non_finite_fp32_loss_on_one_rank_stops_both_with_one_line(data_root):
    args = overrides(data_root, "fp32", 4, "data.batch_size=2", "train.ckpt_interval=100")
    done = ranks("poison=2:1", "--", *args)
    assert [rc for rc, _ in done] == [2, 2], done[0][1][-3000:] + done[1][1][-3000:]
    for _, out in done:
        assert "error: non-finite loss at iteration 2 on 1 of 2 process(es)" in out, out[-3000:]
        assert "Traceback" not in out and "collective operation failed" not in out


def test_a_run_moves_between_two_processes_and_one_keeping_the_global_batch(data_root):
    """2 processes x 2 images, stopped at iteration 2; resumed on 1 process x 2 images x 2 accumulated batches,
    stopped at 4; resumed on 2 processes again to 6. The samples follow the uninterrupted 2-process run's, and so
    do the weights, to float32 rounding (the same batches, summed in another order)."""
    common = ("data.batch_size=2", "train.ckpt_interval=100", "train.log_interval=1")
    straight = ranks("--", *overrides(data_root, "straight", 6, *common))
    assert [rc for rc, _ in straight] == [0, 0], straight[0][1][-3000:]

    moved = overrides(data_root, "moved", 6, *common)
    first = ranks("stop=2:1", "--", *moved)
    assert [rc for rc, _ in first] == [EXIT_PREEMPTED] * 2, first[0][1][-3000:]
    run = data_root / "runs" / "moved"
    before = {p.name: p.read_bytes() for p in run.glob("*.pth")}
    refused = one_process("--", *moved)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: refusing to resume {run}/ckpt_00000002.pth: it was trained with a global batch of 4 (data.batch_size "
        "2 x train.accum_steps 1 x 2 process(es)), this run has 2 (data.batch_size 2 x train.accum_steps 1 x 1 "
        "process(es)); keep the global batch (e.g. train.accum_steps=2) to continue the same samples in the same "
        "order, or use --force-resume to continue anyway"), refused.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run.glob("*.pth")} == before

    second = one_process("stop=2:0", "--", *moved, "train.accum_steps=2")
    assert second.returncode == EXIT_PREEMPTED, second.stdout[-3000:] + second.stderr[-3000:]
    third = ranks("--", *moved)
    assert [rc for rc, _ in third] == [0, 0], third[0][1][-3000:]

    log = (run / "train.log").read_text()
    assert "resumed on 1 process(es) from a checkpoint of 2" in log
    assert "resumed on 2 process(es) from a checkpoint of 1" in log
    assert [r["iteration"] for r in train_rows(run)] == [1, 2, 3, 4, 5, 6]
    a = read_checkpoint(str(data_root / "runs" / "straight" / "ckpt_00000006.pth"))
    b = read_checkpoint(str(run / "ckpt_00000006.pth"))
    assert (a["state"]["epoch"], a["state"]["epoch_samples"]) == (b["state"]["epoch"], b["state"]["epoch_samples"])
    # BN running statistics are not: under DDP they follow rank 0's batches (broadcast at each forward), in one
    # process every batch's; they do not enter a training step.
    weights = [k for k in a["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 50
    for key in weights:
        assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6), key
    losses = [[r["loss"] for r in train_rows(p)] for p in (data_root / "runs" / "straight", run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# ----------------------------------------------------------------------------------------------- worker


def _poisoned(build, iteration: int, rank: int):
    """build_criterion whose loss becomes infinite on `rank` at this process's `iteration`-th call."""
    def make(*args, **kwargs):
        criterion = build(*args, **kwargs)
        calls = [0]

        def poisoned(outputs, target):
            total, terms = criterion(outputs, target)
            calls[0] += 1
            if calls[0] == iteration and int(os.environ.get("RANK", "0")) == rank:
                total = total * float("inf")
            return total, terms

        return poisoned

    return make


def _recorded(step, iteration: int | None, rank: int | None):
    """train_step that writes this rank's own loss per iteration, and sends itself SIGUSR1 after its `iteration`-th
    step on `rank` (a preemption at that step)."""
    done = [0]
    me = int(os.environ.get("RANK", "0"))

    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        done[0] += 1
        run_dir = None
        for a in sys.argv:
            if a.startswith("run.output_dir="):
                run_dir = a.split("=", 1)[1]
            if a.startswith("run.name="):
                run_dir = os.path.join(run_dir, a.split("=", 1)[1])
        with open(os.path.join(run_dir, f"loss_rank{me}.txt"), "a") as f:
            f.write(f"{done[0]} {float(out['loss'])}\n")
        if done[0] == iteration and me == rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    return wrapped


def _worker(argv: list[str]) -> None:
    events = {}
    while argv[0] != "--":
        key, value = argv.pop(0).split("=")
        events[key] = tuple(int(v) for v in value.split(":"))
    if "poison" in events:
        train_script.build_criterion = _poisoned(train_script.build_criterion, *events["poison"])
    train_script.train_step = _recorded(train_script.train_step, *events.get("stop", (None, None)))
    run_cli(train_script.main, argv[1:])


if __name__ == "__main__":
    _worker(sys.argv[1:])
