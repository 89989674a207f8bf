"""utils.files.file_lock: flock, or an O_EXCL lock file where the file system refuses flock (some NFS and Lustre
mounts), contended by real processes; a dead holder's lock file is taken over; the centroid cache and the synthetic
generator lock through it."""
from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets.synthetic import generate_synthetic_cityscapes
from datasets.uniform import load_or_compute
from utils.files import LockTimeout, file_lock

FORK = multiprocessing.get_context("fork")  # children inherit the patched flock
WAIT_S = 20.0  # bound of every wait for another process; a passing run waits a fraction of a second


@pytest.fixture()
def nolock(tmp_path, monkeypatch) -> Path:
    """A folder whose file system refuses flock with ENOSYS, as an NFS mount without lock support does; other
    folders (the host-local temporary folder) keep theirs."""
    folder = tmp_path / "nfs"
    folder.mkdir()
    real = fcntl.flock

    def flock(f, op):
        fd = f if isinstance(f, int) else f.fileno()
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    return folder


@pytest.fixture(params=["flock", "lock file"])
def lock_path(request, tmp_path) -> str:
    """A lock path on a file system with flock, and one on a file system without it."""
    folder = request.getfixturevalue("nolock") if request.param == "lock file" else tmp_path
    return str(folder / "x.lock")


def holder(path: str, held, release) -> None:
    with file_lock(path):
        held.set()
        release.wait(WAIT_S)


def waiter(path: str, trying, entered) -> None:
    trying.set()
    with file_lock(path):
        entered.set()


def test_second_process_waits_until_the_first_releases(lock_path):
    held, release, trying, entered = (FORK.Event() for _ in range(4))
    first = FORK.Process(target=holder, args=(lock_path, held, release))
    first.start()
    assert held.wait(WAIT_S)
    second = FORK.Process(target=waiter, args=(lock_path, trying, entered))
    second.start()
    assert trying.wait(WAIT_S)
    assert not entered.wait(0.5)  # held by the first: the second must still be waiting
    release.set()
    assert entered.wait(WAIT_S)
    for p in (first, second):
        p.join(WAIT_S)
        assert p.exitcode == 0
    assert not os.path.exists(lock_path + ".pid")  # the fallback's lock file is gone once released


def count_in_lock(path: str, counter: str, rounds: int, remove: bool) -> None:
    for _ in range(rounds):
        with file_lock(path, remove=remove):
            with open(counter) as f:
                n = int(f.read())
            with open(counter, "w") as f:  # a read-modify-write that loses counts unless the lock excludes
                f.write(str(n + 1))


