"""All torch work of a process runs on one long-lived thread."""

from __future__ import annotations

import threading

import pytest

from segmentation_safety import compute_thread
from segmentation_safety.compute_thread import THREAD_NAME, on_compute_thread


def _where() -> threading.Thread:
    return threading.current_thread()


def test_calls_from_any_thread_run_on_the_same_compute_thread():
    seen = [on_compute_thread(_where)]
    other = threading.Thread(target=lambda: seen.append(on_compute_thread(_where)))
    other.start()
    other.join()
    assert seen[0] is seen[1] and seen[0].name.startswith(THREAD_NAME)
    assert seen[0] is not threading.current_thread()
    # From the compute thread itself a call runs in line (no deadlock on one worker).
    nested = on_compute_thread(lambda: on_compute_thread(_where))
    assert nested is seen[0]


def test_results_and_exceptions_come_back_to_the_caller():
    assert on_compute_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad frame"):
        on_compute_thread(lambda: (_ for _ in ()).throw(ValueError("bad frame")))
    assert on_compute_thread(lambda: 7) == 7  # the thread survives a failure


def test_a_job_submitted_while_another_runs_waits_for_it_on_the_same_thread(monkeypatch):
    on_compute_thread(lambda: None)  # the executor exists (and its thread is idle)
    executor = compute_thread._executor
    submitted = threading.Event()  # set once the second job is queued
    started = threading.Event()
    events = []

    def submit(fn, *args, **kwargs):
        future = type(executor).submit(executor, fn, *args, **kwargs)
        if fn is second:
            submitted.set()
        return future

    monkeypatch.setattr(executor, "submit", submit)

    def first():
        started.set()
        assert submitted.wait(timeout=30)  # the second job is queued while this one runs
        events.append(("first", threading.current_thread()))

    def second():
        events.append(("second", threading.current_thread()))

    a = threading.Thread(target=lambda: on_compute_thread(first))
    a.start()
    assert started.wait(timeout=30)
    b = threading.Thread(target=lambda: on_compute_thread(second))
    b.start()
    a.join()
    b.join()
    # One thread, in order: the second job neither overtakes nor runs beside the first.
    assert [name for name, _ in events] == ["first", "second"]
    assert events[0][1] is events[1][1]
