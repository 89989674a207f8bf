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


class Progress:
    """A one-line progress bar per logging interval: iteration, loss terms, learning rate, speed and ETA."""

    def __init__(self, total: int, start: int, log: Callable[[str], None], width: int = 20) -> None:
        self.total, self.start, self.log, self.width = total, start, log, width
        self.t0 = time.time()

    def update(self, iteration: int, values: dict[str, float]) -> None:
        done = iteration - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("inf")
        filled = int(self.width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        fields = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        self.log(f"[{bar}] {iteration}/{self.total}  {fields}  {rate:.2f} it/s  eta {eta_s}")


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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
