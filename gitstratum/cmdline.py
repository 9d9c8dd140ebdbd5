"""Running a ``twisted.python.usage`` parser for a command of the project, with one error style.

Every command line of the project (the twistd plugins, ``gitstratum``, the
Raft simulator, the Raft process) is a ``usage.Options``. ``parse`` runs one
and turns its two ways of stopping into exit statuses: ``--help`` and
``--version`` print to stdout and give 0; a usage error prints the synopsis
of the (sub)command it is about and ``PROG: error: ...`` to stderr and
gives 2. ``InterspersedOptions`` reads options after the positional
arguments too, as people type them (``tool OUT --files 9``).
"""

from __future__ import annotations

import contextlib
import getopt
import sys
from collections.abc import Sequence
from typing import IO

from twisted.python import usage

__all__ = ["InterspersedOptions", "deepest", "parse", "report_usage_error"]


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


class InterspersedOptions(usage.Options):
    """``usage.Options`` that also reads options given after the positional arguments.

    Twisted parses with ``getopt.getopt``, which stops at the first argument
    that is not an option; ``tool OUT --files 9`` is how people type.  This
    sorts the options first (GNU getopt's rule), then parses as usual.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        flat: list[str] = []
        for opt, value in opts:
            takes = (
                f"{opt[2:]}=" in self.longOpt
                if opt.startswith("--")
                else f"{opt[1]}:" in self.shortOpt
            )
            flat += [opt, value] if takes else [opt]
        super().parseOptions([*flat, "--", *args])
