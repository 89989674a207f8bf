"""Configuration, distributed helpers, checkpoints, metrics, training/evaluation engine, visualisation."""
