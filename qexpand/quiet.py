"""A quiet console: the scripts' own messages, not library warnings a user cannot act on."""

from __future__ import annotations

import logging

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing;
# its built-in CPU kernels are used instead, and nothing is wrong.
SILENCED_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in SILENCED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
