"""Waiting in tests: on a condition, with a deadline, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 0.01  # how often a condition is looked at again


def wait_for(
    condition: Callable[[], object],
    what: str,
    timeout: float = 20.0,
    detail: Callable[[], str] | None = None,
) -> None:
    """Return once ``condition()`` is true; AssertionError naming ``what`` (and
    ``detail()``, e.g. a log, read only then) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            extra = f":\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(POLL_S)
