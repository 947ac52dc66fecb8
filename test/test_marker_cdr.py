"""The hazard boxes serialised from their numbers are rclpy's MarkerArray of them."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rclpy")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from segmentation_safety.ros import marker_cdr, markers  # noqa: E402


def _boxes(n: int) -> list[markers.Box]:
    rng = np.random.default_rng(n)
    return [
        markers.Box(
            i + 1,
            tuple(rng.normal(size=3).tolist()),
            tuple(rng.uniform(0.1, 5.0, size=3).tolist()),
            "x" * i + f"anomaly {rng.normal():.2f}",  # every length mod 4, non-ASCII below
        )
        for i in range(n)
    ]


def test_serialised_boxes_are_rclpys_marker_array_of_them():
    assert marker_cdr.supported()  # the wheels' Marker (Kilted): the layout it writes
    boxes = _boxes(9) + [markers.Box(10, (0.0, 1.5, 1e300), (0.1, 0.1, 0.1), "Δ at ∞ m")]
    # Frame ids of every length mod 4 move the doubles' padding; pitch and lifetime too.
    for frame_id in ("", "c", "ca", "cam", "camera_optical"):
        for n in (0, 1, 2, len(boxes)):
            for pitch, lifetime in ((0.0, 0.5), (0.3, 2.75), (-math.pi / 2, 10.0)):
                header = Header(frame_id=frame_id)
                header.stamp.sec, header.stamp.nanosec = 1_700_000_000, 999_999_999
                data = marker_cdr.serialize(boxes[:n], header, pitch, lifetime)
                want = serialize_message(markers.marker_array(boxes[:n], header, pitch, lifetime))
                # Fast CDR leaves padding bytes as they were: the messages are compared.
                assert len(data) == len(want)
                got = deserialize_message(data, MarkerArray)
                assert got == deserialize_message(want, MarkerArray), (frame_id, n, pitch)
                assert len(got.markers) == n + 1 and got.markers[0].action == 3


def test_boxes_of_regions_are_the_markers_of_hazard_markers():
    k = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])
    anomaly = np.zeros((64, 128), dtype=np.float32)
    anomaly[40:47, 60:70], anomaly[50:60, 5:9] = 2.0, 3.0
    regions = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=10)
    header = Header(frame_id="cam")
    boxes = markers.hazard_boxes(regions, k, 1.5, 0.1)
    assert len(boxes) == 2 and [b.id for b in boxes] == [1, 2]
    data = marker_cdr.serialize(boxes, header, 0.1, 0.5)
    fresh = markers.hazard_markers(regions, k, header, 1.5, 0.1)
    assert deserialize_message(data, MarkerArray) == deserialize_message(
        serialize_message(fresh), MarkerArray
    )


def test_another_marker_layout_is_left_to_rclpy(monkeypatch):
    # A distro whose Marker has other fields (Humble has no texture or mesh_file): no
    # bytes, and the node publishes the MarkerArray instead.
    monkeypatch.setattr(marker_cdr, "MARKER_FIELDS", {**marker_cdr.MARKER_FIELDS, "extra": "int32"})
    marker_cdr.supported.cache_clear()
    try:
        assert not marker_cdr.supported()
        assert marker_cdr.serialize(_boxes(2), Header(), 0.0, 0.5) is None
    finally:
        monkeypatch.undo()
        marker_cdr.supported.cache_clear()
    assert marker_cdr.supported()
