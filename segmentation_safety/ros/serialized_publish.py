"""Publishing an already serialised message without rclpy's extra copy of it.

Why: ``Publisher.publish(bytes)`` hands the bytes to rclpy's C++ layer as a
``std::string``, one more copy of the whole message, made with the GIL held, before rcl
sees it. The node's outputs are serialised once (``cdr``), and at 1024×2048 they are
about 50 MB a frame, so that copy alone is several ms of the node's own time. Here the
same ``rcl_publish_serialized_message`` that rclpy ends in is called through ctypes on
the message's own buffer.

The call keeps the GIL, as rclpy's own publish does. Letting it go while the middleware
delivered let an in-process subscriber take it for each message, and the node then
waited to get it back after every one of its ~8 publishes: at 1024×2048, 13-18 ms of
publishing for 10.6 ms of CPU. Kept, the node publishes in one go (9-11 ms there) and
subscribers take their messages after it.

The two rcl structs involved (``rcutils_uint8_array_t`` and the allocator inside it)
have had the same layout since ROS 2's first releases; the tests publish through this
path and compare every byte received. Where librcl cannot be loaded or the rclpy in use
does not expose its handle's address, :func:`publish` is ``Publisher.publish``.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from segmentation_safety.ros import cdr

#: rcl's success code (``RCL_RET_OK``).
_RET_OK = 0
#: ``RCUTILS_ERROR_MESSAGE_MAX_LENGTH``: the size of rcutils' error string.
_ERROR_LENGTH = 1024


class _Allocator(ctypes.Structure):
    """``rcutils_allocator_t``: unused when publishing, present for the layout."""

    _fields_ = [
        ("allocate", ctypes.c_void_p),
        ("deallocate", ctypes.c_void_p),
        ("reallocate", ctypes.c_void_p),
        ("zero_allocate", ctypes.c_void_p),
        ("state", ctypes.c_void_p),
    ]


class _SerializedMessage(ctypes.Structure):
    """``rcl_serialized_message_t`` (``rcutils_uint8_array_t``) over a borrowed buffer."""

    _fields_ = [
        ("buffer", ctypes.c_void_p),
        ("buffer_length", ctypes.c_size_t),
        ("buffer_capacity", ctypes.c_size_t),
        ("allocator", _Allocator),
    ]


class _ErrorString(ctypes.Structure):
    _fields_ = [("text", ctypes.c_char * _ERROR_LENGTH)]


class PublishError(RuntimeError):
    """rcl refused to publish a serialised message (the text is rcl's own)."""


@functools.cache
def _rcl() -> tuple[Any, Any, Any] | None:
    """rcl's publish call and rcutils' error calls; None where they cannot be loaded.

    rclpy's extension has already loaded both libraries, so loading them by name finds
    the same copies whichever way ROS is installed (wheels, a distro under /opt/ros)."""
    try:
        rcl = ctypes.PyDLL("librcl.so")  # the GIL kept: see the module's docstring
        rcutils = ctypes.CDLL("librcutils.so")
        send = rcl.rcl_publish_serialized_message
        error = rcutils.rcutils_get_error_string
        reset = rcutils.rcutils_reset_error
    except (OSError, AttributeError):
        return None
    send.argtypes = (ctypes.c_void_p, ctypes.POINTER(_SerializedMessage), ctypes.c_void_p)
    send.restype = ctypes.c_int32
    error.argtypes = ()
    error.restype = _ErrorString
    reset.argtypes = ()
    reset.restype = None
    return send, error, reset


def direct(publisher: Any) -> bool:
    """Whether :func:`publish` skips rclpy's copy for this publisher."""
    return _rcl() is not None and hasattr(publisher.handle, "pointer")


def publish(publisher: Any, data: bytes | bytearray | np.ndarray) -> None:
    """Publish ``data``, a whole serialised message (encapsulation header first), on
    ``publisher`` (an rclpy Publisher of the message's type), as ``publisher.publish``
    would, without copying it first. A numpy buffer must be flat uint8, in one piece."""
    if isinstance(data, bytearray):
        data = np.frombuffer(data, np.uint8)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.c_contiguous:
            raise TypeError(f"a serialised message array is flat uint8, got {data.dtype}")
    elif not isinstance(data, bytes):
        raise TypeError(f"a serialised message is bytes, got {type(data).__name__}")
    _send(publisher, data, 0, len(data))


def publish_embedded(publisher: Any, data: bytearray | np.ndarray, span: tuple[int, int]) -> None:
    """Publish, as a message of its own, the Image whose payload is ``data[start:end]``
    inside a bigger serialised message (a ``cdr.Embedding``), without copying it out.

    A standalone message is the payload after a 4-byte encapsulation header, so those 4
    bytes in front of the payload hold the header for the call, and get their own bytes
    back after it: the middleware has copied the message by then (rcl's publish returns
    once the writer holds its own copy)."""
    start, end = span
    if not isinstance(data, bytearray | np.ndarray):
        raise TypeError(f"an embedding is a bytearray, got {type(data).__name__}")
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytearray) else data
    if start < len(cdr.ENCAPSULATION) or start % 4 or not start <= end <= len(data):
        raise ValueError(f"span {span} is not a 4-aligned payload within {len(data)} bytes")
    head = slice(start - len(cdr.ENCAPSULATION), start)
    saved = data[head].copy()
    data[head] = np.frombuffer(cdr.ENCAPSULATION, np.uint8)
    try:
        _send(publisher, data, head.start, end)
    finally:
        data[head] = saved


def _send(publisher: Any, data: bytes | np.ndarray, start: int, end: int) -> None:
    """Publish ``data[start:end]``, a whole serialised message."""
    if not direct(publisher):
        whole = start == 0 and end == len(data) and isinstance(data, bytes)
        publisher.publish(data if whole else bytes(memoryview(data)[start:end]))
        return
    send, error, reset = _rcl()
    if isinstance(data, bytes):
        address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    else:  # an array (a bytearray's is a view: exported, it cannot be resized meanwhile)
        address = data.ctypes.data
    message = _SerializedMessage(address + start, end - start, end - start)
    # Held as rclpy holds it: the rcl publisher cannot be destroyed while in use, and a
    # destroyed one raises rclpy's InvalidHandle here instead of being dereferenced.
    handle = publisher.handle
    with handle:
        ret = send(handle.pointer, ctypes.byref(message), None)
        if ret != _RET_OK:
            text = error().text.decode(errors="replace")
            reset()
            raise PublishError(f"publishing on {publisher.topic_name} failed (rcl {ret}): {text}")
