"""The original work's recipe, as `training.py --recipe original` presets it: learning rate 2.5e-5,
at most 100 steps, batch 2 x accumulation 4, paged 8-bit AdamW, LoRA incl. lm_head, padding to 512."""

from __future__ import annotations

from bench.recipes import project

FLAGS = ["--recipe", "original"]


def run(opts, paths, device, left_s) -> dict:
    # Every batch has the same shape (padded to 512), so few examples give a steady rate.
    return project.throughput(opts, paths, "original", FLAGS, opts.original_examples, left_s)
