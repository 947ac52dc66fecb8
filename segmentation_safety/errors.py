"""The one base class of errors a user can fix (a wrong path, name, option or file).

Every ``segsafe`` command reports a :class:`UserError` the same way: its message on one
line, exit status 2 (:func:`report_user_errors`). Anything else is a bug in this package
and keeps its traceback, so a broken invariant is never mistaken for a bad argument.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

Run = Callable[[argparse.Namespace], int]


class UserError(Exception):
    """What the user asked for cannot be done; the message says what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a dataset layout needs) is not there."""


class InvalidArgumentError(UserError, ValueError):
    """A command-line value outside what the command accepts; the message names the flag."""


def report(command: str, error: UserError) -> int:
    """Print ``error`` as ``segsafe COMMAND: error: ...`` on stderr; the exit status (2)."""
    print(f"segsafe {command}: error: {error}", file=sys.stderr)
    return 2


def report_user_errors(command: str) -> Callable[[Run], Run]:
    """Decorate a subcommand's ``run`` so a :class:`UserError` ends it via :func:`report`.

    The handler sits on ``run`` itself, not only in ``segsafe``'s ``main``, because
    ``run`` is also an entry point: torchrun starts ``training.cli`` and tests build a
    subcommand's parser on its own.
    """

    def decorate(run: Run) -> Run:
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except UserError as e:
                return report(command, e)

        return guarded

    return decorate
