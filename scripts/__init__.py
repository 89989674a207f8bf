"""Command-line tools, run from the repository root as modules: `python -m scripts.NAME ...` (scripts/README.md)."""
