"""The node's output messages laid out before a frame is rendered, so the pipeline
renders into their pixels and publishing copies nothing.

Each picture and map the node publishes used to be computed into an array of its own and
then copied into its serialised message: 8 MB a frame at 512×1024, 33 MB at 1024×2048.
Every byte of such a message but the pixels is known once the frame's header and size
are (the Image's fields, the header, and for ``safety`` the Images it carries, which come
first in it), so the messages are written first and the pixels' places in them handed to
the pipeline (``Pipeline.process_frame(into=...)``). ``safety``'s fields after its Images
(the alarm, the timings) are added once known (``cdr.finish_layout``).

Frames of one stream differ in those bytes only by their stamp, so :class:`OutputLayouts`
lays the messages out once and gives each frame a copy of them, re-stamped.

Pure: numpy and the CDR writer, no ROS calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segmentation_safety.ros import cdr

#: Room behind ``safety``'s Images for its other fields: names, IoU, alarm and timings
#: take a few hundred bytes; a message that needs more is serialised the usual way.
SAFETY_SPARE = 64 << 10


@dataclass(frozen=True)
class Picture:
    """One output's pixels: shape, dtype and Image encoding."""

    shape: tuple[int, ...]
    dtype: Any
    encoding: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def prefix(self, header: Any) -> list[Any]:
        step = self.nbytes // self.shape[0]
        return cdr.image_prefix(
            header, self.shape[0], self.shape[1], self.encoding, step, self.nbytes
        )

    def view(self, raw: np.ndarray) -> np.ndarray:
        return raw.view(self.dtype).reshape(self.shape)


@dataclass
class OutputBuffers:
    """The laid-out messages of one frame, and where each output's pixels go."""

    into: dict[str, np.ndarray] = field(default_factory=dict)  # output -> its pixels
    messages: dict[str, np.ndarray] = field(default_factory=dict)  # output -> its message
    safety: cdr.Layout | None = None  # with the carried outputs' pixels in it
    carried: dict[str, str] = field(default_factory=dict)  # output -> safety field
    last: str = ""  # safety's last laid-out field

    def holds(self, name: str, array: np.ndarray | None) -> bool:
        """Whether the rendered ``array`` of output ``name`` is the laid-out pixels (the
        pipeline may have put it elsewhere: another device, another shape)."""
        place = self.into.get(name)
        return (
            array is not None
            and place is not None
            and array.shape == place.shape
            and array.dtype == place.dtype
            and array.ctypes.data == place.ctypes.data
        )


def lay_out_outputs(
    header: Any,
    pictures: dict[str, Picture],
    alone: set[str],
    carried: dict[str, str],
    safety_head: Callable[[Any], Any],
) -> OutputBuffers:
    """Lay out the messages of one frame.

    ``pictures``: output -> its pixels; ``alone``: outputs published as messages of
    their own; ``carried``: output -> the ``safety`` field that carries it, with
    ``safety_head(header)`` a SafetyFrame whose fields up to the carried ones are final
    (the header, and empty Images for maps it does not carry), made only when one is
    carried.
    """
    out = OutputBuffers()
    for name in alone:
        picture = pictures[name]
        prefix = b"".join(picture.prefix(header))
        start = len(cdr.ENCAPSULATION) + len(prefix)
        message = np.empty(start + picture.nbytes, np.uint8)
        message[:start] = np.frombuffer(cdr.ENCAPSULATION + prefix, np.uint8)
        out.messages[name] = message
        out.into[name] = picture.view(message[start:])
    if carried:
        head = safety_head(header)
        order = list(head.get_fields_and_field_types())
        out.carried = dict(carried)
        out.last = max(carried.values(), key=order.index)
        images = {
            to: [*pictures[name].prefix(header), pictures[name].nbytes]
            for name, to in carried.items()
        }
        out.safety = cdr.lay_out(head, images, out.last, SAFETY_SPARE)
        for name, to in carried.items():
            out.into[name] = pictures[name].view(out.safety.views[to])
    return out


@dataclass
class _Template:
    """A frame's laid-out messages, and what of them a frame with another stamp shares."""

    buffers: OutputBuffers
    keep: dict[str, list[tuple[int, int]]]  # message -> its byte ranges that are not pixels
    stamps: dict[str, list[int]]  # message -> offset of each stamp in it
    pixels: dict[str, int]  # output alone -> offset of its pixels in its message
    fields: dict[str, int]  # field of safety carrying an output -> offset of its pixels


