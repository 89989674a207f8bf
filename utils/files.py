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
from typing import IO, Any

log = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool, prefix: str, suffix: str) -> None:
    """`write(f)` into FOLDER/<prefix><pid>_<token><suffix>, then rename it to `path`. On any failure the temporary
    file is removed and the exception propagates; an OSError (e.g. a full disk) is raised again naming `path`. The file is created by open() (mode "x"), so it gets the umask's
    permissions, not mkstemp's private 0600."""
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
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from e
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`text` into `path` atomically (temporary file .<name>.<pid>_<token>.tmp)."""
    atomic_write(path, lambda f: f.write(text), False, f".{os.path.basename(path)}.", ".tmp")


# ----------------------------------------------------------------------------------------------- locks

# flock's answers on file systems without lock support (NFS mounted with nolock, Lustre without flock, FUSE).
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)
POLL_S = 0.05
WAIT_LOG_S = 10.0  # a waiter says whom it waits for after this long


class LockTimeout(TimeoutError):
    """A file lock was still held when the caller's timeout ran out; the message names the holder."""


def _holder_text() -> str:
    return f"{socket.gethostname()} {os.getpid()}\n"


def _read_holder(path: str) -> tuple[str, int] | None:
    """(host, pid) written in a lock file; None when it is absent, empty (being created) or not ours."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
        return (host, int(pid)) if int(pid) > 0 else None
    except (OSError, ValueError):
        return None


def _describe(holder: tuple[str, int] | None) -> str:
    return f"pid {holder[1]} on host {holder[0]}" if holder else "an unknown process"


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
def _flock(path: str, timeout: float | None, waiting: Callable[[], None]) -> Iterator[bool]:
    """Hold flock on `path`, naming this process in it; yields False at once, holding nothing, where the file
    system does not support flock. Raises LockTimeout after `timeout` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in NO_FLOCK:
                    yield False
                    return
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"lock {path} still held after {timeout:.0f} s by {_describe(_read_holder(path))}")
            waiting()
            time.sleep(POLL_S)
        try:
            f.truncate(0)
            f.write(_holder_text())
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def _take_over_if_stale(lock_file: str) -> None:
    """Remove `lock_file` when its holder is a dead process of this host."""
    here = socket.gethostname()
    first = _read_holder(lock_file)
    if first is None or first[0] != here or _pid_alive(first[1]):
        return
    with _host_mutex(lock_file):
        holder = _read_holder(lock_file)  # again: another waiter may have taken it over meanwhile
        if holder is not None and holder[0] == here and not _pid_alive(holder[1]):
            log.warning("lock %s: its holder, pid %d on this host, is dead; taking it over", lock_file, holder[1])
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
def file_lock(path: str, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if absent) between processes, of one host or several.

    flock where the file system offers it; where it refuses (OSError ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL) the lock is
    the file `<path>.pid`, created with O_CREAT|O_EXCL, holding the holder's host and pid and removed on release; a
    `.pid` file whose holder is a dead process of this host is taken over. Processes must agree on the mechanism:
    mounts of one file system with and without lock support do not exclude each other.
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

    with _flock(path, timeout, waiting) as flocked:
        if flocked:
            yield
            return
    lock_file = path + ".pid"
    _create_lock_file(lock_file, timeout, waiting)
    try:
        yield
    finally:
        try:
            os.remove(lock_file)
        except FileNotFoundError:
            log.warning("lock %s was removed while this process held it (by hand?)", lock_file)
