"""Serialised ROS 2 messages (XCDR1, little endian) written and read without rclpy objects.

Why: publishing a Python ``sensor_msgs/Image`` costs three copies of its pixels (numpy ->
``bytes`` -> the message's ``array`` -> the C struct) before the middleware serialises
it, and a ``SafetyFrame`` that embeds the same maps pays them all again. Here an Image
is serialised once, straight from the numpy buffer, into a body that is published as it
is (``Publisher.publish`` takes serialised bytes) and spliced unchanged into the
``SafetyFrame``: an Image has no field wider than 4 bytes, so its encoding does not
depend on where it starts as long as that is a multiple of 4.

The generic writer and reader walk the message's own field table
(``get_fields_and_field_types``), so a field added to a message is serialised too, and a
type it does not know raises instead of writing wrong bytes. Padding is written as
zeros. Tests check every result against ``rclpy.serialization``.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Encapsulation header: CDR little endian, no options.
ENCAPSULATION = b"\x00\x01\x00\x00"

#: A stamp's type as ``get_fields_and_field_types`` names it; serialised, two 4-byte
#: fields (sec, nanosec), whose offsets the writer records (``Writer.stamps``).
TIME_TYPE = "builtin_interfaces/Time"

#: Primitive ROS types -> (struct format, size = alignment).
PRIMITIVES: dict[str, tuple[str, int]] = {
    "boolean": ("?", 1),
    "octet": ("B", 1),
    "uint8": ("B", 1),
    "int8": ("b", 1),
    "char": ("B", 1),
    "uint16": ("H", 2),
    "int16": ("h", 2),
    "uint32": ("I", 4),
    "int32": ("i", 4),
    "float": ("f", 4),
    "uint64": ("Q", 8),
    "int64": ("q", 8),
    "double": ("d", 8),
}


class CdrError(ValueError):
    """A message type this module cannot serialise, or bytes that do not parse."""


class Writer:
    """Appends CDR fields; ``offset`` counts from the start of the payload (alignment)."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.offset = 0
        self.floats: list[int] = []  # offset of every float32 field, in writing order
        self.stamps: list[int] = []  # offset of every builtin_interfaces/Time
        self.spans: dict[str, tuple[int, int]] = {}  # spliced field -> [start, end)

    def align(self, size: int) -> None:
        pad = -self.offset % size
        if pad:
            self.parts.append(b"\0" * pad)
            self.offset += pad

    def primitive(self, kind: str, value: Any) -> None:
        fmt, size = PRIMITIVES[kind]
        self.align(size)
        if kind == "float":
            self.floats.append(self.offset)
        self.parts.append(struct.pack("<" + fmt, value))
        self.offset += size

    def string(self, text: str) -> None:
        data = text.encode() + b"\0"
        self.primitive("uint32", len(data))
        self.parts.append(data)
        self.offset += len(data)

    def buffer(self, data: Any) -> None:
        """Raw bytes (any buffer: numpy arrays are added without a copy until join)."""
        view = memoryview(data).cast("B")
        self.parts.append(view)
        self.offset += view.nbytes


def image_body(
    header: Any, height: int, width: int, encoding: str, step: int, data: Any
) -> list[Any]:
    """A sensor_msgs/Image's CDR payload as parts (pixels not copied yet): see module doc."""
    view = memoryview(data).cast("B")
    return [*image_prefix(header, height, width, encoding, step, view.nbytes), view]


def image_prefix(
    header: Any, height: int, width: int, encoding: str, step: int, nbytes: int
) -> list[Any]:
    """An Image payload's parts before its ``nbytes`` of pixels."""
    w = Writer()
    write_header(w, header)
    w.primitive("uint32", height)
    w.primitive("uint32", width)
    w.string(encoding)
    w.primitive("uint8", int(sys.byteorder == "big"))
    w.primitive("uint32", step)
    w.primitive("uint32", nbytes)
    return w.parts


