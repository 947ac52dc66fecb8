"""Taking a serialised message out of the middleware in one copy, the GIL let go.

Why: rclpy's raw take copies a message twice, into rcl's buffer and then into Python
bytes, with the GIL held. The replay's collector stands in for a node's subscribers
(RViz, a recorder, a planner), which are other processes: they copy a message once, and
never hold the node's GIL. In the node's process, though, the collector's takes of every
output (``safety`` alone is 4.5 MB at 512×1024 and 18 MB at 1024×2048) held the GIL the
node needed and delayed each answer by a copy that no such subscriber makes.

Here ``rcl_take_serialized_message``, which rclpy's take calls too, is called through
ctypes into a buffer that each subscription keeps (the middleware grows it to the
largest message). The GIL is let go during the call, so the copy runs beside the node.
The callback gets a memoryview of the buffer, released when it returns: a callback
that keeps the message copies it.

:class:`OneCopyExecutor` is rclpy's single-threaded executor with this take for the
subscriptions given to it. It replaces the executor's ``_take_subscription``, whose
contract (it returns the callback's coroutine) is that of the Kilted rclpy in use here;
where rclpy takes subscriptions another way, or rcl cannot be loaded, every subscription
is taken by rclpy as before (:func:`supported`, recorded in T.json and N.json).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from rclpy.exceptions import InvalidHandle
from rclpy.executors import Executor, SingleThreadedExecutor, await_or_execute

from segmentation_safety.ros.rcl_ctypes import (
    RET_OK,
    Allocator,
    SerializedMessage,
    last_error,
    library,
)

#: ``RCL_RET_SUBSCRIPTION_TAKE_FAILED``: nothing to take (another take got it first).
_TAKE_FAILED = 401


class TakeError(RuntimeError):
    """rcl failed to take a message (the text is rcl's own)."""


class _MessageInfo(ctypes.Structure):
    """The leading fields of ``rmw_message_info_t`` (the same since Galactic), with room
    for the rest (the publisher's GID and the intra-process flag), which is not read."""

    _fields_ = [
        ("source_timestamp", ctypes.c_int64),
        ("received_timestamp", ctypes.c_int64),
        ("publication_sequence_number", ctypes.c_uint64),
        ("reception_sequence_number", ctypes.c_uint64),
        ("rest", ctypes.c_uint8 * 224),
    ]


@functools.cache
def _calls() -> tuple[Any, Any, Any, Any] | None:
    """rcl's take (the GIL let go) and rcutils' allocator and array calls; None where
    they cannot be loaded."""
    rcl, rcutils = library("rcl", keep_gil=False), library("rcutils", keep_gil=False)
    try:
        take = rcl.rcl_take_serialized_message
        allocator = rcutils.rcutils_get_default_allocator
        init, fini = rcutils.rcutils_uint8_array_init, rcutils.rcutils_uint8_array_fini
    except AttributeError:  # no library (None), or one without the calls
        return None
    take.argtypes = (
        ctypes.c_void_p,
        ctypes.POINTER(SerializedMessage),
        ctypes.POINTER(_MessageInfo),
        ctypes.c_void_p,
    )
    take.restype = ctypes.c_int32
    allocator.argtypes = ()
    allocator.restype = Allocator
    init.argtypes = (ctypes.POINTER(SerializedMessage), ctypes.c_size_t, ctypes.POINTER(Allocator))
    init.restype = ctypes.c_int32
    fini.argtypes = (ctypes.POINTER(SerializedMessage),)
    fini.restype = ctypes.c_int32
    return take, allocator, init, fini


def supported() -> bool:
    """Whether :class:`OneCopyExecutor` takes the subscriptions given to it itself: rcl's
    take is reachable and this rclpy's executor takes a subscription as Kilted's does."""
    takes = getattr(Executor, "_take_subscription", None)
    older = hasattr(Executor, "_execute_subscription")  # Jazzy and before: another contract
    return _calls() is not None and takes is not None and not older


def label() -> str:
    """How the replay's collector takes messages, for T.json and N.json."""
    return "one copy, GIL released" if supported() else "rclpy (two copies, GIL held)"


class Taker:
    """One subscription's buffer, which each take overwrites."""

    def __init__(self) -> None:
        calls = _calls()
        if calls is None:
            raise TakeError("rcl's take cannot be loaded through ctypes")
        self._take, allocator, init, self._fini = calls
        self._message = SerializedMessage()
        self._info = _MessageInfo()
        if init(ctypes.byref(self._message), 0, ctypes.byref(allocator())) != RET_OK:
            raise TakeError(f"a serialised message buffer cannot be set up: {last_error()}")
        self._live = True

    def take(self, subscription: Any) -> tuple[memoryview, dict[str, int]] | None:
        """The next message of an rclpy ``subscription`` (raw) and its info (rclpy's
        MessageInfo keys), or None if there is none. The view is valid until the next
        take; the caller holds ``subscription.handle`` meanwhile, as rclpy does."""
        ctypes.memset(ctypes.byref(self._info), 0, ctypes.sizeof(self._info))
        ret = self._take(
            subscription.handle.pointer, ctypes.byref(self._message), ctypes.byref(self._info), None
        )
        if ret == _TAKE_FAILED:
            return None
        if ret != RET_OK:
            text = last_error()
            raise TakeError(f"taking from {subscription.topic_name} failed (rcl {ret}): {text}")
        m, i = self._message, self._info
        data = (ctypes.c_uint8 * m.buffer_length).from_address(m.buffer)
        info = {k: getattr(i, k) for k, _ in _MessageInfo._fields_[:4]}
        return memoryview(data).cast("B"), info

    def __del__(self) -> None:
        # Only once no take can run: the executor holding this taker is gone.
        if getattr(self, "_live", False):
            self._live = False
            self._fini(ctypes.byref(self._message))


class OneCopyExecutor(SingleThreadedExecutor):
    """rclpy's single-threaded executor; the raw subscriptions given to :meth:`take_once`
    are taken in one copy with the GIL let go (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._takers: dict[int, tuple[Any, Taker, bool]] = {}

    def take_once(self, subscription: Any, with_info: bool) -> bool:
        """Take ``subscription`` (created with ``raw=True``) in one copy; ``with_info``:
        its callback takes the message info too. False where this executor cannot (see
        :func:`supported`): rclpy takes it."""
        if not (supported() and subscription.raw and hasattr(subscription.handle, "pointer")):
            return False
        self._takers[id(subscription)] = (subscription, Taker(), with_info)
        return True

    def _take_subscription(self, sub: Any) -> Callable[[], Coroutine[None, None, None]] | None:
        entry = self._takers.get(id(sub))
        if entry is None or entry[0] is not sub:
            return super()._take_subscription(sub)
        _, taker, with_info = entry
        try:
            with sub.handle:
                taken = taker.take(sub)
        except InvalidHandle:  # destroyed meanwhile: nothing to run, as rclpy does
            return None
        if taken is None:
            return None
        view, info = taken
        args = (view, info) if with_info else (view,)

        async def execute() -> None:
            try:
                await await_or_execute(sub.callback, *args)
            finally:
                view.release()  # a view kept past the callback would read a later message

        return execute
