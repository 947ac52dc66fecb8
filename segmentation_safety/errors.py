"""The one base class of errors a user can fix (a wrong path, name, option or file).

Each ``segsafe`` entry point catches :class:`UserError` once and prints its message on
one line with exit status 2. Anything else is a bug in this package and keeps its
traceback, so a broken invariant is never mistaken for a bad argument.
"""

from __future__ import annotations


class UserError(Exception):
    """What the user asked for cannot be done; the message says what to change."""

