"""A quiet console: the scripts' own messages, not library warnings a user cannot act on."""

from __future__ import annotations

import contextlib
import logging
import warnings

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing;
# its built-in CPU kernels are used instead, and nothing is wrong.
SILENCED_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# peft looks for a config.json beside a base model loaded from a GGUF file whenever it saves an
# adapter, warns that it found none, and saves the adapter correctly all the same.
SILENCED_WARNINGS = (r"Could not find a config file in .* will assume that the vocabulary was not modified",)


def setup_logging() -> None:
    """The scripts' log format, for the command line (a caller from Python keeps its own)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def libraries_silenced():
    """While a script's main runs, from the command line or called from Python, the library messages above
    are hidden; the caller's logger levels and warning filters are as they were afterwards. Used as a
    decorator of each main."""
    loggers = [logging.getLogger(name) for name in SILENCED_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for pattern in SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def hide_eval_progress_bar(trainer) -> None:
    """Keep the Trainer's progress bar for training steps but drop its bar for each eval pass (a batch or
    two, whose bar cuts the training bar's line at every epoch) and its printed dict of every step's loss."""
    from transformers.trainer_callback import ProgressCallback

    class TrainingStepsProgress(ProgressCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            pass

        def on_log(self, args, state, control, logs=None, **kwargs):
            # One line per eval pass, not a dict per optimizer step: loss_log.json keeps every step.
            if logs and "eval_loss" in logs:
                super().on_log(args, state, control, logs=logs, **kwargs)

    if trainer.pop_callback(ProgressCallback):  # None where progress bars are off (--disable_tqdm)
        trainer.add_callback(TrainingStepsProgress)
