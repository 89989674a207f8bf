"""File helpers: atomic writes and an inter-process lock that works where flock does not.

Atomic writes: a new temporary file in the target's folder, fsync, then a rename over the target. A reader sees
the old version or the new one, never a torn file, and a failed write leaves the old one. The temporary name is
unique per process and call, so processes that write one file at once (SLURM array tasks) never rename each
other's half-written file; the last rename wins.

Locks (`file_lock`): flock on the lock file; where the file system refuses flock (some NFS and Lustre mounts), a
second file created with O_CREAT|O_EXCL whose existence is the lock. Both name the holder (host and pid), so that a
waiter that gives up can say who holds the lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

log = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool, prefix: str, suffix: str) -> None:
    """`write(f)` into FOLDER/<prefix><pid>_<token><suffix>, then rename it to `path`. On any failure the temporary
    file is removed and the exception propagates; a failed write of the file itself (e.g. a full disk) is raised
    again as an OSError naming `path` (`_write_error`). The file is created by open() (mode "x"), so it gets the
    umask's permissions, not mkstemp's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}_{secrets.token_hex(4)}{suffix}")
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        code = _write_error(e, folder) if isinstance(e, Exception) else None  # not for an interrupt
        if os.path.exists(tmp):
            os.remove(tmp)
        if code is not None:
            raise OSError(code, os.strerror(code), path) from e
        raise


def _write_error(e: Exception, folder: str) -> int | None:
    """The errno of a failed write behind `e`, or None. A writer may hide it: torch's zip writer, whose file write
    raised OSError (ENOSPC), fails again while closing the archive and raises a RuntimeError over it ('unexpected
    pos'), so the chain of exceptions is searched, as a traceback shows it. A RuntimeError without one, with
    no space left in `folder` (checked while the temporary file still holds its part), is taken as a full disk."""
    seen: Exception | BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ if seen.__cause__ is not None else (None if seen.__suppress_context__
                                                                  else seen.__context__)
    if isinstance(e, RuntimeError) and free_bytes(folder) < FULL_BELOW:
        return errno.ENOSPC
    return None


FULL_BELOW = 2**20  # free bytes under which a failed write counts as one that found the disk full


def free_bytes(folder: str) -> int:
    """Bytes this process may still write in `folder`'s file system."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def atomic_write_text(path: str, text: str) -> None:
    """`text` into `path` atomically (temporary file .<name>.<pid>_<token>.tmp)."""
    atomic_write(path, lambda f: f.write(text), False, f".{os.path.basename(path)}.", ".tmp")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """`data` into `path` atomically (temporary file .<name>.<pid>_<token>.tmp): an encoded picture, for one."""
    atomic_write(path, lambda f: f.write(data), True, f".{os.path.basename(path)}.", ".tmp")


# ----------------------------------------------------------------------------------------------- locks

# flock's answers on file systems without lock support (NFS mounted with nolock, Lustre without flock, FUSE).
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)
POLL_S = 0.05
WAIT_LOG_S = 10.0  # a waiter says whom it waits for after this long


class LockTimeout(TimeoutError):
    """A file lock was still held when the caller's timeout ran out; the message names the holder."""


class Holder(NamedTuple):
    host: str
    pid: int
    job: str  # "slurm:<job id>.<restart count>", or "" outside SLURM


def _slurm_job() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"slurm:{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def _holder_text() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_slurm_job()}".rstrip() + "\n"


def _read_holder(path: str) -> Holder | None:
    """The holder written in a lock file; None when it is absent, empty (being created) or not ours."""
    try:
        with open(path) as f:
            fields = f.read().split()
        if len(fields) not in (2, 3) or int(fields[1]) <= 0:
            return None
        return Holder(fields[0], int(fields[1]), fields[2] if len(fields) == 3 else "")
    except (OSError, ValueError):
        return None


def _describe(holder: Holder | None) -> str:
    if holder is None:
        return "an unknown process"
    job = f" (SLURM job {holder.job[6:].split('.')[0]})" if holder.job else ""
    return f"pid {holder.pid} on host {holder.host}{job}"


def lock_holder(path: str) -> str:
    """Who holds (or last held) the lock `path`: 'pid N on host H', from the lock file or its `.pid` twin."""
    return _describe(_read_holder(path + ".pid") or _read_holder(path))


def held_by_earlier_run(path: str) -> bool:
    """Whether the lock `path` names a process of this SLURM job before its requeue (see _earlier_incarnation)."""
    holder = _read_holder(path + ".pid") or _read_holder(path)
    return holder is not None and _earlier_incarnation(holder)


