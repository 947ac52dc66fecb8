"""Keeping freed host memory for reuse, so a frame's buffers do not page-fault; and how
much memory the host has available.

Every frame the node allocates the same multi-megabyte buffers: the network's
activations, the maps, the labels, the serialised Images. glibc's allocator serves a
block over its mmap threshold (128 KiB at start; it rises only to the largest block
freed so far) with a fresh mapping and unmaps it when freed, so every such buffer is
page-faulted in again, one 4 KiB page at a time, on its first write. Measured on the
project's 2-core CPU: serialising the six 512×1024 Image payloads of a frame took 3.3
ms with the default settings and 0.6 ms with these (docs/performance.md has the node's
numbers). The price is a resident size that stays at the per-frame peak instead of
falling between frames, which is what a node that processes a stream wants anyway.

A thread other than the main one allocates from an arena of its own, made of 64 MiB
heaps, and glibc unmaps such a heap as soon as every block in it is free, whatever the
trim threshold says: at the end of each frame, when its tensors were freed together.
Measured in the node at 512×1024: freeing a frame's tensors then took 1.5-7.8 ms on up
to half of the frames (the node's `other` stage), and the next frame faulted the heap
in again; a top pad of a whole heap keeps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Largest block served from the heaps: glibc's ceiling for the threshold on 64-bit.
MAX_HEAP_BLOCK = 32 << 20
#: Free memory an arena keeps before giving some back to the kernel.
TRIM_THRESHOLD = 512 << 20
#: Free room kept at the top of a heap: a thread arena's whole heap (glibc's
#: HEAP_MAX_SIZE on 64-bit), so that a heap whose blocks are all free is not unmapped.
TOP_PAD = 64 << 20


def available_bytes() -> int | None:
    """Memory the kernel says can be had without swapping (MemAvailable), or None where
    it does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def retain_freed_memory() -> bool:
    """Have glibc serve blocks up to MAX_HEAP_BLOCK from its heaps and keep what is
    freed for the next frame, in every thread's arena. Process-wide; True where
    applied, False on another C library (musl, macOS), where nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success; setting the threshold also stops it moving.
    settings = (
        (_M_MMAP_THRESHOLD, MAX_HEAP_BLOCK),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    applied = [mallopt(name, value) == 1 for name, value in settings]  # each one, always
    return all(applied)
