"""A quiet console: the scripts' own messages, not library warnings a user cannot act on."""

from __future__ import annotations

import logging
import warnings

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing;
# its built-in CPU kernels are used instead, and nothing is wrong.
SILENCED_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# peft looks for a config.json beside a base model loaded from a GGUF file whenever it saves an
# adapter, warns that it found none, and saves the adapter correctly all the same.
SILENCED_WARNINGS = (r"Could not find a config file in .* will assume that the vocabulary was not modified",)


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in SILENCED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def hide_eval_progress_bar(trainer) -> None:
    """Keep the Trainer's progress bar for training steps but drop its bar for each eval pass: that
    pass is a batch or two, and its bar cuts the training bar's line at every epoch."""
    from transformers.trainer_callback import ProgressCallback

    class TrainingStepsProgress(ProgressCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            pass

    if trainer.pop_callback(ProgressCallback):  # None where progress bars are off (--disable_tqdm)
        trainer.add_callback(TrainingStepsProgress)
