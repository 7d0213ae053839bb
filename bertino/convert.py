"""`python -m bertino.convert FOLDER`: write FOLDER/model.safetensors from its pickled pytorch_model.bin, safely.

The conversion itself is bertino/plumbing/pickled_weights.py (it never runs pickled code). A mistake is one
`error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .plumbing.cli import ArgumentParser, run_cli
from .plumbing.pickled_weights import convert


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m bertino.convert", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a model folder holding pytorch_model.bin")
    print(f"wrote {convert(p.parse_args(argv).folder)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
