"""What the command modules share to build their parsers."""

from __future__ import annotations

import argparse
from typing import NoReturn, TypeAlias

from glisk.errors import EXIT_CONFIG


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the option and its rule) instead of the usage
    text first; ``--help`` still shows it. Exit code 2, as for any configuration error. Every
    subcommand's parser is one too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# What ``add_subparsers`` returns: each command module adds its parsers to it.
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def add_documented(commands: Subcommands, name: str, *, help: str, doc: str | None) -> Parser:
    """The subcommand ``name``, whose ``--help`` shows ``doc`` (its module's docstring) as
    written, from the second paragraph on."""
    return commands.add_parser(
        name,
        help=help,
        description=doc.split("\n\n", 1)[1] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 1-65535 (as PORT and WORKER_METRICS_PORT)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535 (got {value!r})")
    return number
