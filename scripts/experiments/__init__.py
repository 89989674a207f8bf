"""Experiments of the paper built on the framework: Table 3 and auto-labelling (`python -m scripts.experiments.NAME`).
They import the core; the core never imports them."""
