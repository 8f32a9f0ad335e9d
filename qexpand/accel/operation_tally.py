"""The Trainer's tally of floating-point operations, with the model's parameters counted once."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def operations_counted_once(trainer):
    """While inside, the Trainer's `floating_point_ops` counts the model's parameters once. The Trainer
    adds operations per token x tokens to a tally for every batch and finds the former by walking every
    module to count parameters (milliseconds of host time, which a step bound by its host waits for);
    the count does not change while training. On leaving, the Trainer's own method is back."""
    from qexpand.accel import checked_versions

    checked_versions.require("trainer_hooks")
    per_token = []  # found at the first batch with input ids
    stock = trainer.floating_point_ops

    def floating_point_ops(inputs):
        main_input = getattr(trainer.model, "main_input_name", "input_ids")
        tokens = inputs[main_input].numel() if main_input in inputs else 0
        if not tokens:
            return stock(inputs)
        if not per_token:
            per_token.append(stock(inputs) // tokens)
        return per_token[0] * tokens

    trainer.__dict__["floating_point_ops"] = floating_point_ops
    try:
        yield
    finally:
        del trainer.__dict__["floating_point_ops"]
