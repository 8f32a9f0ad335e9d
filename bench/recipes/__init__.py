"""The training recipes the GPU benchmark compares, one module each.

original and default run `training.py` itself (its `--recipe original` and default presets);
trl and unsloth are the peer libraries' documented QLoRA recipes on the same model and examples;
tuning holds candidate changes to the default recipe, measured beside a copy of it.
"""
