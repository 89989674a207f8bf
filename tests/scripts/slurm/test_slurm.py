"""The sbatch scripts on a real one-node SLURM cluster on localhost (tests/slurm_cluster.py starts and stops it):
training with 2 tasks, a preemption signal that checkpoints, requeues and resumes, evaluation and a job array.

Skipped, with the reason, where the SLURM and munge programs are missing or cannot run (slurmd needs root).
`.ci/run` installs them, so in CI these tests run.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import tiny_run
from tests.slurm_cluster import SlurmCluster, started_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]

# The tiny run with two images per task, SyncBN across the tasks, and the defaults' checkpoint interval.
TINY = tiny_run({"data.batch_size": 2, "data.val_batch_size": 1, "model.norm": "syncbn", "train.ckpt_interval": None})
# The scripts' headers ask for 8 GPUs and 8 CPUs per node; this node has 2 of each.
TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster(tmp_path_factory, "slurm")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("slurm_data") / "data"
    generate_synthetic_cityscapes(str(root), 8, 2, 64, 128, 0)
    return root


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    return {**cluster.env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def submit(cluster: SlurmCluster, script: str, out: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    return cluster.sbatch(*TWO_TASKS, *options, f"--output={out}", f"scripts/slurm/{script}", *args, cwd=ROOT,
                          env=job_env(cluster))


def fail_text(cluster: SlurmCluster, out: Path) -> str:
    return (out.read_text()[-4000:] if out.exists() else "(no job output)") + "\n" + cluster.logs(15)


def train_rows(run: Path) -> list[int]:
    """Iterations of the train rows in metrics.jsonl, in file order ([] before the file exists). A last line without
    its newline is a row still being written (the test reads while the job writes) and is left out."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    *complete, _ = path.read_text().split("\n")
    rows = [json.loads(line) for line in complete]
    return [row["iteration"] for row in rows if row["split"] == "train"]


def wait_for_rows(cluster: SlurmCluster, job: str, run: Path, out: Path, count: int = 2) -> None:
    """Until the run has logged `count` training iterations (the job must stay pending or running meanwhile)."""
    end = time.time() + 180
    while len(train_rows(run)) < count:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), fail_text(cluster, out)
        assert time.time() < end, f"no {count} training iterations after 180 s\n" + fail_text(cluster, out)
        time.sleep(0.2)


def stopped_and_resumed(run: Path, planned: int) -> tuple[re.Match, str]:
    """The log's stop line (its iteration k, 2 <= k < planned) and the resume line from ckpt_k that must follow."""
    log = (run / "train.log").read_text()
    stopped = re.search(r"stopped by a preemption signal at iteration (\d+)/(\d+)", log)
    assert stopped, log[-3000:]
    k = int(stopped.group(1))
    assert 2 <= k < planned
    resumed = f"resumed from {run}/ckpt_{k:08d}.pth at iteration {k}"
    assert resumed in log
    return stopped, resumed


def test_train_sbatch_trains_the_demo_with_two_tasks(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    job = submit(cluster, "train.sbatch", out, "--config", "configs/demo/default.yaml", *TINY,
                 f"data.root={data}", "train.max_iter=4", "train.ckpt_interval=2",
                 f"run.output_dir={tmp_path}/runs", "run.name=demo")
    info = cluster.wait_job(job, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), fail_text(cluster, out)
    run = tmp_path / "runs" / "demo"
    log = (run / "train.log").read_text()
    assert "2 process(es) on cpu (launcher: slurm)" in log
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == ["ckpt_00000002.pth", "ckpt_00000004.pth"]
    assert train_rows(run) == [1, 2, 3, 4]
    assert json.loads((run / "eval" / "results.json").read_text())["iteration"] == 4
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    text = out.read_text()
    assert "0: [##########..........] 2/4" in text and "1: [" not in text  # one progress stream, labelled rank 0
    assert "tasks finished with exit code 0" in text


def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, data, tmp_path):
    out = tmp_path / "job.out"
    run = tmp_path / "runs" / "preempt"
    planned = 16
    # data-loader workers receive the signals of the step too (tests/scripts/slurm/test_slurm_preempt.py: SIGTERM)
    job = submit(cluster, "train.sbatch", out, "--config", "configs/demo/default.yaml", *TINY,
                 f"data.root={data}", "data.num_workers=2", f"train.max_iter={planned}", "train.ckpt_interval=100",
                 "eval.num_dump=0", f"run.output_dir={tmp_path}/runs", "run.name=preempt")
    wait_for_rows(cluster, job, run, out)
    # what `#SBATCH --signal=B:USR1@300` sends before the time limit
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The job requeues itself; SLURM holds it (the cluster's cred_expire + 1 s, see slurm_cluster.py) until slurmd
    # accepts a new launch of it, and starts it then. Releasing it sooner by hand races that, so the test waits.
    info = cluster.wait_job(job, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), fail_text(cluster, out)

    stopped, _ = stopped_and_resumed(run, planned)
    k = int(stopped.group(1))
    assert train_rows(run) == list(range(1, planned + 1))  # every iteration once: none lost, none run twice
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == [f"ckpt_{k:08d}.pth", f"ckpt_{planned:08d}.pth"]
    text = out.read_text()
    assert "received SIGUSR1, forwarding it to the tasks" in text
    # 75 from every task; a task that srun --kill-on-bad-exit ended a moment after the first exit reports a signal
    assert re.search(r"\(exit \d+\): requeueing", text) and "(restart 1)" in text, text


def test_eval_sbatch_and_a_scale_set_array(cluster, data, tmp_path):
    run = tmp_path / "runs" / "r"
    train = submit(cluster, "train.sbatch", tmp_path / "train.out", *TINY, f"data.root={data}", "train.max_iter=2",
                   f"run.output_dir={tmp_path}/runs", "run.name=r", options=("--ntasks-per-node=1",))
    info = cluster.wait_job(train, timeout=240)
    assert info["JobState"] == "COMPLETED", fail_text(cluster, tmp_path / "train.out")

    out = tmp_path / "eval.out"
    job = submit(cluster, "eval.sbatch", out, "--config", str(run / "config.yaml"), "--out", str(tmp_path / "ev"))
    (tmp_path / "scales.txt").write_text("# scale sets\n0.5,1.0\n\n1.0, 2.0\n")
    env = {**job_env(cluster), "EVAL_OUT": str(tmp_path / "array")}
    array = cluster.run(str(ROOT / "scripts" / "slurm" / "submit_array.sh"), "eval", str(tmp_path / "scales.txt"),
                        "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10",
                        f"--output={tmp_path}/array-%a.out", "--", "--config", str(run / "config.yaml"),
                        cwd=ROOT, env=env).stdout.split()[-1]
    info = cluster.wait_job(job, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), fail_text(cluster, out)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["scales"] == [0.5, 1.0]
    for task, scales in ((0, [0.5, 1.0]), (1, [1.0, 2.0])):
        info = cluster.wait_job(f"{array}_{task}", timeout=240)
        assert info["JobState"] == "COMPLETED", fail_text(cluster, tmp_path / f"array-{task}.out")
        results = tmp_path / "array" / "+".join(str(s) for s in scales) / "results.json"
        assert json.loads(results.read_text())["scales"] == scales
