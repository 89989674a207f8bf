"""Run-time: process groups from torchrun or SLURM, collectives, mixed precision, preemption."""
