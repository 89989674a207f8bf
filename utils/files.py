"""Atomic file writes: a new temporary file in the target's folder, fsync, then a rename over the target.

A reader sees the old version or the new one, never a torn file, and a failed write leaves the old one. The
temporary name is unique per process and call, so processes that write one file at once (SLURM array tasks)
never rename each other's half-written file; the last rename wins.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import IO, Any


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
