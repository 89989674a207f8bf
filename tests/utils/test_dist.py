"""Distributed training on the CPU with the real launchers: torchrun (2 processes, and 2 "nodes" on localhost),
gloo, SyncBN, preemption signals, a dead or hung rank, launcher environments and checkpoint faults.

Run as a script (by torchrun or with RANK/WORLD_SIZE/... set, from the repository root), this file is the worker
of those tests:
    python -m tests.utils.test_dist syncbn --out DIR
    python -m tests.utils.test_dist train [at=KIND:RANK:ITERATION] -- [train.py arguments]
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import train as train_script
from network.layers import CpuSyncBatchNorm, sync_batchnorm
from tests.fixtures import TINY_MODEL, tiny_run
from utils.checkpoint import checkpoint_paths, read_checkpoint
from utils.cli import run_cli
from utils.runtime import dist as udist
from utils.runtime.preempt import EXIT_PREEMPTED, Preemption

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]

SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def overrides(root: Path, run: str, max_iter: int, *extra: str) -> list[str]:
    """The tiny run at the defaults' batch size and checkpoint interval, without dumps."""
    changes = {"data.batch_size": None, "data.val_batch_size": 1, "train.ckpt_interval": None, "eval.num_dump": 0}
    return tiny_run(changes, root=root, run=run, max_iter=max_iter) + list(extra)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Generated once per module so that concurrent ranks never generate it themselves."""
    from datasets.synthetic import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("dist")
    generate_synthetic_cityscapes(str(root / "data"), 8, 2, 64, 128, 0)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher variables (the test may itself run under torchrun or SLURM)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    return {**env, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT), **extra}


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def worker_cmd(*args: str) -> list[str]:
    return [str(Path(__file__).resolve()), *args]


# ----------------------------------------------------------------------------------------------- environment


def test_single_process_without_launcher():
    env = udist.read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"})  # batch step, no srun
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none")
    assert udist.read_env({}).world_size == 1


def test_torchrun_environment():
    env = udist.read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                          "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "n1", 29500)
    # torch.distributed.launch passes --local-rank instead of LOCAL_RANK
    env = udist.read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}, local_rank=1)
    assert env.local_rank == 1
    assert train_script.parse_args(["--local-rank", "3"]).local_rank == 3
    assert train_script.parse_args(["--local_rank=2"]).local_rank == 2


@pytest.mark.parametrize("env, missing", [
    ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "n1"}, "MASTER_PORT"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7"},
     "SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST"),
])
def test_partial_environment_names_the_missing_variables(env, missing):
    with pytest.raises(udist.DistConfigError, match="missing") as e:
        udist.read_env(env)
    assert missing in str(e.value)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 is outside"),
])
def test_bad_values_are_named(env, message):
    with pytest.raises(udist.DistConfigError, match=message):
        udist.read_env(env)


def test_train_refuses_a_partial_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit, match="distributed set-up failed: incomplete torchrun environment"):
        train_script.main(overrides(tmp_path, "r", 1))


def test_slurm_environment():
    base = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_STEP_NODELIST": "gpu[08,10]",
            "SLURM_JOB_ID": "123456"}
    env = udist.read_env(base)
    # the step's task count and node list win over the job's (a step may use part of the allocation)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert (env.master_addr, env.master_port) == ("gpu08", 23456)
    env = udist.read_env({**base, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("head", 31000)
    # torchrun inside a SLURM allocation: torchrun's variables win
    env = udist.read_env({**base, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                          "MASTER_PORT": "1"})
    assert (env.launcher, env.world_size) == ("torchrun", 2)


def test_master_port_depends_on_the_job():
    ports = {udist.master_port_for_job(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 30000 for p in ports)
    assert udist.master_port_for_job("4242_7") == udist.master_port_for_job(42427)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("n[8-10],login", ["n8", "n9", "n10", "login"]),
    ("r[1-2]-g[09-10]", ["r1-g09", "r1-g10", "r2-g09", "r2-g10"]),
    ("a[1,3],b[2-3]", ["a1", "a3", "b2", "b3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert udist.expand_nodelist(nodelist) == hosts


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v scontrol"], capture_output=True).returncode != 0,
                    reason="scontrol (slurm-client) is not installed")
def test_expand_nodelist_agrees_with_scontrol(tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")  # scontrol needs one
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")}
    for nodelist in ("node[01-03,07]", "n[8-10],login", "r[1-2]-g[09-10]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            pytest.skip(f"scontrol show hostnames failed here: {out.stderr.strip()}")
        assert udist.expand_nodelist(nodelist) == out.stdout.split()


@pytest.mark.parametrize("bad", ["node[01-", "node]1", "node[3-1]", "node[a-b]", "a,,b"])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(udist.DistConfigError, match="node list"):
        udist.expand_nodelist(bad)


def test_unreachable_master_is_a_clear_error():
    port = free_port()  # nobody listens there
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.time()
    with pytest.raises(udist.DistributedError, match=f"rank 1/2: could not join the process group at "
                                                     f"127.0.0.1:{port} within 2 s"):
        udist.init_distributed(device="cpu", timeout=2, environ=env)
    assert time.time() - start < 30
    env["MASTER_ADDR"] = "no-such-host.invalid"
    with pytest.raises(udist.DistributedError, match="cannot resolve the master address 'no-such-host.invalid'"):
        udist.init_distributed(device="cpu", timeout=2, environ=env)
    assert not udist.is_initialized()


def test_sync_batchnorm_conversion_keeps_state_and_refuses_subclasses():
    class BNAct(nn.BatchNorm2d):
        pass

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(0.5)
    converted = sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(converted[1], CpuSyncBatchNorm)
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    assert list(converted.state_dict()) == list(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict())
    with pytest.raises(ValueError, match="BNAct"):
        sync_batchnorm(nn.Sequential(BNAct(4)), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- torchrun


def test_syncbn_ddp_matches_one_process_on_the_global_batch(tmp_path):
    proc = torchrun("--standalone", "--nproc_per_node", "2", *worker_cmd("syncbn", "--out", str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["converted"] == 29 and r0["ddp_world"] == 2
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    # statistics of the global batch of 4 on both ranks (measured: <= 1e-7, float32 casts inside the model)
    for name, ref in r0["ref_buffers"].items():
        assert rel(r0["buffers"][name], ref) < 1e-5 and rel(r1["buffers"][name], ref) < 1e-5, name
    # without synchronisation a rank's statistics would be those of its half (measured: >= 1e-2 apart)
    assert min(rel(r0["local_buffers"][k], v) for k, v in r0["ref_buffers"].items() if "mean" in k) > 1e-3
    # DDP's averaged gradient = the one-process gradient (measured: <= 2e-7), identical on both ranks
    for name, ref in r0["ref_grads"].items():
        assert rel(r0["grads"][name], ref) < 1e-5, name
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name


def two_nodes(*args: str) -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" of one process each, meeting at a c10d rendezvous on localhost."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "hmsa-two-nodes", *args]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [n.communicate(timeout=180) for n in nodes]
    return [subprocess.CompletedProcess(cmd, n.returncode, o, e) for n, (o, e) in zip(nodes, outs)]


@pytest.fixture(scope="module")
def ddp_runs(data_root):
    """Runs of 2 processes, 6 iterations, SyncBN and gradient accumulation (1 image x 2 batches per step, 2 steps
    per epoch): one straight on two torchrun nodes; one on one node (--nproc_per_node 2) stopped by SIGUSR1 on
    rank 1 at iteration 3, then run again."""
    common = ("model.norm=syncbn", "data.batch_size=1", "train.accum_steps=2", "train.ckpt_interval=2")
    straight = two_nodes(*worker_cmd("train", "--", *overrides(data_root, "straight", 6, *common)))

    def run(*event: str) -> subprocess.CompletedProcess:
        return torchrun("--standalone", "--nproc_per_node", "2",
                        *worker_cmd("train", *event, "--", *overrides(data_root, "preempted", 6, *common)))

    stopped = run("at=signal:1:3")
    resumed = run()
    return data_root / "runs", straight, stopped, resumed


def test_two_torchrun_nodes_train_together_log_once_and_write_each_checkpoint_once(ddp_runs):
    runs, nodes, _, _ = ddp_runs
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(n.stdout[-2000:] + n.stderr[-2000:] for n in nodes)
    straight = next(n for n in nodes if "this is rank 0" in n.stdout)  # the node that got rank 0 prints
    assert all("] 1/6 " not in n.stdout for n in nodes if n is not straight)
    run = runs / "straight"
    assert "2 process(es) on cpu (launcher: torchrun)" in (run / "train.log").read_text()
    assert (run / "saves_rank0.txt").read_text().split() == ["2", "4", "6"]
    assert not (run / "saves_rank1.txt").exists()  # rank 1 never writes a checkpoint
    assert [os.path.basename(p) for p in checkpoint_paths(str(run))] == ["ckpt_00000006.pth", "ckpt_00000004.pth"]
    ckpt = read_checkpoint(str(run / "ckpt_00000006.pth"))
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert ckpt["state"]["epoch"] == 3 and len(ckpt["rng"]) == 2
    # one progress stream: each iteration once on stdout and in train.log; each rank has its own log file
    for text in (straight.stdout, (run / "train.log").read_text()):
        assert [sum(f"] {i}/6 " in line for line in text.splitlines()) for i in range(1, 7)] == [1] * 6
    assert "this is rank 1" in (run / "logs" / "rank1.log").read_text()
    assert "this is rank 1" not in (run / "train.log").read_text()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_ddp_preemption_checkpoints_and_resumes_bit_identically(ddp_runs):
    runs, straight, stopped, resumed = ddp_runs
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in out, out[-3000:]
    assert "[rank 1] received SIGUSR1" in out
    run = runs / "preempted"
    log = (run / "train.log").read_text()
    # rank 1 got the signal, rank 0 (which writes checkpoints) stopped at the same step
    assert "stopped by a preemption signal at iteration 3/6" in log
    assert (run / "saves_rank0.txt").read_text().split() == ["2", "3", "4", "6"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in log and "ckpt_00000003.pth at iteration 3" in (run / "train.log").read_text()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    a = read_checkpoint(str(runs / "straight" / "ckpt_00000006.pth"))
    b = read_checkpoint(str(run / "ckpt_00000006.pth"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])


# ----------------------------------------------------------------------------------------------- faults


def launch_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`world` processes with torchrun's variables set by hand (no torchrun: it would kill the others itself)."""
    port = free_port()
    return [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=clean_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float) -> tuple[str, float]:
    """Rank 0's output and how long it took to exit; the other ranks are killed (SIGKILL: they trap SIGTERM)."""
    start = time.time()
    try:
        out = procs[0].communicate(timeout=timeout)[0]
        return out, time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


