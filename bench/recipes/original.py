"""The original work's recipe, as `training.py --recipe original` presets it: learning rate 2.5e-5,
at most 100 steps, batch 2 x accumulation 4, paged 8-bit AdamW, LoRA incl. lm_head, padding to 512."""

from __future__ import annotations

from bench.recipes import project

# The preset caps training at 100 optimizer steps; the cap is lifted so that the number of examples
# sets the number of steps (the timed runs stay far below 100 steps anyway).
FLAGS = ["--recipe", "original", "--max-steps", "0"]


def run(opts, paths, device, left_s) -> dict:
    # Paged 8-bit AdamW needs CUDA; the CPU check of the code path trains with plain AdamW.
    flags = FLAGS if device == "cuda" else [*FLAGS, "--optimizer", "adamw"]
    # Every batch has the same shape (padded to 512), so few examples give a steady rate.
    return project.throughput(opts, paths, "original", flags, opts.original_examples, left_s)
