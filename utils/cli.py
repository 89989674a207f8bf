"""Command-line plumbing shared by train.py and eval.py: one-line errors and writable output folders.

An expected failure (bad config, unreadable data or checkpoint, unknown model, a file-system problem) ends the
program with one line `error: <what>: <what to do>` and exit code 2, without a traceback. `--debug` or the
environment variable HMSA_DEBUG=1 lets the original exception through, traceback included.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .config import Config, ConfigError, load_config
from .runtime.dist import DistConfigError, DistInfo, DistributedError, init_distributed

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class CliError(SystemExit):
    """Exit with code 2 and a one-line message; `str()` is the message, so in-process callers can read it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


def debug_enabled() -> bool:
    """HMSA_DEBUG set (to anything but 0): show tracebacks, as the --debug option does."""
    return os.environ.get("HMSA_DEBUG", "") not in ("", "0")


def describe_os_error(e: OSError) -> str:
    """'no space left on device: PATH' and friends: what failed and where, in the words a user searches for."""
    where = e.filename or ""
    if not where:  # our own errors (e.g. a missing dataset folder) carry their explanation in the message
        return str(e)
    if e.errno == errno.ENOSPC:
        return f"no space left on device: {where} (free space there or point the output elsewhere)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {e.strerror} (choose a writable folder)"
    if e.errno == errno.ENOENT:
        return f"not found: {where}"
    return f"{e.strerror or e}: {where}"


@contextmanager
def one_line_errors(debug: bool, expected: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn the `expected` exception types (and OSError) into CliError, unless `debug`."""
    try:
        yield
    except CliError:
        raise
    except OSError as e:
        if debug:
            raise
        raise CliError(describe_os_error(e)) from e
    except expected as e:
        if debug:
            raise
        raise CliError(_join_lines(e)) from e


def _join_lines(e: BaseException) -> str:
    """A multi-line message (e.g. a load report listing keys) on one line, its lines joined by '; '."""
    lines = [line.rstrip() for line in str(e).strip().splitlines()] or [type(e).__name__]
    return "; ".join([lines[0]] + [line.strip() for line in lines[1:] if line.strip()])


def run_cli(main: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Call `main(argv)`; a CliError prints `error: MESSAGE` on stderr and exits with code 2, a KeyboardInterrupt
    (Ctrl-C while not training, or twice while training) one line and code 130."""
    try:
        main(argv)
    except CliError as e:
        print(f"error: {e.message}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("interrupted: stopped without a checkpoint (a run resumes from its last one)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def ensure_writable_dir(path: str, key: str) -> str:
    """Create `path` (and parents) and prove it takes a file; a CliError names `key` and the folder otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        reason = describe_os_error(e) if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CliError(f"{key}: cannot create or write the folder {path}: {reason} (choose a writable folder)") from e
    return path


def load_and_start(args: Any) -> tuple[Config, DistInfo]:
    """The config of a command line (`args.config`, `args.overrides`) and this process's place in the run
    (process group from torchrun/SLURM variables, `args.local_rank`), each failure one line."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise CliError(f"config error: {e}") from e
    try:
        dist = init_distributed(timeout=cfg.run.dist_timeout, local_rank=args.local_rank)
    except (DistConfigError, DistributedError) as e:
        raise CliError(f"distributed set-up failed: {e}") from e
    return cfg, dist
