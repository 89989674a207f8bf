"""Run-time: process groups from torchrun or SLURM, collectives, SyncBN conversion, mixed precision, preemption."""
