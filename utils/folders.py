"""One writer per folder: a training run's folder (train.py) and an evaluation's output folder (eval.py).

A writer holds the lock file LOCK_NAME in its folder for as long as it writes there; a second process that would
write the same folder stops at once, with one line naming the holder's host and pid. However the holder ends, its
lock goes with it: an flock dies with its process, and where the file system has no flock, the lock file of a dead
process of this host, or of this SLURM job before its requeue, is taken over (utils.files.file_lock). The lock file
is deleted on release, so a finished folder holds the run's files only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .cli import CliError, ensure_writable_dir
from .files import LockTimeout, file_lock, held_by_earlier_run, lock_holder
from .runtime.dist import DistInfo, broadcast_object

log = logging.getLogger(__name__)
LOCK_NAME = "writer.lock"
# A requeued job may find its previous run's flock still held for a while when that run's node died: an NFS server
# keeps a dead client's locks until its lease expires (90 s by default). The new run waits that long, not forever.
EARLIER_RUN_WAIT_S = 300.0
RUN_FILES = ("config.yaml", "best.pth")  # any of them, or a ckpt_*.pth: a training run's folder (evaluations have logs too)


def _lock(folder: str) -> contextlib.AbstractContextManager:
    return file_lock(os.path.join(folder, LOCK_NAME), timeout=0, remove=True)


def in_use(folder: str, key: str, what: str) -> str:
    return (f"{key}: {folder} is in use: {lock_holder(os.path.join(folder, LOCK_NAME))} {what} there; wait for it "
            f"to end, or choose another {key}")


def claim_folder(folder: str, key: str, what: str, stack: contextlib.ExitStack) -> None:
    """Create `folder` and hold its writer lock until `stack` closes; a CliError naming `key` when the folder is
    not writable or another process writes there (`what`: what that process does, for the message)."""
    ensure_writable_dir(folder, key)
    try:
        stack.enter_context(_lock(folder))
        return
    except LockTimeout:
        if not held_by_earlier_run(os.path.join(folder, LOCK_NAME)):
            raise CliError(in_use(folder, key, what)) from None
    log.warning("%s: still locked by this job's run before its requeue (%s); waiting up to %.0f s for the lock to "
                "expire", folder, lock_holder(os.path.join(folder, LOCK_NAME)), EARLIER_RUN_WAIT_S)
    try:
        stack.enter_context(file_lock(os.path.join(folder, LOCK_NAME), timeout=EARLIER_RUN_WAIT_S, remove=True))
    except LockTimeout:
        raise CliError(in_use(folder, key, what)) from None


T = TypeVar("T")


def decided_by_main(dist: DistInfo, decide: Callable[[], T]) -> T:
    """`decide()` on rank 0, its answer on every rank; a CliError there stops every rank with its message."""
    answer, error = None, None
    if dist.is_main:
        try:
            answer = decide()
        except CliError as e:
            error = e.message
    answer, error = broadcast_object((answer, error))
    if error is not None:
        raise CliError(error)
    return answer


@contextlib.contextmanager
def claim_run_folder(run_dir: str, dist: DistInfo) -> Iterator[None]:
    """The training run's folder, claimed by rank 0 for the whole run; every rank stops when it is taken."""
    with contextlib.ExitStack() as stack:
        decided_by_main(dist, lambda: claim_folder(run_dir, "run.output_dir / run.name", "trains", stack))
        yield


def is_run_folder(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES) or any(
        name.startswith("ckpt_") and name.endswith(".pth") for name in _listing(folder))


def _listing(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def read_results(folder: str) -> dict[str, Any] | None:
    """The results.json of a finished evaluation or training in `folder`; {} when unreadable, None when absent."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def claim_new_folder(base: str, stack: contextlib.ExitStack) -> str:
    """The first of `base`, `base_2`, ... that holds no finished results (results.json) and no other writer,
    created and locked until `stack` closes. Concurrent evaluations thus never share one: each checks for
    results again once it holds the lock, since another may have finished there meanwhile."""
    n = 1
    while True:
        folder = base if n == 1 else f"{base}_{n}"
        n += 1
        if read_results(folder) is not None:
            continue
        ensure_writable_dir(folder, "eval.dump_dir")
        attempt = contextlib.ExitStack()
        try:
            attempt.enter_context(_lock(folder))
        except LockTimeout:
            continue
        if read_results(folder) is not None:
            attempt.close()
            continue
        stack.enter_context(attempt)
        return folder