@dataclass
class Layout:
    """A serialised message laid out before the pixels of its Images exist.

    Every byte but the pixels is written; ``views`` are where each Image's pixels go (a
    renderer writes them there, so serialising copies nothing). Fields after the laid-out
    ones, known only once the pixels are (an alarm, the timings), are added by
    :func:`finish_layout` into the spare room behind them. The message is
    ``data[:size]``; each Image's payload is ``data[start:end]`` of ``spans``.
    """

    data: np.ndarray  # uint8: the message so far, then spare room
    views: dict[str, np.ndarray]  # field -> its pixels' bytes (uint8, within data)
    spans: dict[str, tuple[int, int]]  # field -> [start, end) of its Image payload
    size: int  # bytes of the message written so far
    offset: int  # CDR offset (payload, after the encapsulation header) at ``size``
    floats: list[int]  # offset in data of every float32 field written by finish_layout
    #: Offset in data of every stamp laid out (an Image's is where its payload starts).
    stamps: list[int] = field(default_factory=list)

    def embedding(self) -> Embedding:
        """The message as written so far (finished: :func:`finish_layout`), in place."""
        return Embedding(self.data[: self.size], self.spans, self.floats)


def lay_out(msg: Any, images: dict[str, list[Any]], last: str, spare: int) -> Layout:
    """``msg``'s fields up to ``last``; ``images``: field -> ``[*image_prefix(...), n]``
    (its prefix parts, then its pixel count, left unwritten). ``spare``: room for the rest."""
    w = Writer()
    gaps: dict[str, tuple[int, int, int]] = {}  # field -> payload start, pixels start, end
    for name, kind in msg.get_fields_and_field_types().items():
        if name in images:
            w.align(4)
            start = w.offset
            *prefix, nbytes = images[name]
            for part in prefix:
                w.buffer(part)
            gaps[name] = (start, w.offset, w.offset + nbytes)
            w.stamps.append(start)  # an Image's header comes first, its stamp first in it
            w.parts.append(_Gap(nbytes))
            w.offset += nbytes
        else:
            _write_value(w, kind, getattr(msg, name))
        if name == last:
            break
    shift = len(ENCAPSULATION)
    size = shift + w.offset
    data = np.empty(size + spare, np.uint8)
    data[:shift] = np.frombuffer(ENCAPSULATION, np.uint8)
    at = shift
    for part in w.parts:
        n = part.nbytes if isinstance(part, _Gap) else len(memoryview(part).cast("B"))
        if not isinstance(part, _Gap):
            data[at : at + n] = np.frombuffer(part, np.uint8)
        at += n
    return Layout(
        data=data,
        views={k: data[shift + p : shift + e] for k, (_, p, e) in gaps.items()},
        spans={k: (shift + s, shift + e) for k, (s, _, e) in gaps.items()},
        size=size,
        offset=w.offset,
        floats=[],
        stamps=sorted(shift + o for o in w.stamps),
    )


def finish_layout(layout: Layout, msg: Any, after: str) -> bool:
    """Write ``msg``'s fields after ``after`` behind a :func:`lay_out`; False (nothing
    written) when they do not fit its spare room."""
    w = Writer()
    w.offset = layout.offset
    names = list(msg.get_fields_and_field_types().items())
    index = [n for n, _ in names].index(after)
    for name, kind in names[index + 1 :]:
        _write_value(w, kind, getattr(msg, name))
    tail = b"".join(w.parts)
    if layout.size + len(tail) > layout.data.size:
        return False
    layout.data[layout.size : layout.size + len(tail)] = np.frombuffer(tail, np.uint8)
    base = layout.size - layout.offset
    layout.floats = [base + o for o in w.floats]
    layout.size += len(tail)
    layout.offset = w.offset
    return True


@dataclass(frozen=True)
class _Gap:
    """Room left in a :func:`lay_out` for ``nbytes`` of pixels."""

    nbytes: int


