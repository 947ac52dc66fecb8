"""The few rcl and rcutils structs and calls that the node's publishes and the replay's
takes reach through ctypes (:mod:`serialized_publish`, :mod:`serialized_take`).

``rcutils_uint8_array_t`` (rcl's serialised message) and the allocator inside it have had
the same layout since ROS 2's first releases. rclpy's extension has already loaded both
libraries, so loading them by name finds the same copies whichever way ROS is installed
(wheels, a distro under /opt/ros).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

#: rcl's success code (``RCL_RET_OK``).
RET_OK = 0
#: ``RCUTILS_ERROR_MESSAGE_MAX_LENGTH``: the size of rcutils' error string.
ERROR_LENGTH = 1024


class Allocator(ctypes.Structure):
    """``rcutils_allocator_t``."""

    _fields_ = [
        ("allocate", ctypes.c_void_p),
        ("deallocate", ctypes.c_void_p),
        ("reallocate", ctypes.c_void_p),
        ("zero_allocate", ctypes.c_void_p),
        ("state", ctypes.c_void_p),
    ]


class SerializedMessage(ctypes.Structure):
    """``rcl_serialized_message_t`` (``rcutils_uint8_array_t``)."""

    _fields_ = [
        ("buffer", ctypes.c_void_p),
        ("buffer_length", ctypes.c_size_t),
        ("buffer_capacity", ctypes.c_size_t),
        ("allocator", Allocator),
    ]


class ErrorString(ctypes.Structure):
    _fields_ = [("text", ctypes.c_char * ERROR_LENGTH)]


@functools.cache
def library(name: str, keep_gil: bool) -> Any | None:
    """``lib<name>.so``, its calls keeping the GIL (``ctypes.PyDLL``) or letting it go
    (``ctypes.CDLL``); None where it cannot be loaded."""
    try:
        return (ctypes.PyDLL if keep_gil else ctypes.CDLL)(f"lib{name}.so")
    except OSError:
        return None


def error_calls() -> tuple[Any, Any] | None:
    """rcutils' (get error string, reset error); None where rcutils cannot be loaded."""
    rcutils = library("rcutils", keep_gil=False)
    try:
        error, reset = rcutils.rcutils_get_error_string, rcutils.rcutils_reset_error
    except AttributeError:  # no library (None), or one without the calls
        return None
    error.argtypes = ()
    error.restype = ErrorString
    reset.argtypes = ()
    reset.restype = None
    return error, reset


def last_error() -> str:
    """rcutils' error text, which is then reset (rcl sets it on every failure)."""
    calls = error_calls()
    if calls is None:
        return "(rcutils' error text not reachable)"
    error, reset = calls
    text = error().text.decode(errors="replace")
    reset()
    return text