@pytest.mark.parametrize("remove", [False, True], ids=["kept", "removed on release"])
def test_mutual_exclusion_under_contention(lock_path, tmp_path, remove):
    # removed on release: a waiter that then locks the deleted file must notice and lock the path's new one
    counter = str(tmp_path / "counter")
    Path(counter).write_text("0")
    procs = [FORK.Process(target=count_in_lock, args=(lock_path, counter, 25, remove)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Path(counter).read_text() == "100"


def test_timeout_names_the_holder(lock_path):
    held, release = FORK.Event(), FORK.Event()
    first = FORK.Process(target=holder, args=(lock_path, held, release))
    first.start()
    try:
        assert held.wait(WAIT_S)
        with pytest.raises(LockTimeout, match=rf"still held after 0 s by pid {first.pid} on host "
                                              rf"{socket.gethostname()}"):
            with file_lock(lock_path, timeout=0.2):
                pass
    finally:
        release.set()
        first.join(WAIT_S)
    with file_lock(lock_path, timeout=WAIT_S):  # free again
        pass


def die_holding(path: str) -> None:
    with file_lock(path):
        os.kill(os.getpid(), signal.SIGKILL)  # no release: the lock file stays


def test_lock_file_of_a_killed_holder_is_taken_over(nolock):
    path = str(nolock / "x.lock")
    dead = FORK.Process(target=die_holding, args=(path,))
    dead.start()
    dead.join(WAIT_S)
    assert dead.exitcode == -signal.SIGKILL
    assert Path(path + ".pid").read_text() == f"{socket.gethostname()} {dead.pid}\n"
    with file_lock(path, timeout=WAIT_S):
        assert Path(path + ".pid").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert not os.path.exists(path + ".pid")


def test_lock_file_of_a_dead_pid_is_taken_over(nolock):
    path = str(nolock / "x.lock")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    Path(path + ".pid").write_text(f"{socket.gethostname()} {int(ended.stdout)}\n")
    with file_lock(path, timeout=WAIT_S):
        pass
    assert not os.path.exists(path + ".pid")


def exclusive(path: str, inside: str, rounds: int) -> None:
    """Fail (exit code 1) if another process is inside the lock at the same time."""
    for _ in range(rounds):
        with file_lock(path, timeout=WAIT_S):
            try:
                fd = os.open(inside, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                os._exit(1)
            os.close(fd)
            os.remove(inside)


def test_waiters_that_all_find_a_stale_lock_take_it_over_one_at_a_time(nolock):
    path = str(nolock / "x.lock")
    dead = FORK.Process(target=die_holding, args=(path,))
    dead.start()
    dead.join(WAIT_S)
    procs = [FORK.Process(target=exclusive, args=(path, str(nolock / "inside"), 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert not os.path.exists(path + ".pid")


def test_lock_of_another_host_is_not_taken_over(nolock):
    path = str(nolock / "x.lock")
    Path(path + ".pid").write_text("node17 4242\n")
    with pytest.raises(LockTimeout) as e:
        with file_lock(path, timeout=0.2):
            pass
    assert str(e.value) == (f"lock {path}.pid still held after 0 s by pid 4242 on host node17; if that process is "
                            f"gone (its node died), delete {path}.pid")
    assert Path(path + ".pid").read_text() == "node17 4242\n"


def late_waiter(path: str, opened, released, entered, leave) -> None:
    """Opens the lock file, then (as if descheduled) tries flock only after the holder released and deleted it."""
    real = fcntl.flock
    first = []

    def flock(f, op):
        if not first:
            first.append(True)
            opened.set()
            released.wait(WAIT_S)
        return real(f, op)

    fcntl.flock = flock
    with file_lock(path, remove=True):
        entered.set()
        leave.wait(WAIT_S)


def test_a_waiter_holding_the_deleted_file_relocks_the_new_one(tmp_path):
    path = str(tmp_path / "x.lock")
    opened, released, entered, leave = (FORK.Event() for _ in range(4))
    with file_lock(path, remove=True):
        late = FORK.Process(target=late_waiter, args=(path, opened, released, entered, leave))
        late.start()
        assert opened.wait(WAIT_S)  # it holds the file that is deleted on release
    released.set()
    try:
        assert entered.wait(WAIT_S)
        with pytest.raises(LockTimeout, match=f"by pid {late.pid} "):  # it locked the path's file, not a ghost
            with file_lock(path, timeout=0, remove=True):
                pass
    finally:
        leave.set()
        late.join(WAIT_S)
    assert late.exitcode == 0 and not os.path.exists(path)


def test_a_requeued_slurm_job_takes_over_its_earlier_run_s_lock(nolock, monkeypatch):
    # Without flock, a lock file written on another node cannot be checked; but SLURM starts a requeued job only
    # after every process of its previous run ended, so that run's lock (same job id, older restart) is stale.
    path = str(nolock / "x.lock")
    Path(path + ".pid").write_text("node17 4242 slurm:77.0\n")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(LockTimeout, match=r"by pid 4242 on host node17 \(SLURM job 77\)"):
        with file_lock(path, timeout=0.2):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with file_lock(path, timeout=WAIT_S):
        assert Path(path + ".pid").read_text() == f"{socket.gethostname()} {os.getpid()} slurm:77.1\n"
    assert not os.path.exists(path + ".pid")


def test_lock_file_removed_when_the_body_raises(nolock):
    path = str(nolock / "x.lock")
    with pytest.raises(KeyError):
        with file_lock(path):
            raise KeyError("boom")
    assert not os.path.exists(path + ".pid")


# ----------------------------------------------------------------------------------------------- the callers


class Masks:
    """The dataset interface load_or_compute needs: samples with mask paths, centroid_mask(index)."""

    def __init__(self, folder: Path, n: int) -> None:
        self.samples = []
        for i in range(n):
            path = folder / f"m{i}.npy"
            np.save(path, np.full((16, 16), i % 3, np.uint8))
            self.samples.append(type("S", (), {"mask": str(path)}))

    def centroid_mask(self, index: int) -> np.ndarray:
        return np.load(self.samples[index].mask)


def test_centroid_cache_without_flock(nolock, tmp_path):
    centroids, path = load_or_compute(Masks(tmp_path, 3), range(3), 3, 8, "masks", str(nolock / "cache"), workers=1)
    assert os.path.isfile(path) and len(centroids[0]) == 4  # image 0: class 0 in each of its 4 tiles
    assert not os.path.exists(path + ".lock.pid")


def test_synthetic_generation_without_flock(nolock):
    root = generate_synthetic_cityscapes(str(nolock / "data"), 1, 1, 16, 16, 0)
    assert os.path.isdir(root) and not os.path.exists(root + ".lock.pid")