DEAD_RANK = """
import os, torch
from utils.runtime.dist import all_reduce_sum, collective_errors, init_distributed
info = init_distributed(device="cpu", timeout=30)
with collective_errors(info):
    all_reduce_sum(torch.ones(1))
    if info.rank == 1:
        os._exit(3)
    all_reduce_sum(torch.ones(1))
"""


def test_a_dead_rank_stops_the_others_at_once_with_a_clear_message():
    procs = launch_ranks([sys.executable, "-c", DEAD_RANK])
    out, waited = finish(procs, timeout=60)
    assert procs[1].returncode == 3 and procs[0].returncode == 1, out
    assert "DistributedError: rank 0/2: a collective operation failed" in out
    assert "Another process has probably died or hangs" in out and waited < 25  # well before the 30 s limit


def test_a_hung_rank_stops_the_others_after_train_dist_timeout(data_root):
    args = overrides(data_root, "fault_hang", 6, "model.norm=syncbn", "data.batch_size=2", "run.dist_timeout=5",
                     "train.ckpt_interval=100")
    procs = launch_ranks([sys.executable, *worker_cmd("train", "at=hang:1:2", "--", *args)])
    out, _ = finish(procs, timeout=120)
    assert procs[0].returncode == 2, out[-3000:]
    # rank 1 sleeps after step 2; rank 0 waits in the next collective (the all-reduce of step 2's logged values)
    # for 5 s, then stops
    assert "error: rank 0/2: a collective operation failed" in out and "Timed out waiting 5000ms" in out, out[-3000:]
    assert "run.dist_timeout = 5 s" in out and "Traceback" not in out.split("error: rank 0/2")[-1]
    assert "] 1/6 " in out and "] 2/6 " not in out


