"""The hazard boxes' MarkerArray serialised straight from their numbers.

Why: rclpy converts each Python Marker, with every nested default (a texture image, a
mesh file, ...), into its C struct before publishing; on real maps, with 7-13 boxes a
frame, that took 0.53 ms, and building the Marker objects 0.25 ms more. The boxes differ
only in a few numbers and one string, so here their bytes are written directly (XCDR1,
little endian, as :mod:`segmentation_safety.ros.cdr`) and published as they are.

Only for the Marker this writer follows (ROS 2 Iron and later); where the running
distro's Marker has other fields, :func:`serialize` returns None and the node publishes
the MarkerArray (:func:`markers.marker_array`) instead. Tests compare the two.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

from segmentation_safety.ros import cdr
from segmentation_safety.ros.markers import (
    BOX_COLOR,
    NAMESPACE,
    Box,
    lifetime_of,
    pitch_orientation,
)

#: Marker's fields as this writer writes them.
MARKER_FIELDS = {
    "header": "std_msgs/Header", "ns": "string", "id": "int32", "type": "int32",
    "action": "int32", "pose": "geometry_msgs/Pose", "scale": "geometry_msgs/Vector3",
    "color": "std_msgs/ColorRGBA", "lifetime": "builtin_interfaces/Duration",
    "frame_locked": "boolean", "points": "sequence<geometry_msgs/Point>",
    "colors": "sequence<std_msgs/ColorRGBA>", "texture_resource": "string",
    "texture": "sensor_msgs/CompressedImage",
    "uv_coordinates": "sequence<visualization_msgs/UVCoordinate>", "text": "string",
    "mesh_resource": "string", "mesh_file": "visualization_msgs/MeshFile",
    "mesh_use_embedded_materials": "boolean",
}  # fmt: skip
_XYZ = {"x": "double", "y": "double", "z": "double"}
_HEADER = {"stamp": "builtin_interfaces/Time", "frame_id": "string"}
_STAMP = {"sec": "int32", "nanosec": "uint32"}
#: The fields of the messages inside a Marker that the writer writes, by where they are.
NESTED_FIELDS = {
    ("header",): _HEADER, ("header", "stamp"): _STAMP,
    ("pose",): {"position": "geometry_msgs/Point", "orientation": "geometry_msgs/Quaternion"},
    ("pose", "position"): _XYZ, ("pose", "orientation"): {**_XYZ, "w": "double"},
    ("scale",): _XYZ, ("color",): {"r": "float", "g": "float", "b": "float", "a": "float"},
    ("lifetime",): _STAMP,
    ("texture",): {"header": "std_msgs/Header", "format": "string", "data": "sequence<uint8>"},
    ("texture", "header"): _HEADER, ("texture", "header", "stamp"): _STAMP,
    ("mesh_file",): {"filename": "string", "data": "sequence<uint8>"},
}  # fmt: skip

_CUBE, _ADD, _DELETEALL = 1, 0, 3  # Marker.CUBE, Marker.ADD, Marker.DELETEALL


@functools.cache
def supported() -> bool:
    """Whether this distro's Marker is the one :func:`serialize` writes."""
    from visualization_msgs.msg import Marker

    marker = Marker()
    if dict(marker.get_fields_and_field_types()) != MARKER_FIELDS:
        return False
    return all(
        dict(functools.reduce(getattr, path, marker).get_fields_and_field_types()) == fields
        for path, fields in NESTED_FIELDS.items()
    )


def serialize(boxes: Sequence[Box], header: Any, pitch: float, lifetime_s: float) -> bytes | None:
    """The MarkerArray :func:`markers.marker_array` makes of ``boxes`` (a DELETEALL, then
    one CUBE per box), serialised; None where this distro's Marker is another."""
    if not supported():
        return None
    out = _Writer()
    out.pack(4, "<I", 1 + len(boxes))
    stamp = (header.stamp.sec, header.stamp.nanosec)
    # The DELETEALL: ns and action set, everything else at its default (w = 1).
    out.marker(stamp, header.frame_id, 0, 0, _DELETEALL, (0.0,) * 6 + (1.0,) + (0.0,) * 3,
               (0.0,) * 4, (0, 0), "")  # fmt: skip
    if boxes:
        orientation = pitch_orientation(pitch)
        lifetime = lifetime_of(lifetime_s)
        for box in boxes:
            out.marker(stamp, header.frame_id, box.id, _CUBE, _ADD,
                       (*box.centre, *orientation, *box.size), BOX_COLOR, lifetime,
                       box.text)  # fmt: skip
    return bytes(out.data)


class _Writer:
    """Appends to a serialised message; alignment counts from after the encapsulation."""

    def __init__(self) -> None:
        self.data = bytearray(cdr.ENCAPSULATION)

    def align(self, size: int) -> None:
        self.data += bytes(-(len(self.data) - len(cdr.ENCAPSULATION)) % size)

    def pack(self, size: int, fmt: str, *values: Any) -> None:
        """``values`` packed by ``fmt`` (no padding inside) after aligning to ``size``."""
        self.align(size)
        self.data += struct.pack(fmt, *values)

    def string(self, text: str) -> None:
        raw = text.encode()
        self.pack(4, "<I", len(raw) + 1)
        self.data += raw + b"\0"

    def marker(
        self,
        stamp: tuple[int, int],
        frame_id: str,
        marker_id: int,
        kind: int,
        action: int,
        pose_and_scale: tuple[float, ...],
        color: tuple[float, ...],
        lifetime: tuple[int, int],
        text: str,
    ) -> None:
        self.pack(4, "<iI", *stamp)
        self.string(frame_id)
        self.string(NAMESPACE)
        self.pack(4, "<iii", marker_id, kind, action)
        self.pack(8, "<10d", *pose_and_scale)  # position, orientation, scale
        self.pack(4, "<4fiI?", *color, *lifetime, False)  # frame_locked
        self.pack(4, "<II", 0, 0)  # no points, no colors
        self.string("")  # texture_resource
        self.pack(4, "<iI", 0, 0)  # texture: its header's stamp,
        self.string("")  # frame_id,
        self.string("")  # format
        self.pack(4, "<II", 0, 0)  # and data; no uv_coordinates
        self.string(text)
        self.string("")  # mesh_resource
        self.string("")  # mesh_file: filename,
        self.pack(4, "<I?", 0, False)  # data; mesh_use_embedded_materials
