"""Preemption: a signal sets a flag, every rank learns of it at the same step, the run checkpoints and exits with
EXIT_PREEMPTED, and the job is requeued (by SLURM or by scripts/slurm/common.sh), resuming from that checkpoint.

Which signal comes, and to which processes (docs/distributed.md, section Preemption):
- the warning before the time limit (`#SBATCH --signal=B:USR1@<seconds>`) goes to the batch script, which forwards
  USR1 to the tasks through srun;
- a preemption sends SIGTERM to every process of the job's steps (the data-loader workers too), GraceTime before
  the requeue; `scancel`, `scontrol requeue` and the time limit send it to the batch script and srun as well, then
  SIGKILL after KillWait. srun turns a SIGTERM it receives into SIGKILL of its tasks while the job still runs, so
  the batch script never forwards TERM.
Both set the flag. The handler only sets it: the checkpoint is written by the training loop between two steps.
Data-loader workers take both signals on a thread of their own (datasets._seed_worker): only a SIGTERM from their
main process ends them; torch's worker handler would die of any SIGTERM.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType

from .dist import all_gather_objects, any_rank

# EX_TEMPFAIL (sysexits.h): stopped early on request, with a checkpoint to resume from.
EXIT_PREEMPTED = 75
# SIGINT: Ctrl-C in a terminal (to every process of the foreground group) stops as a preemption does; a second
# Ctrl-C stops at once, without a checkpoint.
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Installs handlers for `signals` (restored by `close`); `requested()` is this process's flag,
    `agreed()` the flag of any rank (a collective: call it at the same point on every rank)."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, rank: int = 0) -> None:
        self.rank = rank
        self.signum: int | None = None
        self._pid = os.getpid()  # data-loader workers inherit the handler; only this process acts on it
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT and os.getpid() == self._pid:
            raise KeyboardInterrupt
        if self.signum is None and os.getpid() == self._pid:
            self.signum = signum
            # torch's SIGCHLD handler raises in the main process, wherever it is (mid-step, mid-checkpoint), when a
            # data-loader worker dies; once stopping, such a death must not cost the checkpoint: the loader still
            # reports it at its next batch.
            previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if previous is not None:  # None: set outside Python, nothing close() could put back
                self._previous[signal.SIGCHLD] = previous
            # os.write, not print: a handler that prints can re-enter a buffer the interrupted code was writing.
            again = " (Ctrl-C again: stop now, without a checkpoint)" if signum == signal.SIGINT else ""
            os.write(2, f"[rank {self.rank}] received {signal.Signals(signum).name}: "
                        f"checkpointing and stopping at the next step{again}\n".encode())

    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> bool:
        return any_rank(self.requested())

    def batch_check(self, num_batches: int) -> Callable[[], bool]:
        """A `should_stop` for a loop over this rank's `num_batches` batches (evaluation: ranks may hold one batch
        more or less). Before each of the first min-over-ranks batches every rank asks `agreed()`, so all of them
        stop at the same batch; after those it answers False without a collective (the others have none to match).
        """
        common = min(all_gather_objects(num_batches))
        asked = 0

        def should_stop() -> bool:
            nonlocal asked
            asked += 1
            return asked <= common and self.agreed()

        return should_stop

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