def write_header(w: Writer, header: Any) -> None:
    w.align(4)
    w.stamps.append(w.offset)
    w.primitive("int32", header.stamp.sec)
    w.primitive("uint32", header.stamp.nanosec)
    w.string(header.frame_id)


def serialize(msg: Any, bodies: dict[str, list[Any]] | None = None) -> bytes:
    """``msg`` as serialised bytes; ``bodies`` replaces top-level fields by ready payload
    parts (from :func:`image_body`), which must be Image-like (no field over 4 bytes)."""
    w = Writer()
    _write_message(w, msg, bodies or {})
    return serialize_body(w.parts)  # one join: prefixing the joined payload copied it twice


def serialize_body(parts: Iterable[Any]) -> bytes:
    """A standalone message from payload parts (e.g. an :func:`image_body`)."""
    return b"".join([ENCAPSULATION, *parts])


@dataclass
class Embedding:
    """A message serialised around the Image payloads it carries, in a mutable buffer.

    Each carried Image is also a message of its own (a topic of the node), and its bytes
    there are the bytes it has here (module doc): it is published from inside this buffer
    (``serialized_publish.publish_embedded``) instead of being serialised a second time.
    The buffer stays writable so that float32 fields known only later (the stage timings
    that count this very publishing) are written in place before the message goes out.
    """

    data: bytearray | np.ndarray  # the whole message, encapsulation header first (uint8)
    spans: dict[str, tuple[int, int]]  # spliced field -> [start, end) of its payload in data
    floats: list[int]  # offset in data of every float32 field, in writing order

    def set_float(self, index: int, value: float) -> None:
        """Overwrite the ``index``-th float32 field (``floats`` order; -1 is the last)."""
        struct.pack_into("<f", self.data, self.floats[index], value)


def serialize_embedding(msg: Any, bodies: dict[str, list[Any]]) -> Embedding:
    """:func:`serialize` into an :class:`Embedding`: the same bytes, in one copy."""
    w = Writer()
    _write_message(w, msg, bodies)
    shift = len(ENCAPSULATION)
    return Embedding(
        data=bytearray().join([ENCAPSULATION, *w.parts]),
        spans={k: (a + shift, b + shift) for k, (a, b) in w.spans.items()},
        floats=[o + shift for o in w.floats],
    )


def _write_message(w: Writer, msg: Any, bodies: dict[str, list[Any]]) -> None:
    for name, kind in msg.get_fields_and_field_types().items():
        if name in bodies:
            w.align(4)
            start = w.offset
            for part in bodies[name]:
                w.buffer(part)
            w.spans[name] = (start, w.offset)
            continue
        _write_value(w, kind, getattr(msg, name))


def _write_value(w: Writer, kind: str, value: Any) -> None:
    if kind in PRIMITIVES:
        w.primitive(kind, value)
    elif kind == "string":
        w.string(value)
    elif kind.startswith("sequence<") and kind.endswith(">"):
        inner = kind[len("sequence<") : -1]
        if "," in inner:
            raise CdrError(f"bounded sequence {kind} not supported")
        w.primitive("uint32", len(value))
        if inner in ("uint8", "octet", "char"):
            w.buffer(bytes(value) if isinstance(value, list) else value)
        elif inner in PRIMITIVES:
            fmt, size = PRIMITIVES[inner]
            if value:
                w.align(size)
                data = struct.pack(f"<{len(value)}{fmt}", *value)
                w.parts.append(data)
                w.offset += len(data)
        else:
            for item in value:
                _write_value(w, inner, item)
    elif "/" in kind:
        if kind == TIME_TYPE:
            w.align(4)
            w.stamps.append(w.offset)
        _write_message(w, value, {})
    else:
        raise CdrError(f"field type {kind!r} not supported")


