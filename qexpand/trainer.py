"""The Trainer of runs with compiled blocks: it evaluates them eagerly."""

from __future__ import annotations

import torch
from transformers import Trainer


class EagerEvalTrainer(Trainer):
    """The stock Trainer, except that its eval passes run compiled blocks eagerly: the few eval batches
    of an epoch do not repay a second compilation (the one without gradients)."""

    def evaluate(self, *args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return super().evaluate(*args, **kwargs)
