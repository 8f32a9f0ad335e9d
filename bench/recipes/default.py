"""This project's default recipe: `python training.py` with no recipe flags (plus a variant's flags)."""

from __future__ import annotations

from bench.recipes import project

# Variants reachable from the command line; tuning.py holds those that need a change to training.py.
VARIANTS = {
    "default": [],
    "default-fast": ["--gradient-checkpointing", "off"],
    "default-b64": ["--batch-size", "64"],
    "default-nodrop": ["--lora-dropout", "0"],
}


def run(opts, paths, device, left_s, variant: str = "default") -> dict:
    return project.throughput(opts, paths, variant, VARIANTS[variant], opts.train_examples, left_s)
