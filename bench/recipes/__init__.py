"""The training recipes the GPU benchmark compares: project.py runs this project's own (default and
original) through `training.py` itself; trl.py and unsloth.py are the peer libraries' documented QLoRA
recipes on the same model and examples.
"""
