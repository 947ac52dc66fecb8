"""One long-lived thread for the process's torch work on the CPU.

PyTorch's CPU ops run on OpenMP (libgomp), which gives every thread that starts parallel
work a pool of helper threads of its own. Once a process holds more of those threads than
it has CPUs, libgomp stops letting idle helpers spin between parallel regions, so every
op then waits for its helpers to be woken. A node that loads its models on the thread
that built it and processes frames on a worker thread is in exactly that state. Measured
on this project's 2-core CPU: a multiply over 512×1024 floats took 0.03 ms on one
thread and 0.08-0.10 ms on a second one once the first had used torch; the node's
post-processing (about 150 ops) lost several ms per frame that way.

So the detector node loads its pipeline and processes every frame here, and so does every
node in the same process (several nodes built in one process take turns on this
thread; a frame's wait for it counts in its ``queue`` stage).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

THREAD_NAME = "segsafe-compute"

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def on_compute_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on the compute thread; its result, or its exception
    raised here. Called from the compute thread itself, it just runs ``fn``."""
    if threading.current_thread().name.startswith(THREAD_NAME):
        return fn(*args, **kwargs)
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        executor = _executor
    return executor.submit(fn, *args, **kwargs).result()
