"""Errors that bertino raises on bad input.

Every message says what was expected, what was found, and where (file, line, key).
The command-line entry points (`train.py`, `evaluate.py`, `python -m bertino.mine`) catch `BertinoError`,
print its message on one line and exit with code 2: no traceback for a user's mistake.
"""


class BertinoError(Exception):
    """Base class: a user-facing error whose message is complete on its own."""


class ConfigError(BertinoError):
    """A config file or override is invalid (unknown key, wrong type, inconsistent values)."""


class DataError(BertinoError):
    """A data file or row is invalid (missing file, malformed line, missing column, bad score)."""


class CheckpointError(BertinoError):
    """A model folder cannot be loaded (unknown layout, missing/unexpected key, shape mismatch)."""
