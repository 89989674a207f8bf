"""train.sbatch on two SLURM nodes on one machine (tests/slurm_twonode.py: each node in its own network, UTS, mount
and PID namespaces, joined by a veth pair): one rank per node, the master address from the node list, the gloo
process group across the two nodes, and the preemption warning that checkpoints, requeues and resumes.

Skipped, with the reason, where SLURM is missing, slurmd cannot run (not root) or namespaces cannot be created
(e.g. a container without CAP_SYS_ADMIN).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripts.slurm.test_slurm import (ROOT, TINY, TWO_TASKS, fail_text, job_env, stopped_and_resumed, train_rows,
                                      wait_for_rows)
from tests.slurm_cluster import missing_binaries
from tests.slurm_twonode import NODES, SUBNET, TwoNodeCluster, namespace_problem

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# One task, one count-only GPU and one CPU on each of the two nodes (after test_slurm's one-node options).
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[TwoNodeCluster]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to launch job steps (and namespaces need CAP_SYS_ADMIN)")
    problem = namespace_problem()
    if problem:
        pytest.skip(f"cannot create the nodes' namespaces: {problem}")
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    cluster.start()  # stops what it started when it fails
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("slurm2_data") / "data"
    generate_synthetic_cityscapes(str(root), 8, 2, 64, 128, 0)
    return root


def python_reporting_host(folder: Path) -> str:
    """An interpreter for $PYTHON that first prints the task's rank and host name (srun labels it with the rank),
    then runs the real one: the job output then shows which node each rank ran on."""
    path = folder / "python-on-host"
    path.write_text(f'#!/bin/sh\necho "rank $SLURM_PROCID on $(hostname) (node list $SLURM_STEP_NODELIST)"\n'
                    f'exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def submit_two(cluster: TwoNodeCluster, out: Path, tmp_path: Path, *args: str) -> str:
    """train.sbatch on both nodes, one task each (test_slurm's submit(), with the host-reporting interpreter)."""
    env = {**job_env(cluster), "PYTHON": python_reporting_host(tmp_path)}
    return cluster.sbatch(*TWO_TASKS, *TWO_NODES, f"--output={out}", "scripts/slurm/train.sbatch", *args, cwd=ROOT,
                          env=env)


def test_the_nodes_are_two_hosts_on_a_private_network(cluster):
    """The harness itself: each task of a two-node step sees its own host name and address, and resolves the first
    node's name (the master) to that node's address; the subnet is not on the machine's own interfaces."""
    probe = ("import socket; h = socket.gethostname(); "
             f"print(h, socket.gethostbyname(h), socket.gethostbyname({NODES[0]!r}))")
    proc = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", sys.executable, "-c", probe,
                       cwd=ROOT, timeout=60)
    first, second = (cluster.addrs[n] for n in NODES)
    assert sorted(proc.stdout.splitlines()) == [f"0: {NODES[0]} {first} {first}", f"1: {NODES[1]} {second} {first}"]
    mine = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert SUBNET not in mine


def test_train_sbatch_trains_the_demo_on_two_nodes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    job = submit_two(cluster, out, tmp_path, "--config", "configs/demo/default.yaml", *TINY, f"data.root={data}",
                     "train.max_iter=4", "train.ckpt_interval=2", f"run.output_dir={tmp_path}/runs", "run.name=demo")
    info = cluster.wait_job(job, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), fail_text(cluster, out)
    assert info["NodeList"] == "hmsa-node[1-2]" and info["NumNodes"] == "2", info
    text = out.read_text()
    # one rank per node, each on its own host; both took the first node of the list as the master
    assert f"0: rank 0 on {NODES[0]} (node list hmsa-node[1-2])" in text, text
    assert f"1: rank 1 on {NODES[1]} (node list hmsa-node[1-2])" in text, text
    assert "tasks finished with exit code 0" in text

    run = tmp_path / "runs" / "demo"
    log = (run / "train.log").read_text()
    assert "2 process(es) on cpu (launcher: slurm); this is rank 0" in log
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert "2 process(es) on cpu (launcher: slurm); this is rank 1" in (run / "logs" / "rank1.log").read_text()
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == ["ckpt_00000002.pth", "ckpt_00000004.pth"]
    assert train_rows(run) == [1, 2, 3, 4]
    assert json.loads((run / "eval" / "results.json").read_text())["iteration"] == 4


def test_preemption_warning_reaches_both_nodes_requeues_and_resumes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    run = tmp_path / "runs" / "preempt"
    planned = 16
    job = submit_two(cluster, out, tmp_path, "--config", "configs/demo/default.yaml", *TINY, f"data.root={data}",
                     f"train.max_iter={planned}", "train.ckpt_interval=100", "eval.num_dump=0",
                     f"run.output_dir={tmp_path}/runs", "run.name=preempt")
    wait_for_rows(cluster, job, run, out)
    # what `#SBATCH --signal=B:USR1@300` sends before the time limit: to the batch script on the first node
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The job requeues itself and SLURM holds it (cred_expire + 1 s, see tests/slurm_cluster.py) before starting it.
    info = cluster.wait_job(job, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), fail_text(cluster, out)

    stopped, resumed = stopped_and_resumed(run, planned)
    k = int(stopped.group(1))
    # the rank on the second node stopped at the same iteration (the ranks agree on the signal) and resumed there
    rank1 = (run / "logs" / "rank1.log").read_text()
    assert stopped.group(0) in rank1 and resumed in rank1, rank1[-3000:]
    assert train_rows(run) == list(range(1, planned + 1))  # every iteration once: none lost, none run twice
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == [f"ckpt_{k:08d}.pth", f"ckpt_{planned:08d}.pth"]
    text = out.read_text()
    assert "received SIGUSR1, forwarding it to the tasks" in text
    # srun forwarded it to the tasks (whichever rank saw it first made the others stop: the ranks agree on it, so a
    # rank that exits before its own copy arrives does not print it)
    assert re.search(r"^\d: \[rank \d\] received SIGUSR1", text, re.M), text
    assert re.search(r"\(exit \d+\): requeueing", text) and "(restart 1)" in text, text
    # both runs of the job spanned the two nodes
    assert text.count(f"1: rank 1 on {NODES[1]}") == 2, text
