"""Running a ``twisted.python.usage`` parser for a command of the project, with one error style.

Every command line of the project (the twistd plugins, ``gitstratum``, the
Raft simulator, the Raft process) is a ``usage.Options``. ``parse`` runs one
and turns its two ways of stopping into exit statuses: ``--help`` and
``--version`` print to stdout and give 0; a usage error prints the synopsis
of the (sub)command it is about and ``PROG: error: ...`` to stderr and
gives 2.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import IO

from twisted.python import usage

__all__ = ["parse", "report_usage_error", "deepest"]


def deepest(options: usage.Options) -> usage.Options:
    """The innermost (sub)command parsed so far: the one a usage error is about."""
    while getattr(options, "subOptions", None) is not None:
        options = options.subOptions
    return options


def report_usage_error(
    options: usage.Options, prog: str, error: object, stderr: IO[str] | None = None
) -> None:
    """Write the synopsis of the command *error* is about, then ``PROG: error: ERROR``."""
    (stderr or sys.stderr).write(f"{deepest(options).getSynopsis()}\n{prog}: error: {error}\n")


def parse(
    options: usage.Options,
    argv: Sequence[str] | None,
    prog: str,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int | None:
    """Parse *argv* (default ``sys.argv[1:]``) into *options*.

    None when the command should run; otherwise the exit status to return:
    0 after ``--help`` or ``--version``, 2 after a usage error.
    """
    # usage.Options prints --help and --version to sys.stdout, then exits.
    with contextlib.redirect_stdout(stdout or sys.stdout):
        try:
            options.parseOptions(sys.argv[1:] if argv is None else list(argv))
        except usage.UsageError as e:
            report_usage_error(options, prog, e, stderr)
            return 2
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 0
    return None
