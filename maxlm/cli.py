"""Command-line conventions shared by maxlm's tools: a bad flag is one `error:` line and exit
status 2 (argparse would print its usage), and `--checkpoint` means the same everywhere."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(Exception):
    """A bad flag or argument: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError instead of a usage dump and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint=PATH`: whatever `maxlm.checkpoint.open_model` accepts."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="A run directory (its newest checkpoint), <run>/checkpoints/<step>, or a converted "
        "model directory.",
    )
