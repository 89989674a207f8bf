"""Preemption: a signal sets a flag, every rank learns of it at the same step, the run checkpoints and exits with
EXIT_PREEMPTED, and scripts/slurm/train.sbatch requeues the job, which resumes from that checkpoint.

SLURM sends the warning signal (`#SBATCH --signal=B:USR1@<seconds>`) to the batch script, which forwards it to the
tasks; a cancellation, a time limit or the scheduler's own preemption sends SIGTERM (and SIGKILL after KillWait).
Both set the flag. The handler only sets it: the checkpoint is written by the training loop between two steps.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType

from .dist import all_gather_objects, any_rank

# EX_TEMPFAIL (sysexits.h): stopped early on request, resumable. train.sbatch requeues the job on this code.
EXIT_PREEMPTED = 75
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs handlers for `signals` (restored by `close`); `requested()` is this process's flag,
    `agreed()` the flag of any rank (a collective: call it at the same point on every rank)."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, rank: int = 0) -> None:
        self.rank = rank
        self.signum: int | None = None
        self._pid = os.getpid()  # data-loader workers inherit the handler; only this process acts on it
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None and os.getpid() == self._pid:
            self.signum = signum
            # os.write, not print: a handler that prints can re-enter a buffer the interrupted code was writing.
            os.write(2, f"[rank {self.rank}] received {signal.Signals(signum).name}: "
                        "checkpointing and stopping at the next step\n".encode())

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
