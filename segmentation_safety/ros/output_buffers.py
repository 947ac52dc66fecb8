"""The node's output messages laid out before a frame is rendered, so the pipeline
renders into their pixels and publishing copies nothing.

Each picture and map the node publishes used to be computed into an array of its own and
then copied into its serialised message: 8 MB a frame at 512×1024, 33 MB at 1024×2048.
Every byte of such a message but the pixels is known once the frame's header and size
are (the Image's fields, the header, and for ``safety`` the Images it carries, which come
first in it), so the messages are written first and the pixels' places in them handed to
the pipeline (``Pipeline.process_frame(into=...)``). ``safety``'s fields after its Images
(the alarm, the timings) are added once known (``cdr.finish_layout``).

Pure: numpy and the CDR writer, no ROS calls.
"""

from __future__ import annotations

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
    safety_head: Callable[[], Any],
) -> OutputBuffers:
    """Lay out the messages of one frame.

    ``pictures``: output -> its pixels; ``alone``: outputs published as messages of
    their own; ``carried``: output -> the ``safety`` field that carries it, with
    ``safety_head()`` a SafetyFrame whose fields up to the carried ones are final (its
    header, and empty Images for maps it does not carry), made only when one is carried.
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
        head = safety_head()
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
