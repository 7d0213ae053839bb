"""What the command-line entry points share: a user's mistake is one line `error: ...` and exit code 2.

`train.py`, `evaluate.py` and `python -m bertino.mine` parse with `ArgumentParser` (argparse's own errors become a
`UsageError` instead of a usage dump) and run `main` through `run_cli`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import BertinoError


class UsageError(BertinoError):
    """A command-line mistake argparse found; printed like any other user error."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line, exit 2
        raise UsageError(message)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None,
            cleanup: Callable[[], None] = lambda: None) -> int:
    """main(argv) with any BertinoError turned into one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
    except BertinoError as e:
        # one line, whatever the message holds; ONE write with its newline, so that the lines of several ranks
        # sharing a terminal or a log never run into each other (print writes the text and the newline apart)
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        sys.stderr.flush()
        cleanup()
        return 2
    return 0