class OutputLayouts:
    """Lays out each frame's messages as :func:`lay_out_outputs` does: as a copy of the
    layout made for the first frame with the same frame id, sizes and outputs, with the
    frame's own stamp.

    Writing a layout walks the messages' fields in Python: 0.45 ms a frame in the node
    at 512×1024, most of it for bytes that repeat from frame to frame. A copy of those
    bytes and the new stamp take a fraction of that. ``safety_head`` is
    :func:`lay_out_outputs`' (it depends on the header alone).
    """

    def __init__(self, safety_head: Callable[[Any], Any]) -> None:
        self.safety_head = safety_head
        self._key: tuple[Any, ...] | None = None
        self._template: _Template | None = None

    def lay_out(
        self, header: Any, pictures: dict[str, Picture], alone: set[str], carried: dict[str, str]
    ) -> OutputBuffers:
        """:func:`lay_out_outputs` for this frame (see there)."""
        key = (
            header.frame_id,
            tuple(sorted(pictures.items())),
            frozenset(alone),
            tuple(sorted(carried.items())),
        )
        if key != self._key or self._template is None:
            # Kept, never handed out: a frame's layout is finished (cdr.finish_layout)
            # and its pixels written, and the template must stay as laid out. A second
            # layout, for a stamp that differs in every byte, tells the stamps that come
            # from the header from any other Time in the messages (a zero stamp of an
            # Image left at its defaults, as a camera's own stamps may be).
            buffers = lay_out_outputs(header, pictures, alone, carried, self.safety_head)
            probe = lay_out_outputs(_flipped(header), pictures, alone, carried, self.safety_head)
            self._template, self._key = _template(buffers, probe), key
        return _restamped(self._template, header)


def _flipped(header: Any) -> Any:
    """``header`` with every bit of its stamp inverted."""
    stamp = header.stamp
    flipped = type(stamp)(sec=~stamp.sec, nanosec=stamp.nanosec ^ 0xFFFFFFFF)
    return type(header)(stamp=flipped, frame_id=header.frame_id)


def _template(buffers: OutputBuffers, probe: OutputBuffers) -> _Template:
    keep, stamps, pixels, fields = {}, {}, {}, {}
    for name, message in buffers.messages.items():
        pixels[name] = _offset(buffers.into[name], message)
        keep[name] = [(0, pixels[name])]
        stamps[name] = [len(cdr.ENCAPSULATION)]  # an Image's payload starts with its stamp
    if buffers.safety is not None:
        layout = buffers.safety
        holes = sorted(layout.spans.items(), key=lambda kv: kv[1])
        ranges, at = [], 0
        for field_name, (_, end) in holes:
            fields[field_name] = _offset(layout.views[field_name], layout.data)
            ranges.append((at, fields[field_name]))
            at = end
        ranges.append((at, layout.size))
        keep["safety"] = [(a, b) for a, b in ranges if b > a]
        differ = layout.data[: layout.size] != probe.safety.data[: layout.size]
        stamps["safety"] = [at for at in layout.stamps if differ[at : at + 8].any()]
    return _Template(buffers, keep, stamps, pixels, fields)


def _offset(view: np.ndarray, base: np.ndarray) -> int:
    return view.ctypes.data - base.ctypes.data


def _stamp(header: Any) -> bytes:
    return struct.pack("<iI", header.stamp.sec, header.stamp.nanosec)


def _restamped(template: _Template, header: Any) -> OutputBuffers:
    stamp = _stamp(header)
    source = template.buffers

    def copy(name: str, data: np.ndarray) -> np.ndarray:
        out = np.empty_like(data)
        for a, b in template.keep[name]:
            out[a:b] = data[a:b]
        for at in template.stamps[name]:
            out[at : at + len(stamp)] = np.frombuffer(stamp, np.uint8)
        return out

    out = OutputBuffers(carried=dict(source.carried), last=source.last)
    for name, message in source.messages.items():
        data = copy(name, message)
        place, start = source.into[name], template.pixels[name]
        out.messages[name] = data
        out.into[name] = data[start : start + place.nbytes].view(place.dtype).reshape(place.shape)
    if source.safety is not None:
        layout = source.safety
        data = copy("safety", layout.data)
        views = {k: data[at : at + layout.views[k].size] for k, at in template.fields.items()}
        out.safety = cdr.Layout(
            data=data,
            views=views,
            spans=dict(layout.spans),
            size=layout.size,
            offset=layout.offset,
            floats=[],
            stamps=list(layout.stamps),
        )
        for name, to in source.carried.items():
            place = source.into[name]
            out.into[name] = views[to].view(place.dtype).reshape(place.shape)
    return out
