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