class Reader:
    """Reads the fields of a serialised message, skipping byte sequences without copying."""

    def __init__(self, raw: bytes | memoryview) -> None:
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 1:
            raise CdrError("not little-endian CDR")
        self.view = memoryview(raw)[4:]
        self.offset = 0

    def primitive(self, kind: str) -> Any:
        fmt, size = PRIMITIVES[kind]
        self.offset += -self.offset % size
        (value,) = struct.unpack_from("<" + fmt, self.view, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        """A CDR string: its length counts the closing NUL, which must be there (rclpy
        refuses one without; a frame read otherwise would carry another encoding)."""
        n = self.primitive("uint32")
        at = self.offset + 4  # in the message, its 4-byte encapsulation header counted
        if n == 0 or self.offset + n > len(self.view):
            why = "no room for its closing NUL" if n == 0 else "past the message's end"
            raise CdrError(f"string at byte {at} claims {n} bytes: {why}")
        if self.view[self.offset + n - 1] != 0:
            raise CdrError(f"string at byte {at} does not end in NUL")
        text = bytes(self.view[self.offset : self.offset + n - 1]).decode()
        self.offset += n
        return text


def read_fields(raw: bytes | memoryview, msg_type: type, names: set[str]) -> dict[str, Any]:
    """The top-level fields ``names`` of a serialised ``msg_type`` as Python values
    (nested messages as dicts); the rest, maps included, is skipped, not copied."""
    r = Reader(raw)
    out = {}
    try:
        for name, kind in msg_type.get_fields_and_field_types().items():
            value = _read_value(r, kind, keep=name in names)
            if name in names:
                out[name] = value
            if len(out) == len(names):
                break
    except struct.error as e:
        raise CdrError(f"truncated {msg_type.__name__}: {e}") from None
    return out


def _read_value(r: Reader, kind: str, keep: bool) -> Any:
    if kind in PRIMITIVES:
        return r.primitive(kind)
    if kind == "string":
        return r.string()
    if kind.startswith("sequence<"):
        inner = kind[len("sequence<") : -1]
        n = r.primitive("uint32")
        if inner in PRIMITIVES:
            size = PRIMITIVES[inner][1]
            if n:
                r.offset += -r.offset % size
            start = r.offset
            r.offset += n * size
            if r.offset > len(r.view):
                raise CdrError("sequence runs past the end of the message")
            if not keep:
                return None
            fmt = PRIMITIVES[inner][0]
            return list(struct.unpack_from(f"<{n}{fmt}", r.view, start))
        return [_read_value(r, inner, keep) for _ in range(n)]
    if "/" in kind:
        pkg, name = kind.split("/")
        import importlib

        module = importlib.import_module(f"{pkg}.msg")
        fields = getattr(module, name).get_fields_and_field_types()
        return {f: _read_value(r, k, keep) for f, k in fields.items()}
    raise CdrError(f"field type {kind!r} not supported")


class RawImage:
    """A serialised sensor_msgs/Image read in place: ``data`` is a view of the bytes.

    Has the fields ``image_codec.decode_rgb`` reads, so a frame is decoded without
    rclpy first copying its pixels into a Python message (and only when it is used).
    """

    __slots__ = ("header", "height", "width", "encoding", "is_bigendian", "step", "data")

    def __init__(self, raw: bytes | memoryview) -> None:
        from std_msgs.msg import Header

        r = Reader(raw)
        try:
            sec, nanosec = r.primitive("int32"), r.primitive("uint32")
            self.header = Header(frame_id=r.string())
            self.header.stamp.sec, self.header.stamp.nanosec = sec, nanosec
            self.height = r.primitive("uint32")
            self.width = r.primitive("uint32")
            self.encoding = r.string()
            self.is_bigendian = r.primitive("uint8")
            self.step = r.primitive("uint32")
            n = r.primitive("uint32")
        except (struct.error, UnicodeDecodeError) as e:
            raise CdrError(f"not a serialised sensor_msgs/Image: {e}") from None
        if r.offset + n > len(r.view):
            raise CdrError(f"Image data of {n} bytes runs past the end of the message")
        self.data = r.view[r.offset : r.offset + n]
