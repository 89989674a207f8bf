"""The stop signals as SLURM delivers them, without SLURM: slurmstepd sends SIGTERM to every process of a step, the
data-loader workers too (tests/scripts/slurm/test_slurm_preempt.py drives the real thing)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import tiny_run
from utils.cli import run_cli
from utils.runtime.preempt import EXIT_PREEMPTED, Preemption

ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc: the data-loader workers of a training process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def train_rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"split": "train"') if path.exists() else 0


def start_training(tmp_path: Path, planned: int) -> tuple[subprocess.Popen, Path, Path, list[str]]:
    """A tiny training of `planned` iterations with 2 loader workers in its own process group (as a SLURM step,
    or a terminal's foreground job), once it has logged 2 iterations: (process, run folder, output, argv)."""
    from datasets.synthetic import generate_synthetic_cityscapes

    generate_synthetic_cityscapes(str(tmp_path / "data"), 8, 2, 64, 128, 0)
    args = tiny_run({"data.num_workers": 2, "train.ckpt_interval": 1000, "eval.num_dump": 0}, root=tmp_path,
                    max_iter=planned)
    run = tmp_path / "runs" / "run"
    out = tmp_path / "train.out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    end = time.time() + 300
    while train_rows(run) < 2:  # the loader's (persistent) workers run from the first batch on
        assert proc.poll() is None, out.read_text()[-3000:]
        assert time.time() < end, "no 2 training iterations after 300 s\n" + out.read_text()[-3000:]
        time.sleep(0.1)
    assert len(children(proc.pid)) >= 2, "no data-loader workers"
    return proc, run, out, args


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_to_the_whole_process_group_checkpoints_and_exits_75(tmp_path, signum):
    # SIGTERM: what slurmstepd sends every process of the step; SIGINT: what a terminal's Ctrl-C sends every
    # process of the foreground job.
    planned = 40
    proc, run, out, _ = start_training(tmp_path, planned)
    try:
        logged = train_rows(run)
        os.killpg(proc.pid, signum)
        rc = proc.wait(timeout=300)
    finally:
        stop(proc)
    text = out.read_text()
    assert rc == EXIT_PREEMPTED, text[-3000:]
    stopped = re.search(r"stopped by a preemption signal at iteration (\d+)/(\d+)", text)
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert logged <= k < planned
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == [f"ckpt_{k:08d}.pth"]
    assert "DataLoader worker" not in text and "Traceback" not in text


def test_a_second_ctrl_c_stops_at_once_in_one_line(capfd):
    with Preemption() as preempt:
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        assert preempt.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "Ctrl-C again: stop now" in capfd.readouterr().err

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(interrupted, [])
    assert e.value.code == 130
    assert capfd.readouterr().err == "interrupted: stopped without a checkpoint (a run resumes from its last one)\n"


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_logs_each_iteration_once_when_rerun(tmp_path):
    proc, run, out, args = start_training(tmp_path, 400)
    stop(proc)  # SIGKILL: no checkpoint; metrics.jsonl holds the first iterations
    assert train_rows(run) >= 2 and not list(run.glob("ckpt_*.pth"))
    rerun = [a for a in args if not a.startswith(("train.max_iter=", "data.num_workers="))]
    subprocess.run([sys.executable, "train.py", *rerun, "train.max_iter=3", "data.num_workers=0"], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(r)["iteration"] for r in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert rows == [1, 2, 3]


def test_a_worker_death_after_a_stop_request_does_not_raise_in_the_main_process():
    # torch's SIGCHLD handler raises wherever the main process is when a worker dies; after a stop request that
    # must not interrupt the step or the checkpoint. close() puts the handler back.
    def torch_like(signum, frame):
        raise RuntimeError("DataLoader worker exited unexpectedly")

    before = signal.signal(signal.SIGCHLD, torch_like)
    try:
        with Preemption() as preempt:
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
            assert preempt.requested()
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
            child = subprocess.Popen([sys.executable, "-c", "pass"])
            assert child.wait() == 0
        assert signal.getsignal(signal.SIGCHLD) is torch_like
    finally:
        signal.signal(signal.SIGCHLD, before)


WORKERS_AT_EXIT = """
import sys
from datasets import build_dataset, build_loader
from utils.config import DataConfig, SyntheticConfig
cfg = DataConfig.make(root=sys.argv[1], dataset="synthetic", num_workers=2, batch_size=2,
                      synthetic=SyntheticConfig(num_train=4, num_val=2, height=32, width=64), crop_size=(32, 32))
ds = build_dataset(cfg, "train", train=True)
loader = build_loader(ds, cfg, train=True)
batches = iter(loader)
next(batches)
print("workers", *[w.pid for w in batches.it._workers], flush=True)
sys.stdin.readline()  # the test sends its own SIGTERMs, then lets this process exit with the iterator alive
next(batches)
print("batch after the signals", flush=True)
"""


@pytest.mark.slow
def test_workers_drop_a_stranger_s_sigterm_and_end_with_their_process(tmp_path):
    """A worker takes SIGTERM from its parent as an order to end (multiprocessing ends its daemons so at exit; a
    worker that ignored it hung the exit of every process that left an iterator alive, e.g. after a DataError),
    and drops one from anyone else (slurmstepd signalling every process of the step)."""
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_AT_EXIT, str(tmp_path / "data")], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("workers "), line + proc.stdout.read()
        workers = [int(p) for p in line.split()[1:]]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # a stranger's: the test is not their parent
        proc.stdin.write("\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=120)  # exits: the workers end on their parent's SIGTERM at exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "batch after the signals" in rest, rest[-3000:]
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in workers)