def _earlier_incarnation(holder: Holder) -> bool:
    """Whether `holder` ran in this SLURM job before it was requeued: dead, wherever it ran (SLURM starts a
    requeued job only once every process of its previous run has ended)."""
    mine = _slurm_job()
    return bool(mine and holder.job) and holder.job.split(".")[0] == mine.split(".")[0] and holder.job != mine


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _flock(path: str, timeout: float | None, waiting: Callable[[], None], remove: bool) -> Iterator[bool]:
    """Hold flock on `path`, naming this process in it; yields False at once, holding nothing, where the file
    system does not support flock. Raises LockTimeout after `timeout` s. With `remove`, the file is deleted on
    release (while still locked), so a waiter that then gets the lock of the deleted file opens the path again."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in NO_FLOCK:
                    yield False
                    return
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
            else:
                if _still_linked(f, path):
                    try:
                        f.truncate(0)
                        f.write(_holder_text())
                        f.flush()
                        yield True
                    finally:
                        if remove:
                            with contextlib.suppress(FileNotFoundError):
                                os.remove(path)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    return
                fcntl.flock(f, fcntl.LOCK_UN)  # its holder deleted it on release: lock the path's new file
                continue
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"lock {path} still held after {timeout:.0f} s by {_describe(_read_holder(path))}")
        waiting()
        time.sleep(POLL_S)


def _still_linked(f: IO, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _host_mutex(lock_file: str) -> Iterator[None]:
    """Serialise, between the processes of this host, the takeover of `lock_file` from a dead holder: two
    waiters that both saw the same stale file must not both remove it (the second would remove the first's new
    lock). Only processes of the holder's host ever take a lock over, so a host-local flock is enough."""
    name = hashlib.sha1(os.path.abspath(lock_file).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"hmsa-lock-takeover-{name}"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dead(holder: Holder, here: str) -> bool:
    return (holder.host == here and not _pid_alive(holder.pid)) or _earlier_incarnation(holder)


def _take_over_if_stale(lock_file: str) -> None:
    """Remove `lock_file` when its holder is a dead process of this host."""
    here = socket.gethostname()
    first = _read_holder(lock_file)
    if first is None or not _dead(first, here):
        return
    with _host_mutex(lock_file):
        holder = _read_holder(lock_file)  # again: another waiter may have taken it over meanwhile
        if holder is not None and _dead(holder, here):
            log.warning("lock %s: its holder, %s, is dead; taking it over", lock_file, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_file)


def _create_lock_file(lock_file: str, timeout: float | None, waiting: Callable[[], None]) -> None:
    """Create `lock_file` (O_EXCL) holding this host and pid, waiting while another process holds it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _take_over_if_stale(lock_file)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(_holder_text())
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"lock {lock_file} still held after {timeout:.0f} s by "
                              f"{_describe(_read_holder(lock_file))}; if that process is gone (its node died), "
                              f"delete {lock_file}")
        waiting()
        time.sleep(POLL_S)


@contextlib.contextmanager
def file_lock(path: str, timeout: float | None = None, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if absent) between processes, of one host or several.

    flock where the file system offers it; where it refuses (OSError ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL) the lock is
    the file `<path>.pid`, created with O_CREAT|O_EXCL, holding the holder's host and pid and removed on release; a
    `.pid` file whose holder is dead (a process of this host, or of this SLURM job before its requeue) is taken
    over. Processes must agree on the mechanism: mounts of one file system with and without lock support do not
    exclude each other. `remove`: delete `path` on release (a lock inside a folder that must look untouched).
    Waits for ever (`timeout` None, logging the holder after 10 s) or raises LockTimeout naming the holder.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    start, told = time.monotonic(), []

    def waiting() -> None:
        if not told and time.monotonic() - start > WAIT_LOG_S:
            told.append(True)
            if os.path.exists(path + ".pid"):
                log.info("waiting for lock %s.pid, held by %s (if that process is gone, delete the file)", path,
                         _describe(_read_holder(path + ".pid")))
            else:
                log.info("waiting for lock %s, held by %s", path, _describe(_read_holder(path)))

    with _flock(path, timeout, waiting, remove) as flocked:
        if flocked:
            yield
            return
    lock_file = path + ".pid"
    _create_lock_file(lock_file, timeout, waiting)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        try:
            os.remove(lock_file)
        except FileNotFoundError:
            log.warning("lock %s was removed while this process held it (by hand?)", lock_file)
