"""Every way SLURM stops a training job, as SLURM delivers it, on a local cluster that preempts (tests/slurm_cluster.py,
`grace_time`): `scancel`, preemption by a job of a higher-priority partition, `scontrol requeue` (the warning signal
before the time limit is tested in test_slurm.py). Each sends SIGTERM to every process of the job: the batch script,
srun, the tasks and their data-loader workers (data.num_workers=2). Each must end with a checkpoint at the iteration
where the signal arrived and a resume that runs every iteration exactly once.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.scripts.slurm.test_slurm import TINY, fail_text, job_env, submit, train_rows
from tests.slurm_cluster import SlurmCluster, started_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PLANNED = 10
# Long enough for a checkpoint on a loaded machine; the tests never wait for it to pass (the tasks stop sooner).
GRACE_TIME = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster(tmp_path_factory, "slurm_preempt", grace_time=GRACE_TIME)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("slurm_preempt_data") / "data"
    generate_synthetic_cityscapes(str(root), 8, 2, 64, 128, 0)
    return root


def train(cluster: SlurmCluster, data: Path, tmp_path: Path, out: Path) -> str:
    """Submit the tiny training run (2 tasks, 2 data-loader workers each) to the default (preemptible) partition."""
    return submit(cluster, "train.sbatch", out, "--config", "configs/demo/default.yaml", *TINY, f"data.root={data}",
                  "data.num_workers=2", f"train.max_iter={PLANNED}", "train.ckpt_interval=1000", "eval.num_dump=0",
                  f"run.output_dir={tmp_path}/runs", "run.name=r")


def start(cluster: SlurmCluster, data: Path, tmp_path: Path, out: Path) -> tuple[str, int]:
    """A training job that has logged 2 iterations; returns its id and the iterations logged when this returns."""
    job = train(cluster, data, tmp_path, out)
    run = tmp_path / "runs" / "r"
    end = time.time() + 180
    while len(train_rows(run)) < 2:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), fail_text(cluster, out)
        assert time.time() < end, "no 2 training iterations after 180 s\n" + fail_text(cluster, out)
        time.sleep(0.2)
    return job, len(train_rows(run))


def stopped_at(run: Path, logged: int, out: Path, cluster: SlurmCluster) -> int:
    """The iteration of the one preemption stop in train.log: at or after the signal, with its own checkpoint."""
    stops = re.findall(r"stopped by a preemption signal at iteration (\d+)/(\d+)", (run / "train.log").read_text())
    assert len(stops) == 1, fail_text(cluster, out)
    k = int(stops[0][0])
    assert logged <= k < PLANNED, fail_text(cluster, out)
    assert (run / f"ckpt_{k:08d}.pth").exists()
    return k


def check_resumed(run: Path, k: int) -> None:
    log = (run / "train.log").read_text()
    assert f"resumed from {run}/ckpt_{k:08d}.pth at iteration {k}" in log
    assert train_rows(run) == list(range(1, PLANNED + 1))  # every iteration once: none lost, none run twice
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == [f"ckpt_{k:08d}.pth", f"ckpt_{PLANNED:08d}.pth"]


def test_scancel_checkpoints_and_the_same_command_resumes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    run = tmp_path / "runs" / "r"
    job, logged = start(cluster, data, tmp_path, out)
    cluster.run("scancel", job)
    info = cluster.wait_job(job, timeout=120)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), fail_text(cluster, out)
    k = stopped_at(run, logged, out, cluster)
    text = out.read_text()
    assert "received SIGTERM: the tasks checkpoint and stop" in text and "requeueing" not in text, text

    again = train(cluster, data, tmp_path, out)  # not requeued: the same command resumes
    info = cluster.wait_job(again, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), fail_text(cluster, out)
    check_resumed(run, k)


def test_preemption_by_a_higher_priority_job_checkpoints_requeues_and_resumes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    run = tmp_path / "runs" / "r"
    job, logged = start(cluster, data, tmp_path, out)
    # needs both CPUs of the node: SLURM preempts the training job (SIGTERM to its steps, GraceTime to stop)
    urgent = cluster.sbatch("--partition=high", "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/urgent.out",
                            "--wrap", "echo urgent ran", cwd=tmp_path, env=job_env(cluster))
    info = cluster.wait_job(urgent, timeout=GRACE_TIME + 60)
    assert info["JobState"] == "COMPLETED", fail_text(cluster, out)
    assert "urgent ran" in (tmp_path / "urgent.out").read_text()
    info = cluster.wait_job(job, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), fail_text(cluster, out)
    k = stopped_at(run, logged, out, cluster)
    check_resumed(run, k)
    text = out.read_text()
    assert "a preemption (exit" in text and "(restart 1)" in text, text


def test_scontrol_requeue_checkpoints_and_resumes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    run = tmp_path / "runs" / "r"
    job, logged = start(cluster, data, tmp_path, out)
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait_job(job, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), fail_text(cluster, out)
    k = stopped_at(run, logged, out, cluster)
    check_resumed(run, k)
    text = out.read_text()
    assert "received SIGTERM: the tasks checkpoint and stop" in text and "(restart 1)" in text, text
