"""Run logging: stdlib logging configured once per process (console on rank 0, warnings on every rank, train.log,
a file per rank), the metrics writer (metrics.jsonl and TensorBoard) and the progress line."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from utils.files import atomic_write_text


class Progress:
    """One progress line: a bar, done/total, optional values, rate and ETA (the training log, video frames,
    the centroid build).

    With `log` (e.g. a logger's info) every update is a line of its own: training writes one per logging interval,
    so they also reach train.log. Without it the line is rewritten in place on `stream` (stderr by default), at
    most every `interval` seconds, and `final=True` ends it with a newline.
    `start`: what was done before timing began (a resumed run), so the rate and ETA count this run's work only.
    `unit` names what is counted ("frames"); a total of 0 (unknown) shows the count and the rate only.
    """

    def __init__(self, total: int, start: int = 0, log: Callable[[str], None] | None = None, *,
                 stream: TextIO | None = None, unit: str = "", label: str = "", interval: float = 0.5,
                 width: int = 20) -> None:
        self.total, self.start, self.log, self.width = total, start, log, width
        self.stream = stream if stream is not None else sys.stderr
        self.unit, self.label, self.interval = unit, label, interval
        self.t0 = self.last = time.monotonic()

    def line(self, done: int, values: dict[str, float] | None = None) -> str:
        """The text of the line at `done` (timed from the start)."""
        elapsed = time.monotonic() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        count = f"{done}/{self.total}" if self.total > 0 else f"{done}"
        parts = [self.label] if self.label else []
        if self.total > 0:
            filled = int(self.width * min(done, self.total) / self.total)
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}]")
        parts.append(f"{count} {self.unit}" if self.unit else count)
        head = " ".join(parts)
        fields = [head] + [f"{k} {v:.4g}" for k, v in (values or {}).items()]
        fields.append(f"{rate:.2f} {self.unit or 'it'}/s")
        if self.total > 0:
            eta = max(self.total - done, 0) / rate if rate > 0 else math.inf
            fields.append("eta " + _clock(eta))
        return "  ".join(fields)

    def update(self, done: int, values: dict[str, float] | None = None, final: bool = False) -> None:
        if self.log is not None:
            self.log(self.line(done, values))
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        self.stream.write("\r" + self.line(done, values) + ("\n" if final else ""))
        self.stream.flush()


# The loggers whose records a run shows and keeps: the entry points' and every package's (`getLogger(__name__)`).
PROJECT_LOGGERS = ("train", "eval", "datasets", "transforms", "network", "loss", "utils", "scripts")
STAMP = "%Y-%m-%d %H:%M:%S"


class _Console(logging.Handler):
    """Messages on stdout (rank 0 only), warnings and errors on stderr (every rank, prefixed with the rank in a
    distributed run). The streams are looked up per record: a test's captured stdout is the one in force."""

    def __init__(self, main: bool, rank: int | None) -> None:
        super().__init__(logging.INFO if main else logging.WARNING)
        self.prefix = f"[rank {rank}] " if rank is not None else ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                print(f"{self.prefix}{record.levelname}: {record.getMessage()}", file=sys.stderr, flush=True)
            else:
                print(record.getMessage(), flush=True)
        except Exception:  # a closed or broken stream must not stop a run
            self.handleError(record)


class _FileFormat(logging.Formatter):
    """'<time> message', and '<time> LEVEL: message' for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, STAMP)} {level}{record.getMessage()}"


@contextlib.contextmanager
def run_logging(folder: str, main: bool, rank: int | None = None, log_name: str = "train.log") -> Iterator[None]:
    """Configure the project's loggers for this process, once: the console (above), `folder/log_name` on the main
    rank and, with `rank` (a distributed run), `folder/logs/rank<r>.log` on every rank. On exit the files are closed
    and the loggers get their defaults back (entry points run more than once in one process: tests, scripts).
    Data-loader workers inherit the set-up, so their warnings reach the same console and files."""
    handlers: list[logging.Handler] = [_Console(main, rank)]
    if main:
        os.makedirs(folder, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(folder, log_name), encoding="utf-8"))
    if rank is not None:
        os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(folder, "logs", f"rank{rank}.log"), encoding="utf-8"))
    for handler in handlers[1:]:
        handler.setFormatter(_FileFormat())
    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    for logger in loggers:
        for old in list(logger.handlers):  # left by a run of this process that ended in an error
            logger.removeHandler(old)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
        for handler in handlers:
            handler.close()


class MetricsWriter:
    """metrics.jsonl rows and TensorBoard scalars of a run (written on the main rank; elsewhere it does nothing).

    `resume_iteration`: the run continues after that iteration (0: from the start), so rows and TensorBoard events
    an interrupted run logged after it, which this one logs again, are dropped first.
    """

    def __init__(self, folder: str, enabled: bool = True, resume_iteration: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "metrics.jsonl")
        purge_step = None
        if resume_iteration is not None:
            _drop_rows_after(path, resume_iteration)
            purge_step = resume_iteration + 1
        self.rows = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only where a run writes

        self.writer = SummaryWriter(os.path.join(folder, "tb"), purge_step=purge_step)

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.write(json.dumps({"split": split, "iteration": step, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.rows.close()
            self.writer = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    """H:MM:SS (hours unbounded: a long run's ETA may exceed a day); --:--:-- when unknown."""
    if not math.isfinite(seconds):
        return "--:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


def _drop_rows_after(path: str, iteration: int) -> None:
    """Rewrite metrics.jsonl without the rows of iterations after `iteration` (atomically: temp file + rename)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if int(row.get("iteration", 0)) <= iteration:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))
