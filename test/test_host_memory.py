"""Freed host memory is kept for the next frame: buffers stop page-faulting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="retain_freed_memory tunes glibc's allocator only",
)

# A frame's worth of multi-MB buffers, written and freed, ten times over; the number of
# minor page faults after the first frame is printed. Run in a child process: the
# setting is process-wide and cannot be undone.
CHURN = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from segmentation_safety.host_memory import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    def frame():
        sizes = (2 << 20, 3 << 20, 2 << 20, 1 << 19, 3 << 20, 2 << 20)
        buffers = [np.ones(n, np.uint8) for n in sizes]  # alive together, as in a frame
        return sum(int(b[-1]) for b in buffers)
    frame()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        frame()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


# The same in a thread of its own, as the node's compute thread: glibc gives it an arena
# of 64 MiB heaps and unmaps a heap once all of it is free, as at the end of a frame.
CHURN_THREAD = textwrap.dedent(
    """
    import resource, sys, threading
    from segmentation_safety.host_memory import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    faults = []
    def frames():
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            buffers = [bytearray(1 << 20) for _ in range(150)]  # written: zero-filled
            del buffers
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    worker = threading.Thread(target=frames)
    worker.start()
    worker.join()
    print(sum(faults[1:]))
    """
)


def _faults(mode: str, code: str = CHURN) -> int:
    # The checkout first (the child imports this tree), and glibc's own defaults.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-P", "-c", code, mode], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def test_buffers_are_reused_instead_of_faulted_in_every_frame():
    default, retained = _faults("default"), _faults("retain")
    # 10 frames of 12.5 MB are about 32k pages: the default faults most of them in again.
    assert default > 10_000
    assert retained < default / 20


def test_a_threads_heaps_are_kept_when_a_frame_frees_all_of_them():
    default = _faults("default", CHURN_THREAD)
    retained = _faults("retain", CHURN_THREAD)
    # 150 MB a frame: by default each later frame faulted a whole heap in again (6,400
    # pages each of 3 frames here); kept, the pages are reused.
    assert default > 10_000
    assert retained < default / 20


def test_available_memory_is_what_the_kernel_says():
    from segmentation_safety.host_memory import available_bytes

    with open("/proc/meminfo", encoding="ascii") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    available = available_bytes()
    assert available is not None and 0 < available <= total
