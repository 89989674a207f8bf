"""A real one-node SLURM cluster on localhost for the sbatch tests: munged, slurmctld and slurmd in a temporary
folder, with their own config, socket and ports, started and stopped by the test (see tests/scripts/slurm/test_slurm.py).

The node offers 2 CPUs and 2 count-only GPUs (no devices behind them) so that the project's sbatch scripts run
with their GPU requests as written; the tasks see no CUDA device and train on the CPU with gloo.

With `grace_time`, the cluster preempts as a production one does (preempt/partition_prio, PreemptMode=REQUEUE): a
job of the partition `high` takes the node from the jobs of the default partition `debug`, which get SIGTERM, then
`grace_time` seconds, then are requeued (SIGTERM again, KillWait, SIGKILL).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")
# A requeued job is held for CRED_EXPIRE + 1 s (SLURM's default: 120 s). The hold is what makes the restart safe:
# slurmd refuses every launch credential of the job created in the same second as (or before) the kill of its
# previous run ("Job credential revoked"), so a job released earlier (scontrol update StartTime=now) can fail.
# 10 s is also the lifetime of a step's launch credential: ample for slurmctld -> srun -> slurmd on a loaded machine.
CRED_EXPIRE = 10
KILL_WAIT = 30


def missing_binaries() -> list[str]:
    """The SLURM/munge programs not found on PATH (nor in /usr/sbin, where Debian puts the daemons)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports on localhost (held open together while picking, so none is drawn twice)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


class SlurmCluster:
    """One node named after this host (slurmd must find its own name in slurm.conf), CPUs=2, Gres=gpu:2."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2, gpus: int = 2, grace_time: int | None = None,
                 kill_wait: int = KILL_WAIT) -> None:
        self.root = Path(root)
        self.cpus, self.gpus = cpus, gpus
        self.grace_time, self.kill_wait = grace_time, kill_wait
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------- set-up

    def env(self) -> dict[str, str]:
        """The environment of a client command (sbatch, scontrol, ...) talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[key]  # a test run inside a SLURM job must not leak its own job's variables
        return env

    def _write_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        user = os.environ.get("USER") or "root"
        if os.getuid() == 0:
            user = "root"
        self.ctld_port, self.slurmd_port = _free_ports(2)
        lines = [
            "ClusterName=hmsatest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire={CRED_EXPIRE}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in containers: track processes by parent pid, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Look at every pending job each second (default: 60 s), so a job starts within a second of becoming
            # eligible, e.g. a requeued one at the end of its hold, which no other event announces.
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "JobRequeue=1",
            # train.py derives its rendezvous port from the job id (20000 + id % 10000, utils/runtime/dist.py): ids
            # all starting at 1 made the first jobs of two clusters running on this host at once share a port ("failed
            # to listen"). Started at the slurmctld port, which no other running cluster holds, they rarely meet.
            f"FirstJobId={self.ctld_port}",
            f"KillWait={self.kill_wait}",
            "MinJobAge=600",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN",
        ]
        if self.grace_time is None:
            lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        else:
            lines += [
                "PreemptType=preempt/partition_prio",
                "PreemptMode=REQUEUE",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                f"PreemptMode=REQUEUE GraceTime={self.grace_time}",
                "PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        # slurmd counts GPUs by their device files: empty files stand in for /dev/nvidia*.
        (r / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus):
            (r / "dev" / f"gpu{i}").touch()
        files = f"{r / 'dev'}/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{r / 'dev'}/gpu0"
        (r / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File={files}\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start the three daemons and wait until the node is idle; on failure, stop and raise with the logs."""
        self._write_munge()
        self._write_conf()
        m = self.root / "munge"
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.socket}", f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}",
        ])
        try:
            self._wait(lambda: self.socket.exists(), 10, "munged to open its socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout,
                       "slurmctld to answer")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n" + self.logs())

    def stop(self) -> None:
        """Cancel what is left, wait until slurmd has ended it, then stop the daemons this object started (by their
        process ids). Stopping slurmd before the cancelled jobs are gone would leave their processes running."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", os.environ.get("USER") or "root", check=False)
            end = time.time() + (self.grace_time or 0) + self.kill_wait + 30
            while self.unfinished_jobs() and time.time() < end:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def logs(self, tail: int = 40) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------------------------------- clients

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(argv[0]), *argv[1:]], env=kwargs.pop("env", self.env()), text=True,
                              capture_output=True, timeout=kwargs.pop("timeout", 30), **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False)
        lines = proc.stdout.split()  # one line per partition: the node is in both where preemption is configured
        return lines[0].rstrip("*~#").lower() if lines else ""

    def sbatch(self, *argv: str, cwd: str | os.PathLike, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        proc = self.run("sbatch", "--parsable", *argv, cwd=cwd, env=env or self.env())
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str, timeout: float = 30.0) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten. Other
        failures (slurmctld busy on a loaded machine) are retried for `timeout` seconds, then raised."""
        end = time.time() + timeout
        while True:
            proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
            if proc.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            if "Invalid job id" in proc.stderr:
                return {}
            if time.time() > end:
                raise RuntimeError(f"scontrol show job {job_id} failed ({proc.returncode}): {proc.stderr.strip()}")
            time.sleep(0.5)

    def unfinished_jobs(self) -> list[str]:
        """Ids of the jobs not finished yet (pending, running, completing, requeued, ...)."""
        proc = self.run("scontrol", "-o", "show", "jobs", check=False)
        if proc.returncode != 0:
            return []
        jobs = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines()]
        return [j["JobId"] for j in jobs if "JobId" in j and j.get("JobState") not in FINISHED]

    def wait_job(self, job_id: str, timeout: float, states: tuple[str, ...] = FINISHED) -> dict[str, str]:
        """Poll until the job is in one of `states`; returns its record (TimeoutError with the logs otherwise)."""
        end = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s:\n" + self.logs())


def started_cluster(tmp_path_factory: Any, name: str = "slurm", **options: Any) -> Iterator[SlurmCluster]:
    """The body of a test module's `cluster` fixture: a cluster started in a fresh folder (`options` go to
    SlurmCluster), stopped afterwards; the test is skipped (with the reason) where SLURM is missing or slurmd cannot
    launch steps."""
    import pytest

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed (missing: {', '.join(missing)}); .ci/run installs slurmctld, slurmd, "
                    "slurm-client and munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to launch job steps")
    cluster = SlurmCluster(tmp_path_factory.mktemp(name), **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