def test_a_checkpoint_killed_mid_write_is_skipped(tmp_path):
    """A kill during torch.save leaves the previous checkpoint; a corrupt newest file falls back to the previous."""
    run = tmp_path / "runs" / "r"
    train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=4", "train.ckpt_interval=1"))
    assert [os.path.basename(p) for p in checkpoint_paths(str(run))] == ["ckpt_00000002.pth", "ckpt_00000001.pth"]
    good = (run / "ckpt_00000002.pth").read_bytes()
    # 1. killed (SIGKILL) while writing ckpt_3: only a temporary file is left, ckpt_2 stays the newest
    code = ("import sys, torch; from utils import checkpoint as c\n"
            "def stop(obj, f, *a, **k): f.write(b'PK partial'); f.flush(); import os, signal; "
            "os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = stop; c.save_run_checkpoint(sys.argv[1], 3, {'x': 1})")
    killed = subprocess.run([sys.executable, "-c", code, str(run)], env=clean_env())
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp_") for p in run.iterdir())
    assert os.path.basename(checkpoint_paths(str(run))[0]) == "ckpt_00000002.pth"
    # 2. a newest file cut short some other way (copied partially, disk full): the previous one is used
    (run / "ckpt_00000003.pth").write_bytes(good[: len(good) // 2])
    train_script.main(overrides(tmp_path, "r", 4, "data.batch_size=4", "train.ckpt_interval=1") + ["--force-resume"])
    log = (run / "train.log").read_text()
    assert "ckpt_00000002.pth at iteration 2" in log
    assert read_checkpoint(str(run / "ckpt_00000004.pth"))["state"]["iteration"] == 4


def test_resume_into_a_different_config_is_refused_unless_forced(tmp_path):
    train_script.main(overrides(tmp_path, "r", 1, "data.batch_size=4"))
    with pytest.raises(SystemExit, match=r"train.lr: 0.01 -> 0.5"):
        train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=4", "train.lr=0.5"))
    metrics = train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=4", "train.lr=0.5") + ["--force-resume"])
    assert 0.0 <= metrics["miou"] <= 1.0


def test_preemption_in_one_process_with_accumulation_resumes_bit_identically(data_root, monkeypatch):
    """SIGUSR1 at iteration 3 (mid-epoch: 2 steps of 2 batches of 2 per epoch): checkpoint, exit 75, resume."""
    args = ("data.batch_size=2", "train.accum_steps=2", "train.ckpt_interval=100")
    before = signal.getsignal(signal.SIGUSR1)
    torch.use_deterministic_algorithms(True)
    try:
        train_script.main(overrides(data_root, "acc_straight", 5, *args))
        with monkeypatch.context() as m:
            m.setattr(train_script, "train_step", with_event(train_script.train_step, "signal", 0, 3))
            with pytest.raises(SystemExit) as e:
                train_script.main(overrides(data_root, "acc_preempted", 5, *args))
        assert e.value.code == EXIT_PREEMPTED
        assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored
        train_script.main(overrides(data_root, "acc_preempted", 5, *args))
    finally:
        torch.use_deterministic_algorithms(False)
    runs = data_root / "runs"
    stopped = read_checkpoint(str(runs / "acc_preempted" / "ckpt_00000003.pth"))["state"]
    assert (stopped["iteration"], stopped["epoch"], stopped["epoch_samples"]) == (3, 1, 4)
    a = read_checkpoint(str(runs / "acc_straight" / "ckpt_00000005.pth"))["model"]
    b = read_checkpoint(str(runs / "acc_preempted" / "ckpt_00000005.pth"))["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_preemption_flag_and_batch_check_in_one_process():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        check = p.batch_check(3)
        assert not p.requested() and not check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested() and p.agreed() and p.signum == signal.SIGTERM
        assert check() and check() and not check()  # 3 batches: no question after the last one
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_the_final_evaluation_checkpoints_and_the_rerun_evaluates(tmp_path, monkeypatch):
    real = train_script.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_script, "evaluate", signalled)
        with pytest.raises(SystemExit) as e:
            train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=4"))
    assert e.value.code == EXIT_PREEMPTED
    run = tmp_path / "runs" / "r"
    assert "validation at iteration 2 interrupted by a preemption signal" in (run / "train.log").read_text()
    assert not (run / "eval" / "results.json").exists()
    assert read_checkpoint(str(run / "ckpt_00000002.pth"))["state"]["iteration"] == 2
    metrics = train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=4"))
    assert json.loads((run / "eval" / "results.json").read_text())["miou"] == metrics["miou"]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [(r["split"], r["iteration"]) for r in rows] == [("train", 1), ("train", 2), ("val", 2)]


def test_channels_last_bf16_accumulation_and_compile_are_applied(tmp_path, monkeypatch):
    compiled, seen = [], {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    real = train_script.train_step

    def spy(*args, **kwargs):
        conv = next(m for m in args[0].modules() if isinstance(m, nn.Conv2d))
        seen.update(kwargs, channels_last_weights=conv.weight.is_contiguous(memory_format=torch.channels_last),
                    accum_steps=len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_script, "train_step", spy)
    train_script.main(overrides(tmp_path, "r", 2, "data.batch_size=2", "train.accum_steps=2", "train.compile=true",
                                "run.channels_last=true", "run.precision=bf16"))
    assert len(compiled) == 1
    assert seen["channels_last"] and seen["channels_last_weights"] and seen["accum_steps"] == 2
    state = read_checkpoint(str(tmp_path / "runs" / "r" / "ckpt_00000002.pth"))["state"]
    # 8 images, 2 per batch, 2 batches per step: one epoch is 2 steps, 8 samples
    assert (state["iteration"], state["epoch"], state["epoch_samples"]) == (2, 1, 0)


# ----------------------------------------------------------------------------------------------- worker


def with_event(train_step, kind: str, rank: int, iteration: int):
    """Wrap train.train_step so that rank `rank` meets `kind` just after step `iteration` of this process (before
    that step is logged or checkpointed): a SIGUSR1 to itself (preemption), death (os._exit) or a hang."""
    done = [0]

    def wrapped(*args, **kwargs):
        out = train_step(*args, **kwargs)
        done[0] += 1
        if done[0] == iteration and int(os.environ.get("RANK", "0")) == rank:
            if kind == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            elif kind == "die":
                os._exit(3)
            elif kind == "hang":
                time.sleep(600)
        return out

    return wrapped


def _record_saves(save):
    def wrapped(run_dir, iteration, state, *a, **k):
        with open(os.path.join(run_dir, f"saves_rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(f"{iteration}\n")
        return save(run_dir, iteration, state, *a, **k)

    return wrapped


def _worker_train(argv: list[str]) -> None:
    event = None
    if argv[0].startswith("at="):  # not an option: torchrun would take it for one of its own
        event, argv = argv[0][3:], argv[1:]
    assert argv[0] == "--"
    train_script.save_run_checkpoint = _record_saves(train_script.save_run_checkpoint)
    if event:
        kind, rank, iteration = event.split(":")
        train_script.train_step = with_event(train_script.train_step, kind, int(rank), int(iteration))
    run_cli(train_script.main, argv[1:])  # as `python train.py` does: one-line errors, exit code 2


def _worker_syncbn(out: str) -> None:
    import copy

    import network
    from loss import build_criterion
    from utils.config import LossConfig

    info = udist.init_distributed(device="cpu", timeout=60)
    torch.manual_seed(0)
    # float64, so that the comparison is not drowned in float32 rounding (which the ASPP image-pooling BN over
    # 4 values amplifies to ~1e-4 of the gradient); the loss itself still runs in float32.
    ref = network.build_model("hmsa_deeplabv3plus", 19, **TINY_MODEL).train().double()
    local = copy.deepcopy(ref)
    net = sync_batchnorm(copy.deepcopy(ref), info.device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    target = torch.randint(0, 19, (4, 64, 64), generator=g)
    criterion = build_criterion(LossConfig(), 19, 255)
    mine = slice(2 * info.rank, 2 * info.rank + 2)

    criterion(ref(images), target)[0].backward()  # one process, the global batch of 4
    local(images[mine])  # this rank's half with plain BN: the statistics SyncBN must not give
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    criterion(ddp(images[mine]), target[mine])[0].backward()

    def buffers(m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in m.state_dict().items() if "running" in k}

    torch.save({
        "converted": sum(isinstance(m, CpuSyncBatchNorm) for m in net.modules()),
        "ddp_world": torch.distributed.get_world_size(),
        "ref_buffers": buffers(ref), "buffers": buffers(net), "local_buffers": buffers(local),
        "ref_grads": {k: p.grad for k, p in ref.named_parameters()},
        "grads": {k: p.grad for k, p in net.named_parameters()},
    }, os.path.join(out, f"rank{info.rank}.pt"))
    udist.cleanup()


if __name__ == "__main__":
    if sys.argv[1] == "syncbn":
        _worker_syncbn(sys.argv[3])
    else:
        _worker_train(sys.argv[2:])
