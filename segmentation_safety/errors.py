"""The one base class of errors a user can fix (a wrong path, name, option or file).

Every ``segsafe`` command reports a :class:`UserError` the same way: its message on one
line, exit status 2 (:func:`report_user_errors`). Anything else is a bug in this package
and keeps its traceback, so a broken invariant is never mistaken for a bad argument.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

Run = Callable[[argparse.Namespace], int]


class UserError(Exception):
    """What the user asked for cannot be done; the message says what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a dataset layout needs) is not there."""


class InvalidArgumentError(UserError, ValueError):
    """A command-line value outside what the command accepts; the message names the flag."""


class UnwritableOutputError(UserError, OSError):
    """An output that cannot be written where the user asked (a directory in the way, a
    parent that is a file, no permission); the message names the path."""


def check_writable(path: str | os.PathLike[str], what: str = "--out", folder: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a directory
    where a file goes, a file among its parents, or a parent without write permission.
    ``folder``: the output is a directory (created there)."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise UnwritableOutputError(f"{what} {path} is a directory; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UnwritableOutputError(f"{what} {path} is a file; give a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UnwritableOutputError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"{what} {path}: {parent} is not writable")


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
