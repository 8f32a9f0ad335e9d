"""This project's default recipe: `python training.py` with no recipe flags (plus a variant's flags)."""

from __future__ import annotations

from bench.recipes import project

# Variants reachable from the command line; tuning.py holds those that need a change to training.py.
VARIANTS = {
    "default": [],
    "default-fast": ["--gradient-checkpointing", "off"],
    "default-b64": ["--batch-size", "64"],
    "default-nodrop": ["--lora-dropout", "0"],
    "default-compile": ["--compile", "on"],
    # peft's LoRA layers (the default before the fused ones)
    "default-peft": ["--lora-kernels", "peft"],
}
# A second measurement in the same call, for an A-B-B-A order (gpu_bench.py --in-order) against the host's drift.
VARIANTS.update({f"{name}-again": VARIANTS[name] for name in ("default", "default-peft")})


def run(opts, paths, device, left_s, variant: str = "default") -> dict:
    # N and 3N distinct topics (93 and 279 of the 300): repeated examples would let length-grouped
    # batches pair each example with its own copies, with no padding, which real epochs do not get.
    # Three epochs, as training.py runs by default: one epoch of 186 more examples is only 6 more
    # steps, too few beside the run-to-run spread of the fixed costs.
    return project.throughput(opts, paths, variant, VARIANTS[variant], opts.train_examples // 3, left_s, epochs=3)
