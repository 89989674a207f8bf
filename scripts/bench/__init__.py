"""Benchmarks: each prints a table of measurements taken side by side in one run (`python -m scripts.bench.NAME`)."""
