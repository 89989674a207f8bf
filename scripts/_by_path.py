"""Lets a script that users start by path (``python scripts/x.py``) run as the module ``python -m scripts.x``.

Started by path, Python puts ``scripts/`` rather than the repository root on the import path, so the project's
packages are not importable. Instead of editing ``sys.path``, the script replaces its process with the module form,
with the repository root on ``PYTHONPATH``; the working directory (and so every relative path argument) is kept.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rerun_as_module(module: str) -> None:
    """Replace this process with ``python -m module`` and the same arguments; does not return."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
