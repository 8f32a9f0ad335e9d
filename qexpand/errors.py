"""User-facing errors: one clear paragraph, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
import textwrap
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix (bad option, missing file, no GPU...); printed without traceback."""


def fail_if_problems(problems: list[str], hint: str = "") -> None:
    """Raise one UserError listing every problem found while validating options."""
    if problems:
        text = "invalid options: " + "; ".join(problems) + "."
        raise UserError(text + (" " + hint if hint else ""))


def _print_paragraph(prefix: str, message: str) -> None:
    # No breaks inside words or at hyphens, so options like --batch-size stay whole for copying.
    text = textwrap.fill(f"{prefix}: {message}", width=100, break_on_hyphens=False, break_long_words=False)
    print(text, file=sys.stderr)


def run_cli(main: Callable[[], int | None], oom_hint: str, interrupt_hint: str = "") -> None:
    """Run a script's main(); turn known failures into a short message and an exit code."""
    try:
        code = main()
    except UserError as error:
        _print_paragraph("error", str(error))
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _print_paragraph("interrupted", interrupt_hint or "stopped by the user.")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
        if type(error).__name__ != "OutOfMemoryError":
            raise
        _print_paragraph("error", f"the GPU ran out of memory ({str(error).splitlines()[0]}). {oom_hint}")
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
