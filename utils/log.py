"""Run logging: console and train.log text, metrics.jsonl rows, TensorBoard scalars, the progress line, and the
routing of every module's stdlib logger into them (one logger per process)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from utils.files import atomic_write_text


class Progress:
    """One progress line: a bar, done/total, optional values, rate and ETA (the training log, video frames,
    the centroid build).

    With `log` (e.g. RunLogger.info) every update is a line of its own: training writes one per logging interval,
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


class RunLogger:
    """Console + `train.log` text, `metrics.jsonl` rows and TensorBoard scalars (rank 0), appended on resume.

    With `rank` given (a distributed run), every rank also writes its own `logs/rank<r>.log` (its messages,
    warnings and errors); warnings and errors go to stderr on every rank, prefixed with the rank.
    `resume_iteration`: the run continues after that iteration, so rows and TensorBoard events logged after it
    by an interrupted run (which the resumed one logs again) are dropped.
    """

    def __init__(self, run_dir: str, enabled: bool = True, purge_step: int | None = None,
                 rank: int | None = None, resume_iteration: int | None = None) -> None:
        self.bridge: _LogBridge | None = None
        self.enabled = enabled
        self.run_dir = run_dir
        self.rank = rank
        self.writer = None
        self.rank_file = None
        if rank is not None:
            os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
            self.rank_file = open(os.path.join(run_dir, "logs", f"rank{rank}.log"), "a", buffering=1)
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if resume_iteration is not None:
            _drop_rows_after(metrics_path, resume_iteration)
            purge_step = resume_iteration + 1
        self.text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self.metrics = open(metrics_path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def capture_modules(self) -> None:
        """Route the project's module loggers (`logging.getLogger(__name__)` in datasets/, utils/, ...) here, so
        that their messages reach train.log and stderr like this logger's own (and data-loader workers', which
        inherit the routing)."""
        self.bridge = _LogBridge(self)
        for name in PROJECT_LOGGERS:
            logger = logging.getLogger(name)
            for old in [h for h in logger.handlers if isinstance(h, _LogBridge)]:  # a run that ended in an error
                logger.removeHandler(old)
            logger.setLevel(logging.INFO)
            logger.addHandler(self.bridge)
            logger.propagate = False

    def _stamp(self, message: str) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n"

    def info(self, message: str) -> None:
        if self.rank_file is not None:
            self.rank_file.write(self._stamp(message))
        if not self.enabled:
            return
        print(message, flush=True)
        self.text.write(self._stamp(message))

    def warn(self, message: str, level: str = "WARNING") -> None:
        """Shown on every rank (stderr), also in this rank's log file and, on rank 0, in train.log."""
        prefix = f"[rank {self.rank}] " if self.rank is not None else ""
        print(f"{prefix}{level}: {message}", file=sys.stderr, flush=True)
        if self.rank_file is not None:
            self.rank_file.write(self._stamp(f"{level}: {message}"))
        if self.enabled:
            self.text.write(self._stamp(f"{level}: {message}"))

    def error(self, message: str) -> None:
        self.warn(message, level="ERROR")

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"split": split, "iteration": step, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.bridge is not None:
            for name in PROJECT_LOGGERS:
                logging.getLogger(name).removeHandler(self.bridge)
                logging.getLogger(name).propagate = True
            self.bridge = None
        if self.rank_file is not None:
            self.rank_file.close()
            self.rank_file = None
        if self.enabled and self.writer is not None:
            self.writer.close()
            self.text.close()
            self.metrics.close()
            self.writer = None


PROJECT_LOGGERS = ("datasets", "transforms", "network", "loss", "utils")


class _LogBridge(logging.Handler):
    """stdlib logging records -> RunLogger (warnings and errors to stderr and the log files, the rest as info)."""

    def __init__(self, target: RunLogger) -> None:
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                self.target.error(message)
            elif record.levelno >= logging.WARNING:
                self.target.warn(message)
            else:
                self.target.info(message)
        except Exception:  # a logging failure must not stop training
            self.handleError(record)


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
